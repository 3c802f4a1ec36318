"""Outcome addon: the one place where a finished CONNECT, request or tunnel becomes an `Outcome`.

Audit, metrics and alerts do not hook mitmproxy themselves for flow results: they receive
the same frozen `Outcome`, built once from the flow's `FlowRecord`, so the audit log, the
counters and the alerts can never disagree about what happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from mitmproxy import connection, http
from mitmproxy.proxy import layer

from egresswarden.core.decision import Decision, Interception, deny
from egresswarden.record.journal import utc_now
from egresswarden.runtime.context import Connections, ConnState, FlowRecord, Tunnel, new_request_id, record_of
from egresswarden.runtime.rulestore import RuleStore

REDACTED = "REDACTED"


def redact_query(path: str | None, keep: frozenset[str] = frozenset()) -> str | None:
    """Keep parameter names, drop their values: queries carry tokens and personal data.
    Values of the names in `keep` (settings.audit.keep_query_values) stay, re-encoded."""
    if path is None or "?" not in path:
        return path
    base, _, query = path.partition("?")
    query = query.split("#", 1)[0]
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        return base + "?" + REDACTED
    return base + "?" + "&".join(f"{name}={quote(value, safe='') if name in keep else REDACTED}"
                                 for name, value in pairs)


@dataclass(frozen=True, slots=True)
class McpFields:
    """What an `mcp` Outcome adds: one JSON-RPC message to or from a declared MCP server."""

    server: str
    method: str | None = None
    tool: str | None = None
    resource: str | None = None
    prompt: str | None = None
    argument_keys: tuple[str, ...] | None = None
    argument_values: Any = None  # only for tools in log_argument_values; secrets replaced
    is_error: bool | None = None
    protocol_version: str | None = None
    batch: bool = False
    hidden: tuple[str, ...] = ()
    changed_tools: tuple[str, ...] = ()
    changed_parts: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (tool, fields that changed since its pin)
    tool_collisions: tuple[str, ...] = ()
    substituted: str | None = None
    transport: str = "http"
    unpinned_tools: tuple[str, ...] = ()  # hidden for want of a pin (settings.mcp_unpinned: refuse)
    session: str | None = None  # stdio only, like the two below
    direction: str | None = None
    redacted: int | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    event: str  # connect | request | tunnel_close | tunnel_refused | websocket_close | mcp
    time: str
    request_id: str
    decision: Decision | None
    agent: str | None = None
    agent_claimed: str | None = None
    identity: str | None = None
    auth_failure: str | None = None
    sandbox_id: str | None = None
    client_ip: str | None = None
    client_port: int | None = None
    method: str | None = None
    scheme: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    interception: Interception | None = None
    status: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_seconds: float = 0.0
    engine_seconds: float = 0.0
    upstream_seconds: float | None = None
    upstream_address: str | None = None
    credentials: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    error: str | None = None
    mcp: McpFields | None = None
    websocket_messages_up: int | None = None
    websocket_messages_down: int | None = None
    mcp_audited: bool = False  # a request whose MCP messages each have their own `mcp` Outcome
    revocation: str | None = None  # tunnel_revoked: what the reload changed; on request/websocket_close: the flow was cut
    revoke_ms: float | None = None  # tunnel_revoked: time from the reload to the cut (None elsewhere)
    carried_tls: bool | None = None  # tunnel_close: Tunnel.tls_checked (False: raw bytes, or no ServerHello seen)


OutcomeSink = Callable[[Outcome], None]


def _flow_error(flow: http.HTTPFlow) -> str | None:
    """Why the flow failed. An allowed CONNECT whose upstream connection failed has no
    flow.error (mitmproxy answers it 502 itself): the connection's own error says why."""
    if flow.error:
        return flow.error.msg
    server_error = flow.server_conn.error
    if server_error and flow.response is not None and flow.response.status_code == 502:
        return server_error
    return None


def tunnel_close_outcome(state: ConnState, tunnel: Tunnel, error: str | None = None) -> Outcome:
    """The `tunnel_close` record of a passed-through tunnel (mitmproxy's relay or the fast path's)."""
    return Outcome(
        event="tunnel_close", time=utc_now(), request_id=tunnel.request_id, decision=tunnel.decision,
        agent=tunnel.agent, sandbox_id=tunnel.sandbox_id, client_ip=state.client_ip,
        client_port=state.client_port, method="CONNECT", scheme="https", host=tunnel.host, port=tunnel.port,
        interception=Interception.PASSTHROUGH, bytes_up=tunnel.bytes_up, bytes_down=tunnel.bytes_down,
        duration_seconds=time.monotonic() - tunnel.started,
        upstream_address=str(tunnel.address) if tunnel.address else None, error=error,
        carried_tls=tunnel.tls_checked,
    )


class Outcomes:
    """Builds Outcomes from finished flows and hands them to every sink, in order."""

    def __init__(self, connections: Connections, store: RuleStore | None = None) -> None:
        self.connections = connections
        self.store = store  # for settings.audit.keep_query_values of the current rules
        self.sinks: list[OutcomeSink] = []

    def add_sink(self, sink: OutcomeSink) -> None:
        self.sinks.append(sink)

    def emit(self, outcome: Outcome) -> None:
        for sink in self.sinks:
            sink(outcome)

    def _from_flow(self, flow: http.HTTPFlow, record: FlowRecord, event: str) -> Outcome:
        state = self.connections.peek(flow.client_conn)
        peer = flow.client_conn.peername or ("", 0)
        response = flow.response
        upstream = None
        if response is not None and flow.request.timestamp_start and response.timestamp_end and flow.server_conn.connected:
            upstream = max(0.0, response.timestamp_end - flow.request.timestamp_start)
        return Outcome(
            event=event,
            time=utc_now(),
            request_id=record.request_id,
            decision=record.decision,
            agent=record.agent,
            agent_claimed=record.agent_claimed,
            identity=record.identity_method,
            client_ip=state.client_ip if state else str(peer[0]),
            client_port=state.client_port if state else None,
            method=flow.request.method if event == "connect" else record.method,
            scheme=record.scheme,
            host=record.host or flow.request.host,
            port=record.port or flow.request.port,
            path=redact_query(record.path, self._kept_query_values()),
            interception=record.interception,
            status=response.status_code if response is not None else None,
            bytes_up=record.bytes_up + len(flow.request.raw_content or b""),
            bytes_down=record.bytes_down + (len(response.raw_content or b"") if response is not None else 0),
            duration_seconds=time.monotonic() - record.started,
            engine_seconds=record.engine_seconds,
            upstream_seconds=upstream,
            upstream_address=record.upstream_address,
            credentials=tuple(record.credentials),
            events=tuple(record.events),
            error=_flow_error(flow),
            auth_failure=record.auth_failure,
            sandbox_id=record.sandbox_id,
            mcp_audited=record.mcp_audited,
            revocation=record.revocation,
        )

    def _kept_query_values(self) -> frozenset[str]:
        rules = self.store.current if self.store is not None else None
        return rules.settings.audit.keep_query_values if rules is not None else frozenset()

    def _finish(self, flow: http.HTTPFlow, event: str) -> None:
        record = record_of(flow)
        if record.audited:
            return
        record.audited = True
        self.emit(self._from_flow(flow, record, event))

    def http_connected(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, "connect")

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, "connect")

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow, "request")

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.request.method == "CONNECT":
            self._finish(flow, "connect")
        else:
            self._finish(flow, "request")

    def audit_open_tunnels(self, error: str) -> None:
        """At shutdown, before the audit log closes: a `tunnel_close` for every passthrough
        tunnel still open on mitmproxy's path (red team 23: they had none; the fast path writes
        its own). The caller has folded kernel relays' counts into their tunnels."""
        for _, state, tunnel in self.connections.open_tunnels():
            if tunnel.passthrough and not tunnel.audited:
                tunnel.audited = True
                self.emit(tunnel_close_outcome(state, tunnel, error))

    def client_disconnected(self, client: connection.Client) -> None:
        state = self.connections.peek(client)
        tunnel = state.tunnel if state is not None else None
        if state is None or tunnel is None or not tunnel.passthrough or tunnel.audited:
            return
        tunnel.audited = True
        self.emit(tunnel_close_outcome(state, tunnel, tunnel.close_error))

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """Audit a connection Interception closed (bytes that are not HTTP Warden decided)."""
        state = self.connections.peek(nextlayer.context.client)
        if state is None or state.refusal is None or state.refusal_audited:
            return
        state.refusal_audited = True
        reason, message = state.refusal
        tunnel = state.tunnel
        version = tunnel.decision.policy_version if tunnel is not None else "unknown"
        self.emit(Outcome(
            event="tunnel_refused", time=utc_now(),
            request_id=tunnel.request_id if tunnel is not None else new_request_id(),
            decision=deny(reason, message, version), agent=tunnel.agent if tunnel else state.agent,
            sandbox_id=tunnel.sandbox_id if tunnel else None, client_ip=state.client_ip,
            client_port=state.client_port, method="CONNECT" if tunnel else None, scheme="https" if tunnel else None,
            host=tunnel.host if tunnel else None, port=tunnel.port if tunnel else None,
            upstream_address=str(tunnel.address) if tunnel is not None and tunnel.address else None,
            bytes_up=len(nextlayer.data_client()),
        ))

    def websocket_end(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        state = self.connections.peek(flow.client_conn)
        self.emit(Outcome(
            event="websocket_close", time=utc_now(), request_id=record.request_id, decision=record.decision,
            agent=record.agent, identity=record.identity_method, sandbox_id=record.sandbox_id,
            client_ip=state.client_ip if state else None, client_port=state.client_port if state else None,
            method=record.method, scheme=record.scheme, host=record.host, port=record.port,
            path=redact_query(record.path), interception=record.interception, bytes_up=record.bytes_up,
            bytes_down=record.bytes_down, duration_seconds=time.monotonic() - record.started,
            upstream_address=record.upstream_address, credentials=tuple(record.credentials),
            events=tuple(record.events), error=flow.error.msg if flow.error else None,
            websocket_messages_up=record.websocket_messages_up,
            websocket_messages_down=record.websocket_messages_down,
            revocation=record.revocation,
        ))
