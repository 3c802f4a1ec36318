"""Revocation: after a successful reload, open tunnels the new rules deny are cut.

Requests inside intercepted tunnels and plain HTTP are decided one by one, so the next
request already meets the new rules. A passed-through tunnel carries raw bytes that Warden
never sees as requests: without this module a tunnel opened before an agent was revoked
would keep carrying its traffic for as long as the client keeps it open (git, package
downloads, streams).

On every reload that changed the rules (`ReloadEvent.changed`), each open tunnel that is
not intercepted (passed through, or not yet past its first bytes) is decided again exactly
as its CONNECT was: `decide` on agent, host and port, then `decide_addresses` on the address
it was pinned to. If that denies, or the host now needs interception (new method/path rules,
a credential, an MCP server: a raw tunnel cannot honour them), the client connection is
closed through mitmproxy's own connection handler (runtime/sockets.close_client:
`ConnectionHandler.close_connection`,
which cancels the client's reader task; mitmproxy then tears down the server side and runs
`client_disconnected`, so the usual `tunnel_close` record follows). Each cut is one
`tunnel_revoked` Outcome (audit, metrics `warden_tunnels_revoked_total{agent,reason}`,
alerts) with the new decision's reason code and `revocation`: `denied` or
`needs_interception` or `raw_tcp_removed` (a raw tunnel whose rule no longer says
`raw_tcp: true`), plus `revoke_ms`, the time from the swap of the rules to the close.
Runs on the event loop (reload listeners do), so it never races the relay.

Live flows: a request inside an intercepted tunnel (or plain HTTP) is decided when its
headers arrive, so an open WebSocket or a request whose body is still streaming would
otherwise carry traffic under the old decision for as long as it lasts. `LiveFlows` (a chain
part after every stage that installs a request stream) keeps those flows: from
`websocket_start` to `websocket_end`, and from `requestheaders` (when the body streams) to
`request`/`error`. On the same reload each is decided again with the proxy's own request
decision (`core.plan.plan_request`, `plan_upgrade` for a WebSocket, `check_addresses` on the
pinned address), on the canonical target Policy recorded. A denial (or an error while
deciding: fail closed) cuts it: `FlowRecord.revocation` is set (the stream callable then
forwards nothing more and WebSocket messages are dropped), the flow is killed and its client
connection closed the same way as a tunnel's (mitmproxy's `flow.kill()` alone does not stop a
flow in transit). One `tunnel_revoked` Outcome carries the new decision; the flow's later
`websocket_close`/`request` record carries that deny decision and `revocation`, never the old
allow. The whole client connection is closed, so on HTTP/2 its other streams end too.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from ipaddress import ip_address
from typing import Any

from mitmproxy import connection, http

from egresswarden.core.decide import decide, decide_addresses
from egresswarden.core.decision import Decision, Interception, Reason, deny
from egresswarden.core.facts import RequestFacts
from egresswarden.core.plan import check_addresses, plan_raw_tcp, plan_request, plan_upgrade
from egresswarden.record.journal import utc_now
from egresswarden.record.outcome import Outcome, redact_query
from egresswarden.runtime.context import Connections, ConnState, FlowRecord, Tunnel, TunnelMode, record_of
from egresswarden.runtime.rulestore import ReloadEvent, RuleStore
from egresswarden.runtime.sockets import close_client

logger = logging.getLogger("warden")

OutcomeSink = Callable[[Outcome], None]


def redecide(rules: Any, tunnel: Tunnel) -> tuple[Decision, str | None]:
    """The tunnel's CONNECT decided again under `rules`: (decision, revocation cause or None)."""
    facts = RequestFacts(tunnel.agent, tunnel.host, tunnel.port, "https")
    decision = decide(rules, facts)
    if decision.allowed and tunnel.address is not None:
        decision = decide_addresses(rules, facts, [tunnel.address], decision)
    if not decision.allowed:
        return decision, "denied"
    if decision.intercept and not tunnel.intercept:
        return decision, "needs_interception"
    if tunnel.raw_tcp and not plan_raw_tcp(rules, decision):
        if tunnel.mode is TunnelMode.UNDECIDED:
            tunnel.raw_tcp = False  # not relaying yet: its first bytes must now be a ClientHello
        elif not tunnel.tls_checked:
            return decision, "raw_tcp_removed"  # relaying bytes no TLS check ever saw (red team 15)
    return decision, None


def redecide_flow(rules: Any, record: FlowRecord, flow: http.HTTPFlow) -> Decision:
    """The live request decided again under `rules`, as Policy decided it (same functions)."""
    target = record.target
    if record.agent is None or target is None or record.method is None or record.path is None:
        raise ValueError("live flow without a decided target")
    decision = plan_request(rules, record.agent, target.scheme, target.host, target.port, record.method, record.path)
    if flow.websocket is not None:
        decision = plan_upgrade(rules, record.agent, target.host, flow.request.headers.get("upgrade"), decision)
    if decision.allowed and record.upstream_address is not None:
        decision = check_addresses(rules, record.agent, target.scheme, target.host, target.port,
                                   [ip_address(record.upstream_address)], decision)
    return decision


def _stop_after_revocation(stream: Callable[[bytes], bytes | Any],
                           record: FlowRecord) -> Callable[[bytes], bytes | list[bytes]]:
    """The request's stream callable, forwarding nothing once a reload revoked the flow.
    Nothing is `[]`, not `b""`: an empty chunk would end a chunked HTTP/1 body, and the
    upstream would take the truncated body as complete."""
    def guarded(chunk: bytes) -> bytes | list[bytes]:
        if record.revocation is not None:
            return []
        out = stream(chunk)
        # as the stream gave it: joining a held-back `[]` into b"" would end the body upstream
        return out if isinstance(out, bytes) else list(out)
    return guarded


class LiveFlows:
    """The flows a reload must re-decide: open WebSockets and requests whose body still streams."""

    def __init__(self) -> None:
        self.flows: dict[str, http.HTTPFlow] = {}

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        stream = flow.request.stream
        if flow.response is None and callable(stream):
            flow.request.stream = _stop_after_revocation(stream, record_of(flow))
            self.flows[flow.id] = flow

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.websocket is None:
            self.flows.pop(flow.id, None)  # the body is complete

    def websocket_start(self, flow: http.HTTPFlow) -> None:
        self.flows[flow.id] = flow

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        self.flows.pop(flow.id, None)

    def error(self, flow: http.HTTPFlow) -> None:
        self.flows.pop(flow.id, None)

    def client_disconnected(self, client: connection.Client) -> None:
        for flow_id in [i for i, f in self.flows.items() if f.client_conn is client]:
            del self.flows[flow_id]


class Revocation:
    def __init__(self, store: RuleStore, connections: Connections, emit: OutcomeSink,
                 live: LiveFlows | None = None) -> None:
        self.store = store
        self.connections = connections
        self.emit = emit
        self.live = live if live is not None else LiveFlows()
        self.revoked = 0
        # Other owners of passthrough tunnels (runtime/fastconnect.py): each yields
        # (close it now -> closed?, connection state, tunnel) for its open tunnels.
        self.tunnel_sources: list[Callable[[], Iterable[tuple[Callable[[], bool], ConnState, Tunnel]]]] = []
        store.add_listener(self.on_reload)

    def add_tunnel_source(self, source: Callable[[], Iterable[tuple[Callable[[], bool], ConnState, Tunnel]]]) -> None:
        self.tunnel_sources.append(source)

    def _open_tunnels(self) -> Iterator[tuple[Callable[[], bool], ConnState, Tunnel]]:
        for client, state, tunnel in self.connections.open_tunnels():
            yield functools.partial(close_client, client, abort=True), state, tunnel
        for source in self.tunnel_sources:
            yield from source()

    def on_reload(self, event: ReloadEvent) -> None:
        if event.initial or not event.ok or not event.changed:
            return
        started = time.perf_counter()
        rules = self.store.current
        if rules is None:
            return
        for close, state, tunnel in list(self._open_tunnels()):
            if tunnel.intercept or tunnel.mode not in (TunnelMode.PASSTHROUGH, TunnelMode.UNDECIDED) \
                    or not tunnel.decision.allowed:
                continue  # every request inside is decided (or refused) with the new rules anyway
            try:
                decision, cause = redecide(rules, tunnel)
            except Exception as e:  # cannot decide: fail closed, cut it
                logger.error("warden: revocation check failed with %s; closing the tunnel", e.__class__.__name__)
                decision, cause = tunnel.decision, "internal_error"
            if cause is None:
                continue
            if close():
                self.revoked += 1
                self._audit(state, tunnel, decision, cause, time.perf_counter() - started)
        for flow in list(self.live.flows.values()):
            self._redecide_flow(rules, flow, started)

    def _redecide_flow(self, rules: Any, flow: http.HTTPFlow, started: float) -> None:
        record = record_of(flow)
        if record.revocation is not None:
            return
        try:
            decision = redecide_flow(rules, record, flow)
        except Exception as e:  # cannot decide: fail closed, cut it
            logger.error("warden: revocation check of a live flow failed with %s; cutting it", e.__class__.__name__)
            decision = deny(Reason.INTERNAL_ERROR, "Warden could not re-decide this flow after a reload",
                            getattr(rules, "version", "unknown"))
        if decision.allowed:
            return
        record.decision = decision
        record.revocation = "denied"
        self.live.flows.pop(flow.id, None)
        if flow.killable:
            flow.kill()
        close_client(flow.client_conn, abort=True)  # immediate, even towards a peer that does not read
        self.revoked += 1
        state = self.connections.peek(flow.client_conn)
        self.emit(Outcome(
            event="tunnel_revoked", time=utc_now(), request_id=record.request_id, decision=decision,
            agent=record.agent, sandbox_id=record.sandbox_id,
            client_ip=state.client_ip if state is not None else None,
            client_port=state.client_port if state is not None else None,
            method=record.method, scheme=record.scheme, host=record.host, port=record.port,
            path=redact_query(record.path), interception=record.interception,
            duration_seconds=time.monotonic() - record.started, upstream_address=record.upstream_address,
            revocation="denied", revoke_ms=round((time.perf_counter() - started) * 1000, 3),
        ))

    def _audit(self, state: ConnState, tunnel: Tunnel, decision: Decision, cause: str, seconds: float) -> None:
        self.emit(Outcome(
            event="tunnel_revoked", time=utc_now(), request_id=tunnel.request_id, decision=decision,
            agent=tunnel.agent, client_ip=state.client_ip, client_port=state.client_port, method="CONNECT",
            scheme="https", host=tunnel.host, port=tunnel.port,
            interception=Interception.PASSTHROUGH if tunnel.passthrough else None,
            duration_seconds=time.monotonic() - tunnel.started,
            upstream_address=str(tunnel.address) if tunnel.address else None,
            revocation=cause, revoke_ms=round(seconds * 1000, 3),
        ))
