"""Policy stage: decides every CONNECT and every HTTP request against the flow's RuleSet snapshot.

CONNECT (`http_connect`): decided on agent + host + port. An allowed name is resolved right
there (asynchronously; a refused name is never resolved) and every address checked (deny
cidrs, the private-address guard), then compared with the addresses of declared MCP servers
and credential hosts: a tunnel to one of those addresses under another name or an IP
literal is intercepted and governed as that destination (`runtime.resolver.GovernedAddresses`). The checked address is remembered on the
connection and `upstream.UpstreamGuard` pins the upstream connection to it. A refusal is
either a 403 to the CONNECT itself or, with `settings.explain_denials: in_band`, a tunnel
Warden accepts only to answer every request in it with the readable 403 (see
`interception.py`; nothing is resolved or contacted upstream).

Requests (`requestheaders`, before the body is read): the canonical target is decided once
here (`FlowRecord.target`: canonical host, port, percent-decoded path; `FlowRecord.mcp_server`:
the MCP server whose endpoint that path is), then:

  * every authority the request carries must name the destination: inside a tunnel the
    request target (absolute-form or HTTP/2 `:authority`) and the Host header must name the
    CONNECT host and port (no fronting, no vhost routing by an absolute URL); in plain HTTP
    the Host header must name the URL's host. Mismatch -> 403 `host_mismatch`;
  * the method/path decision;
  * HTTP Upgrade: only to WebSocket, only where the deciding rule says `websocket: true`;
  * plain HTTP: the name is resolved and checked as for CONNECT, and the request pinned.
The request body plan is then decided by `bodyplan.BodyPlanner`, the next stage.
"""

from __future__ import annotations

import time
from dataclasses import replace

from mitmproxy import http

from egresswarden.core.decision import Decision, Interception, Reason, deny
from egresswarden.core.facts import RequestFacts
from egresswarden.core.hostnames import HostError, IPAddress, authority_names, normalize_host, parse_ip
from egresswarden.core.paths import PathError, canonical_path
from egresswarden.core.plan import (
    EXPLAINABLE,
    check_addresses,
    governs,
    mcp_server_for,
    plan_connect,
    plan_raw_tcp,
    plan_request,
    plan_upgrade,
)
from egresswarden.core.ruleset import RuleSet
from egresswarden.runtime.context import (
    Connections,
    ConnState,
    FlowRecord,
    Target,
    Tunnel,
    TunnelMode,
    record_of,
)
from egresswarden.runtime.failsafe import refusal_response
from egresswarden.runtime.resolver import GovernedAddresses, ResolveError, resolve
from egresswarden.runtime.revocation import redecide_flow
from egresswarden.runtime.rulestore import RuleStore


def _canonical_or_raw(host: str) -> str:
    """The canonical host for records; an invalid one is kept as sent (truncated) so the
    audit shows what the agent tried."""
    try:
        return normalize_host(host)
    except HostError:
        return host[:256]


def _canonical_path_or_none(path: str) -> str | None:
    try:
        return canonical_path(path)
    except PathError:
        return None


class Policy:
    def __init__(self, store: RuleStore, connections: Connections) -> None:
        self.store = store
        self.connections = connections
        self.governed = GovernedAddresses()

    def _refuse(self, flow: http.HTTPFlow, record: FlowRecord, decision: Decision) -> None:
        record.decision = decision
        flow.response = refusal_response(decision, record.agent)

    async def _check_addresses(self, rules: RuleSet, facts: RequestFacts, decision: Decision,
                               state: ConnState, record: FlowRecord) -> Decision:
        checked, seconds = await self.check_addresses(rules, facts, decision, state)
        record.engine_seconds += seconds
        return checked

    async def check_addresses(self, rules: RuleSet, facts: RequestFacts, decision: Decision,
                              state: ConnState) -> tuple[Decision, float]:
        """Resolve an allowed name and check every address; remember the pinned address.
        Returns the decision and the engine time it took (resolution excluded)."""
        host = normalize_host(facts.host)
        try:
            addresses = await resolve(rules, host, facts.port)
        except ResolveError as e:
            return deny(Reason.RESOLVE_FAILED, str(e), rules.version), 0.0
        started = time.perf_counter()
        checked = check_addresses(rules, facts.agent, facts.scheme, host, facts.port, addresses, decision)
        seconds = time.perf_counter() - started
        if checked.allowed:
            checked = await self._check_governed(rules, host, facts.port, addresses, checked, state)
        if checked.allowed:
            state.pinned[(host, facts.port)] = addresses[0]
        return checked, seconds

    async def _check_governed(self, rules: RuleSet, host: str, port: int, addresses: list[IPAddress],
                              decision: Decision, state: ConnState) -> Decision:
        """An MCP server's address reached by an IP literal or another name (a credential host's:
        by an IP literal, see core.plan.governs) is governed as that destination: intercepted,
        and MCP endpoint paths decided as its MCP traffic."""
        if not rules.mcp_servers and not rules.credentials_by_id:
            return decision
        owners = await self.governed.owners(rules)
        for ip in addresses:
            governed = owners.get((ip, port))
            if governed is not None and governs(governed, host):
                state.governed[(host, port)] = governed
                return replace(decision, intercept=True)
        return decision

    # -- CONNECT -----------------------------------------------------------------------------
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # identity (or the audit gate) already refused it
        record = record_of(flow)
        state = self.connections.get(flow.client_conn)
        rules = record.rules = self.store.current
        assert rules is not None and record.agent is not None
        facts = RequestFacts(record.agent, flow.request.host, flow.request.port, "https")
        record.host, record.port, record.scheme = _canonical_or_raw(flow.request.host), flow.request.port, "https"
        started = time.perf_counter()
        decision = plan_connect(rules, record.agent, flow.request.host, flow.request.port)
        record.engine_seconds += time.perf_counter() - started
        if decision.allowed:
            decision = await self._check_addresses(rules, facts, decision, state, record)
        record.decision = decision
        if not decision.allowed:
            if rules.settings.explain_denials == "in_band" and decision.reason in EXPLAINABLE:
                self._accept_to_explain(flow, record, state, decision)
                return
            self._refuse(flow, record, decision)
            return
        host = record.host  # allowed, so the host was valid and is canonical here
        state.tunnel = Tunnel(
            agent=record.agent,
            host=host,
            port=flow.request.port,
            decision=decision,
            request_id=record.request_id,
            address=state.pinned.get((host, flow.request.port)),
            intercept=decision.intercept,
            sandbox_id=record.sandbox_id,
            raw_tcp=plan_raw_tcp(rules, decision),
        )
        record.interception = Interception.INTERCEPT if decision.intercept else Interception.PASSTHROUGH
        record.upstream_address = str(state.tunnel.address) if state.tunnel.address else None

    def _accept_to_explain(self, flow: http.HTTPFlow, record: FlowRecord, state: ConnState,
                           decision: Decision) -> None:
        """Answer the CONNECT with 200 so the agent's first request can carry the readable 403.

        Every client drops the body of a refused CONNECT; inside the tunnel the refusal is an
        ordinary response the client shows. A response set here means mitmproxy opens no
        upstream connection (not even with the eager strategy), and the tunnel's layers are
        chosen by Interception (TLS with the client only). The audit's connect record keeps
        the deny decision; its interception is `explain`."""
        assert record.agent is not None and record.host is not None
        state.tunnel = Tunnel(agent=record.agent, host=record.host, port=flow.request.port, decision=decision,
                              request_id=record.request_id, mode=TunnelMode.UNDECIDED, sandbox_id=record.sandbox_id)
        state.tunnel.intercept = True
        record.interception = Interception.EXPLAIN
        flow.response = http.Response.make(200, b"", {})
        flow.response.reason = "Connection established"

    # -- requests ----------------------------------------------------------------------------
    def _tunnel_authorities(self, flow: http.HTTPFlow, tunnel: Tunnel, rules: RuleSet) -> Decision | None:
        """Every authority the request carries names the CONNECT host and port, or a denial."""
        if tunnel.sni_mismatch is not None:
            return deny(Reason.SNI_MISMATCH,
                        f"TLS SNI {tunnel.sni_mismatch[:80]!r} differs from the CONNECT host {tunnel.host}; "
                        f"connect to the host you mean", rules.version)
        request = flow.request
        for what, value in (("request target", request.authority), ("Host header", request.host_header)):
            if value and not authority_names(value, tunnel.host, tunnel.port):
                return deny(Reason.HOST_MISMATCH,
                            f"the {what} names {value[:80]!r}, but this tunnel was opened to "
                            f"{tunnel.host}:{tunnel.port}; open a tunnel to the host you mean", rules.version)
        return None

    @staticmethod
    def _header_framing(flow: http.HTTPFlow, rules: RuleSet) -> Decision | None:
        """Headers every hop must read the same way, or a denial (RFC 9112 5.2, 6.1).

        A folded or CR/LF-carrying value is read as one header here and as two by an origin
        that unfolds it differently (a smuggling primitive); a transfer coding other than
        chunked (`gzip, chunked`) would carry a body Warden's scanner sees still compressed."""
        for name, value in flow.request.headers.items(multi=True):
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                return deny(Reason.INVALID_HEADER, f"header {name[:40]!r} is folded or holds a line break; "
                            f"send each header on one line", rules.version)
        te = flow.request.headers.get_all("transfer-encoding")
        if te:
            codings = [c.strip().lower() for value in te for c in value.split(",") if c.strip()]
            if codings != ["chunked"]:
                return deny(Reason.INVALID_HEADER, f"Transfer-Encoding {', '.join(codings)[:60]!r} is not allowed; "
                            f"only chunked (use Content-Encoding for compression)", rules.version)
        return None

    def _target(self, record: FlowRecord, rules: RuleSet, state: ConnState, host: str, port: int, scheme: str,
                path: str) -> None:
        """Decide the canonical target and the MCP server it addresses, once for every stage: by
        name, or by address when the name (or IP literal) resolved to a declared server's address."""
        record.target = Target(host, port, scheme, _canonical_path_or_none(path))
        server = mcp_server_for(rules, host, port, path, state.governed.get((host, port)))
        record.mcp_server = server.id if server is not None else None

    def request(self, flow: http.HTTPFlow) -> None:
        """The whole (buffered) body is here. If the rules were reloaded while it arrived, the
        request is decided again under the rules in force: Revocation re-decides flows that
        stream at the reload itself, a buffered one is decided here before anything sends it
        (red team 5: two half-sent 1 MB POSTs, finished after a reload that denied their path,
        reached the origin under the old decision)."""
        if flow.response is not None:
            return
        record = record_of(flow)
        current = self.store.current
        if current is None or record.rules is None or current.version == record.rules.version:
            return
        if record.decision is None or not record.decision.allowed:
            return
        decision = redecide_flow(current, record, flow)  # an exception denies (the chain's fail_closed)
        if not decision.allowed:
            record.revocation = "denied"
            self._refuse(flow, record, decision)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        record = record_of(flow)
        state = self.connections.get(flow.client_conn)
        tunnel = state.tunnel
        # Each request takes the newest rules, also inside an older tunnel (a revoked agent is refused).
        rules = record.rules = self.store.current
        assert rules is not None and record.agent is not None
        request = flow.request
        record.method, record.path = request.method, request.path
        framing = self._header_framing(flow, rules)
        if framing is not None:
            record.host = _canonical_or_raw(tunnel.host if tunnel is not None else request.host)
            record.interception = Interception.INTERCEPT if tunnel is not None else Interception.PLAIN
            self._refuse(flow, record, framing)
            return
        if tunnel is not None:
            record.host, record.port, record.scheme = tunnel.host, tunnel.port, "https"
            record.upstream_address = str(tunnel.address) if tunnel.address else None
            if tunnel.mode is TunnelMode.EXPLAIN:
                record.interception = Interception.EXPLAIN
                self._refuse(flow, record, tunnel.decision)
                return
            if tunnel.mode is TunnelMode.CLEARTEXT:
                record.interception = Interception.CLEARTEXT
                self._refuse(flow, record, deny(
                    Reason.CLEARTEXT_IN_TUNNEL,
                    f"plain HTTP inside the tunnel to {tunnel.host}:{tunnel.port}; Warden forwards only TLS here "
                    f"(use https://{tunnel.host}{'' if tunnel.port == 443 else f':{tunnel.port}'}/)", rules.version))
                return
            record.interception = Interception.INTERCEPT
            fronting = self._tunnel_authorities(flow, tunnel, rules)
            if fronting is not None:
                self._refuse(flow, record, fronting)
                return
            if not (request.is_http2 or request.is_http3):
                request.authority = ""  # origin-form upstream: the authority was checked, now it is implied
            self._target(record, rules, state, tunnel.host, tunnel.port, "https", request.path)
            facts = RequestFacts(record.agent, tunnel.host, tunnel.port, "https", request.method, request.path)
        else:
            record.host, record.port, record.scheme = request.host, request.port, request.scheme
            record.interception = Interception.PLAIN
            canonical_host = _canonical_or_raw(request.host)
            header = request.host_header
            if header is not None and not authority_names(header, canonical_host, request.port):
                self._refuse(flow, record, deny(
                    Reason.HOST_MISMATCH, f"Host header {header[:80]!r} differs from the request URL host "
                    f"{request.host[:80]!r}", rules.version))
                return
            self._target(record, rules, state, canonical_host, request.port, request.scheme, request.path)
            facts = RequestFacts(record.agent, request.host, request.port, request.scheme, request.method,
                                 request.path)
        started = time.perf_counter()
        decision = plan_request(rules, facts.agent, facts.scheme, facts.host, facts.port, request.method, request.path)
        record.engine_seconds += time.perf_counter() - started
        record.host = _canonical_or_raw(record.host or "")
        decision = plan_upgrade(rules, record.agent, record.host, request.headers.get("upgrade"), decision)
        if decision.allowed and tunnel is None:
            decision = await self._check_addresses(rules, facts, decision, state, record)
            pinned = state.pinned.get((record.host, request.port))
            if decision.allowed and pinned is not None:
                record.upstream_address = str(pinned)
                if parse_ip(request.host) is None:
                    # Pin: connect to the checked address, keep the name in the Host header. Setting
                    # request.host (not only the server address) lets mitmproxy reuse the upstream
                    # connection for the next request to the same host.
                    if request.scheme == "https":
                        # mitmproxy reuses an upstream connection by address alone: its TLS,
                        # verified for the first name, must not carry another name's requests
                        named = state.tls_names.setdefault((pinned, request.port), record.host)
                        if named != record.host:
                            self._refuse(flow, record, deny(
                                Reason.HOST_MISMATCH, f"this connection already sends https:// requests for "
                                f"{named} to {pinned}:{request.port}, over TLS verified for {named}; send "
                                f"requests for {record.host[:80]} on another connection, or through CONNECT",
                                rules.version))
                            return
                    host_header = request.host_header
                    request.host = str(pinned)
                    request.host_header = host_header
        record.decision = decision
        if not decision.allowed:
            self._refuse(flow, record, decision)
