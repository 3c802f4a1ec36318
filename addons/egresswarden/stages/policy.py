"""Policy addon: decides every CONNECT and every HTTP request against the current RuleSet.

CONNECT: decided in `http_connect` on agent + host + port; the name is resolved right
there (asynchronously) and every address checked (deny cidrs, the agent's cidr rules, the
SSRF guard), so a refusal is a readable 403 before any TLS or upstream connection. The
checked address is remembered on the connection and `upstream.UpstreamGuard` pins the
upstream connection to it.

Requests (inside an intercepted tunnel, or plain HTTP): decided in `requestheaders`, before
the body is read, on method and path. Inside a tunnel the Host header must name the CONNECT
host (no domain fronting); a plain-HTTP request's Host header must match its URL.
"""

from __future__ import annotations

import contextlib
import time

from mitmproxy import http

from egresswarden.core.decide import decide, decide_addresses
from egresswarden.core.decision import Decision, Interception, Reason, deny
from egresswarden.core.facts import RequestFacts
from egresswarden.core.hostnames import HostError, normalize_host, parse_ip
from egresswarden.core.ruleset import RuleSet
from egresswarden.runtime.context import Connections, ConnState, FlowRecord, Tunnel, record_of
from egresswarden.runtime.failsafe import fail_closed, refusal_response
from egresswarden.runtime.resolver import ResolveError, resolve
from egresswarden.runtime.rulestore import RuleStore


def _split_authority(value: str, default_port: int) -> tuple[str, int]:
    """"host:port" / "[v6]:port" / "host" -> (host, port). Raises ValueError."""
    value = value.strip()
    if value.startswith("["):
        end = value.index("]")
        host, rest = value[1:end], value[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if value.count(":") == 1:
        host, port = value.rsplit(":", 1)
        return host, int(port)
    return value, default_port


def _names(header: str, host: str, port: int) -> bool:
    """Does a Host header (or :authority) name `host` (canonical) and `port`? Unparsable: no."""
    try:
        name, header_port = _split_authority(header, port)
        return normalize_host(name) == host and header_port == port
    except (ValueError, HostError):
        return False


def _canonical_or_raw(host: str) -> str:
    """The canonical host for records; an invalid one is kept as sent (truncated) so the
    audit shows what the agent tried."""
    try:
        return normalize_host(host)
    except HostError:
        return host[:256]


class Policy:
    def __init__(self, store: RuleStore, connections: Connections) -> None:
        self.store = store
        self.connections = connections

    def _refuse(self, flow: http.HTTPFlow, record: FlowRecord, decision: Decision) -> None:
        record.decision = decision
        flow.response = refusal_response(decision, record.agent)

    async def _check_addresses(self, rules: RuleSet, facts: RequestFacts, decision: Decision,
                               state: ConnState, record: FlowRecord) -> Decision:
        """Resolve and check; on success remember the pinned address for this connection."""
        host = normalize_host(facts.host)
        try:
            addresses = await resolve(rules, host, facts.port)
        except ResolveError as e:
            return deny(Reason.RESOLVE_FAILED, str(e), rules.version)
        started = time.perf_counter()
        checked = decide_addresses(rules, RequestFacts(facts.agent, host, facts.port, facts.scheme), addresses,
                                   decision)
        record.engine_seconds += time.perf_counter() - started
        if checked.allowed:
            state.pinned[(host, facts.port)] = addresses[0]
        return checked

    @fail_closed
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # identity already refused it
        record = record_of(flow)
        state = self.connections.get(flow.client_conn)
        rules = self.store.current
        assert rules is not None and record.agent is not None
        facts = RequestFacts(record.agent, flow.request.host, flow.request.port, "https")
        record.host, record.port, record.scheme = _canonical_or_raw(flow.request.host), flow.request.port, "https"
        started = time.perf_counter()
        decision = decide(rules, facts)
        record.engine_seconds += time.perf_counter() - started
        if decision.allowed:
            decision = await self._check_addresses(rules, facts, decision, state, record)
        record.decision = decision
        if not decision.allowed:
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
        )
        record.interception = Interception.INTERCEPT if decision.intercept else Interception.PASSTHROUGH
        record.upstream_address = str(state.tunnel.address) if state.tunnel.address else None

    def _fronting(self, flow: http.HTTPFlow, tunnel: Tunnel, rules: RuleSet) -> Decision | None:
        if tunnel.sni_mismatch is not None:
            return deny(Reason.SNI_MISMATCH,
                        f"TLS SNI {tunnel.sni_mismatch[:80]!r} differs from the CONNECT host {tunnel.host}; "
                        f"connect to the host you mean", rules.version)
        header = flow.request.host_header
        if header is None or _names(header, tunnel.host, tunnel.port):
            return None  # (HTTP/1.0 without Host: the tunnel host is the only destination)
        return deny(Reason.HOST_MISMATCH,
                    f"Host header {header[:80]!r} differs from the CONNECT host {tunnel.host}:{tunnel.port}; "
                    f"open a tunnel to the host you mean", rules.version)

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        record = record_of(flow)
        state = self.connections.get(flow.client_conn)
        rules = self.store.current
        assert rules is not None and record.agent is not None
        tunnel = state.tunnel
        record.method, record.path = flow.request.method, flow.request.path
        if tunnel is not None:
            record.host, record.port, record.scheme = tunnel.host, tunnel.port, "https"
            record.interception = Interception.INTERCEPT
            record.upstream_address = str(tunnel.address) if tunnel.address else None
            fronting = self._fronting(flow, tunnel, rules)
            if fronting is not None:
                self._refuse(flow, record, fronting)
                return
            facts = RequestFacts(record.agent, tunnel.host, tunnel.port, "https", flow.request.method,
                                 flow.request.path)
        else:
            record.host, record.port, record.scheme = flow.request.host, flow.request.port, flow.request.scheme
            record.interception = Interception.PLAIN
            header = flow.request.host_header
            if header is not None and not _names(header, _canonical_or_raw(flow.request.host), flow.request.port):
                self._refuse(flow, record, deny(
                    Reason.HOST_MISMATCH, f"Host header {header[:80]!r} differs from the request URL host "
                    f"{flow.request.host[:80]!r}", rules.version))
                return
            facts = RequestFacts(record.agent, flow.request.host, flow.request.port, flow.request.scheme,
                                 flow.request.method, flow.request.path)
        started = time.perf_counter()
        decision = decide(rules, facts)
        record.engine_seconds += time.perf_counter() - started
        with contextlib.suppress(HostError):
            record.host = normalize_host(record.host or "")
        if decision.allowed and tunnel is None:
            decision = await self._check_addresses(rules, facts, decision, state, record)
            pinned = state.pinned.get((record.host or "", flow.request.port))
            if decision.allowed and pinned is not None:
                record.upstream_address = str(pinned)
                if parse_ip(flow.request.host) is None:
                    # Pin: connect to the checked address, keep the name in the Host header. Setting
                    # request.host (not only the server address) lets mitmproxy reuse the upstream
                    # connection for the next request to the same host.
                    host_header = flow.request.host_header
                    flow.request.host = str(pinned)
                    flow.request.host_header = host_header
        record.decision = decision
        if not decision.allowed:
            self._refuse(flow, record, decision)
