"""The Warden addon chain, in one place. Data flows one way, in this order:

    RuleStore      loads and hot-reloads the rules (its configure runs first)
    FastConnect    `warden run`'s listener: keeps allowed passthrough CONNECTs off mitmproxy's
                   per-connection machinery, hands every other connection to mitmproxy
                   (runtime/fastconnect.py; calls Identity, AuditGate and Policy's functions)
    Audit          opens the audit log; receives Outcomes and lifecycle events
    Identity       who is calling (407 if nobody)                 writes agent, identity, request_id
    AuditGate      503 while the audit log cannot be written       writes decision (refusal only)
    Policy         CONNECT and request decisions, name resolution, address checks; the canonical
                   target and the MCP server it addresses          writes rules, target, decision,
                                                                   interception, mcp_server;
                                                                   rewrites request.host to the
                                                                   checked address (plain HTTP) and
                                                                   the request target to origin-form
    BodyPlanner    the request and response body plans; the agent's  writes body, response_body,
                   budget of buffered request bodies (429)        buffer_reservation
    Credentials    strip, inject, leak guard, redaction           writes creds, credentials, events;
                                                                   rewrites headers/query (injection)
    Mcp            MCP JSON-RPC decisions, list filtering         writes mcp, events; answers denials
    WebSockets     leak guard and redaction of WebSocket messages  writes websocket counts, events
    LiveFlows      keeps open WebSockets and streaming requests for Revocation
    Interception   every protocol layer of every tunnel           writes tunnel mode, SNI mismatch
    UpstreamGuard  pins each upstream connection to the checked address
    UpstreamSessions  the upstream TLS sessions runtime/master's ResumingTlsConfig resumes
                   (stages/upstream_tls.py)
    Outcomes       turns finished flows, tunnels and refused connections into Outcomes
    Metrics        Prometheus + /healthz (an Outcome sink)
    Alerts         webhook alerts, off the traffic path (an Outcome sink)
    Revocation     on reload, re-decides open passthrough tunnels, WebSockets and streaming
                   requests, and cuts the denied ones              writes revocation, decision
    Admin          the `warden sandbox` admin socket: sandbox sessions (read by Identity through
                   runtime/admin.SESSIONS) and the sandbox_* audit records
    LeftOpenSockets closes a client socket mitmproxy's handler left open (runtime/sockets.py)

Stages share state only through the flow's FlowRecord and the connection's ConnState
(runtime.context); a stage returns early when an earlier one answered the flow and never
overwrites another stage's verdict. Audit, Metrics and Alerts read the same Outcome.

mitmproxy sees the chain as ONE addon (`WardenAddon`). mitmproxy dispatches every event to
every addon in its list (a safecall context, a traverse and a getattr per addon, and a
second pass for the `update` event after each flow event), whether or not the addon has a
handler. With the concerns registered one by one that cost ~0.35 ms of CPU per proxied
request, most of Warden's overhead over bare mitmproxy; one addon that calls only the
handlers that exist costs one dispatch per event. The dispatcher wraps every flow and
connection handler with `fail_closed`, so no stage can forget it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

# Hook classes register their names in hooks.all_hooks when their modules are imported.
import mitmproxy.addonmanager  # noqa: F401 - load
import mitmproxy.log  # noqa: F401 - add_log
import mitmproxy.proxy.layers  # noqa: F401 - http, tls, tcp, udp, websocket, dns hooks
import mitmproxy.proxy.server_hooks  # noqa: F401 - connection hooks
from mitmproxy import hooks

from egresswarden.record.alerts import Alerts
from egresswarden.record.audit import Audit, AuditGate
from egresswarden.record.metrics import Metrics
from egresswarden.record.outcome import Outcomes
from egresswarden.runtime import (
    body_buffers,
    http1_heads,
    http1_informational,
    http1_trailers,
    splicing,
    tunnel_errors,
)
from egresswarden.runtime.admin import Admin
from egresswarden.runtime.budget import BufferBudget, DecodeMeter
from egresswarden.runtime.connlimits import ConnectionCounts
from egresswarden.runtime.context import Connections
from egresswarden.runtime.failsafe import LIFECYCLE_HOOKS, HookErrorCallback, fail_closed
from egresswarden.runtime.fastconnect import SHUTDOWN_ERROR, FastConnect
from egresswarden.runtime.revocation import LiveFlows, Revocation
from egresswarden.runtime.rulestore import RuleStore
from egresswarden.runtime.sockets import LeftOpenSockets
from egresswarden.stages.bodyplan import BodyPlanner
from egresswarden.stages.connlimits import ConnectionLimits
from egresswarden.stages.credentials import Credentials
from egresswarden.stages.identity import Identity
from egresswarden.stages.interception import Interception
from egresswarden.stages.mcp import Mcp
from egresswarden.stages.policy import Policy
from egresswarden.stages.upstream import UpstreamGuard
from egresswarden.stages.upstream_tls import UpstreamSessions
from egresswarden.stages.websockets import WebSockets


def build_chain() -> tuple[list[Any], HookErrorCallback]:
    """The chain's parts in order, and the callback told about every swallowed hook error."""
    http1_trailers.install()  # a defined answer instead of a hung connection (runtime/http1_trailers.py)
    http1_heads.install()  # a bound on the bytes of one message head (runtime/http1_heads.py)
    http1_informational.install()  # an upstream's 1xx is not its final answer (runtime/http1_informational.py)
    body_buffers.install()  # bounds on the body bytes mitmproxy keeps (runtime/body_buffers.py)
    tunnel_errors.install()  # a client gone mid-CONNECT closes its tunnel (runtime/tunnel_errors.py)
    store = RuleStore()
    connections = Connections()
    audit = Audit(store)
    interception = Interception(connections)
    outcomes = Outcomes(connections, store)
    live = LiveFlows()
    budget = BufferBudget()
    gate = AuditGate(audit, store)
    policy = Policy(store, connections)
    counts = ConnectionCounts()
    fast = FastConnect(store, gate, policy, outcomes, interception, counts)
    sessions = UpstreamSessions(connections)
    metrics = Metrics(store, audit, interception, budget, fast, counts, sessions)
    alerts = Alerts(store, audit)
    outcomes.add_sink(audit.on_outcome)
    outcomes.add_sink(metrics.on_outcome)
    outcomes.add_sink(alerts.on_outcome)
    revocation = Revocation(store, connections, outcomes.emit, live)  # no hooks: a reload listener (after audit's)
    revocation.add_tunnel_source(fast.open_tunnels)

    def audit_open_tunnels() -> None:  # at shutdown, before the audit log closes
        for client, _, tunnel in connections.open_tunnels():
            if tunnel.passthrough:
                splicing.revoke(client)  # a kernel relay's counts, folded into its tunnel now
        outcomes.audit_open_tunnels(SHUTDOWN_ERROR)
    audit.closing_listeners.append(audit_open_tunnels)
    parts = [
        store,
        fast,  # before audit: its `done` writes the records of the tunnels it still holds
        audit,
        Identity(store, connections),
        ConnectionLimits(store, connections, counts, fast.active, audit),  # right after Identity: who holds how many
        gate,
        policy,
        BodyPlanner(budget),
        Credentials(connections, DecodeMeter()),
        Mcp(store, outcomes),  # after Credentials: wraps its response redactor stream (see stages/mcp.py)
        WebSockets(),
        live,  # after every stage that installs a request stream: wraps it
        interception,
        UpstreamGuard(connections),
        sessions,  # read by runtime/master's ResumingTlsConfig
        outcomes,
        metrics,
        alerts,
        revocation,
        Admin(store, audit, alerts),
        LeftOpenSockets(),  # last: after every part that records the disconnect
    ]
    return parts, metrics.hook_error


def _dispatcher(name: str, handlers: list[Callable[..., Any]]) -> Callable[..., Any]:
    if any(inspect.iscoroutinefunction(h) for h in handlers):
        async def dispatch_async(*args: Any) -> None:
            for handler in handlers:
                result = handler(*args)
                if inspect.isawaitable(result):
                    await result
        dispatch_async.__name__ = name
        return dispatch_async

    def dispatch(*args: Any) -> None:
        for handler in handlers:
            handler(*args)
    dispatch.__name__ = name
    return dispatch


class WardenAddon:
    """The Warden chain as a single mitmproxy addon: each hook calls the parts' handlers in
    chain order. Flow and connection handlers are wrapped with `fail_closed`, so one part's
    exception denies the flow and does not reach mitmproxy; a lifecycle error (e.g. invalid
    rules at start) propagates to mitmproxy as before."""

    def __init__(self, parts: list[Any], on_error: HookErrorCallback | None = None) -> None:
        self.parts = parts
        self.hooks: dict[str, list[Callable[..., Any]]] = {}
        for name in sorted(hooks.all_hooks):
            handlers = [getattr(part, name) for part in parts if callable(getattr(part, name, None))]
            if not handlers:
                continue
            if name not in LIFECYCLE_HOOKS:
                handlers = [fail_closed(h, on_error, name) for h in handlers]
            self.hooks[name] = handlers
            setattr(self, name, _dispatcher(name, handlers))


def build_addon() -> WardenAddon:
    parts, on_error = build_chain()
    return WardenAddon(parts, on_error)
