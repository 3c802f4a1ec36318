"""Identity addon: who is calling. Answers 407 with a Basic challenge when nobody is.

Runs first in the chain. For a CONNECT it identifies the agent once and pins the identity
to the client connection (every request inside the tunnel inherits it); a plain-HTTP
request is identified on its own. `Proxy-Authorization` and `Proxy-Connection` are always
removed before anything goes upstream, identified or not.
"""

from __future__ import annotations

import re

from mitmproxy import http

from egresswarden.core.decision import Reason, deny
from egresswarden.core.identity import AgentIdentity, AuthFailure, identify, parse_basic
from egresswarden.core.ruleset import RuleSet
from egresswarden.runtime.admin import SESSIONS
from egresswarden.runtime.context import Connections, ConnState, FlowRecord, record_of
from egresswarden.runtime.failsafe import refusal_response
from egresswarden.runtime.rulestore import RuleStore

PROXY_HEADERS = ("Proxy-Authorization", "Proxy-Connection")
_SAFE_ID = re.compile(r"[^a-z0-9_-]")

_FAILURE_TEXT = {
    AuthFailure.MISSING: "proxy credentials required: use HTTPS_PROXY=http://<agent-id>:<token>@<warden>",
    AuthFailure.MALFORMED: "Proxy-Authorization must be Basic base64(<agent-id>:<token>)",
    AuthFailure.UNKNOWN_AGENT: "unknown agent id or wrong token",
    AuthFailure.BAD_TOKEN: "unknown agent id or wrong token",
    AuthFailure.WRONG_SOURCE: "this agent may not connect from this network address",
}


def _claimed_agent(header: str | None) -> str | None:
    """The agent id a failed login claimed, sanitised, for the audit log (never the token)."""
    if not header:
        return None
    creds = parse_basic(header)
    if creds is None:
        return None
    return _SAFE_ID.sub("", creds.agent)[:64] or None


def identify_client(rules: RuleSet, header: str | None, client_ip: str,
                    client_port: int) -> tuple[AgentIdentity | AuthFailure, str | None]:
    """Who is calling: (the agent or why not, the `warden sandbox` session id or None).
    `warden sandbox` sessions first (runtime/admin.py): token + announced bridge port."""
    session = SESSIONS.identify(rules, header, client_ip, client_port)
    if session:
        return session[0], session[1]
    return identify(rules, header, client_ip), None


class Identity:
    def __init__(self, store: RuleStore, connections: Connections) -> None:
        self.store = store
        self.connections = connections

    def _identify(self, flow: http.HTTPFlow, record: FlowRecord) -> AgentIdentity | None:
        state = self.connections.get(flow.client_conn)
        rules = self.store.current
        header = flow.request.headers.get("Proxy-Authorization")
        for name in PROXY_HEADERS:
            flow.request.headers.pop(name, None)
        if rules is None:
            record.decision = deny(Reason.RULES_UNAVAILABLE, "no rules are loaded", "none")
            flow.response = refusal_response(record.decision, None)
            return None
        result, record.sandbox_id = identify_client(rules, header, state.client_ip, state.client_port)
        if isinstance(result, AuthFailure):
            reason = {AuthFailure.MISSING: Reason.AUTH_REQUIRED,
                      AuthFailure.WRONG_SOURCE: Reason.SOURCE_NOT_ALLOWED}.get(result, Reason.AUTH_FAILED)
            record.agent_claimed = _claimed_agent(header)
            record.auth_failure = result.value
            record.decision = deny(reason, _FAILURE_TEXT[result], rules.version)
            flow.response = refusal_response(record.decision, None)
            return None
        record.agent = result.agent
        record.identity_method = result.method.value
        return result

    def _refuse_outside(self, flow: http.HTTPFlow, record: FlowRecord, state: ConnState) -> None:
        """A request pipelined behind a CONNECT that opened no tunnel (Tunnel.carries_request_of):
        neither the tunnel's request nor a proxy request of its own. Refused, and the connection
        closed after the answer."""
        tunnel = state.tunnel
        assert tunnel is not None
        for name in PROXY_HEADERS:
            flow.request.headers.pop(name, None)
        record.agent, record.identity_method, record.request_id = tunnel.agent, state.identity_method, tunnel.request_id
        rules = self.store.current
        record.decision = deny(
            Reason.REQUEST_OUTSIDE_TUNNEL,
            f"this request followed a CONNECT to {tunnel.host}:{tunnel.port} on the same connection, but that "
            f"CONNECT opened no tunnel (it failed or was closed); send it on a new connection",
            rules.version if rules is not None else "none")
        flow.response = refusal_response(record.decision, record.agent)
        flow.response.headers["Connection"] = "close"

    def http_connect(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        state = self.connections.peek(flow.client_conn)
        if state is not None and state.tunnel is not None:
            # A second CONNECT can only be read once the first opened no tunnel; mitmproxy
            # 12.3.1 reuses the failed upstream object for it and its handler fails an assertion,
            # leaving the connection unanswered and unrecorded (red team 19)
            self._refuse_outside(flow, record, state)
            return
        identity = self._identify(flow, record)
        if identity is not None:
            state = self.connections.get(flow.client_conn)
            state.agent = identity.agent
            state.identity_method = identity.method.value

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        state = self.connections.get(flow.client_conn)
        if state.tunnel is not None and not state.tunnel.carries_request_of(flow.client_conn):
            self._refuse_outside(flow, record, state)
            return
        if state.tunnel is not None:
            # Inside a CONNECT tunnel: the identity was established by the CONNECT.
            for name in PROXY_HEADERS:
                flow.request.headers.pop(name, None)
            record.agent = state.tunnel.agent
            record.identity_method = state.identity_method
            record.request_id = state.tunnel.request_id
            record.sandbox_id = state.tunnel.sandbox_id  # Policy copied it from the CONNECT's record
            return
        self._identify(flow, record)
