"""The Warden addon chain, in one place. Data flows one way, in this order:

    RuleStore        loads and hot-reloads the rules (configure runs first)
    Audit            opens the audit log (configure), receives Outcomes and lifecycle events
    Identity         who is calling (407 if nobody)
    AuditGate        503 while the audit log cannot be written (fail closed)
    Policy           CONNECT and request decisions, name resolution and address checks
    Mcp              MCP JSON-RPC decisions (tool catalog, arguments, pins), list filtering
    Interception     passthrough (counted raw relay) or TLS interception, SNI check
    UpstreamGuard    pins each upstream connection to the checked address
    Outcomes         turns finished flows into Outcomes for audit, metrics (and alerts)
    Metrics          Prometheus + /healthz
    Alerts           webhook alerts, off the traffic path
    Admin            the `warden sandbox` admin socket: sandbox sessions and their audit records

Later stages read what earlier ones wrote into the flow's FlowRecord; none writes back.

mitmproxy sees the chain as ONE addon (`WardenAddon`). mitmproxy dispatches every event to
every addon in its list (a safecall context, a traverse and a getattr per addon, and a
second pass for the `update` event after each flow event), whether or not the addon has a
handler. With the concerns registered one by one that cost ~0.35 ms of CPU per proxied
request, most of Warden's overhead over bare mitmproxy; one addon that calls only the
handlers that exist costs one dispatch per event.
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
from egresswarden.runtime.admin import Admin
from egresswarden.runtime.context import Connections
from egresswarden.runtime.rulestore import RuleStore
from egresswarden.stages.credentials import Credentials
from egresswarden.stages.identity import Identity
from egresswarden.stages.interception import Interception
from egresswarden.stages.mcp import Mcp
from egresswarden.stages.policy import Policy
from egresswarden.stages.upstream import UpstreamGuard


def build_chain() -> list[Any]:
    store = RuleStore()
    connections = Connections()
    audit = Audit(store)
    interception = Interception(connections)
    outcomes = Outcomes(connections, interception)
    metrics = Metrics(store, audit, interception)
    alerts = Alerts(store, audit)
    outcomes.add_sink(audit.on_outcome)
    outcomes.add_sink(metrics.on_outcome)
    outcomes.add_sink(alerts.on_outcome)
    return [
        store,
        audit,
        Identity(store, connections),
        AuditGate(audit, store),
        Policy(store, connections),
        Credentials(store, connections),
        Mcp(store, outcomes),  # after Credentials: wraps its response redactor stream (see stages/mcp.py)
        interception,
        UpstreamGuard(connections),
        outcomes,
        metrics,
        alerts,
        Admin(store, audit, alerts),
    ]


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
    chain order. Flow hooks of the parts are `fail_closed`, so one part's exception denies
    the flow and does not reach mitmproxy; a lifecycle error (e.g. invalid rules at start)
    propagates to mitmproxy as before."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.hooks: dict[str, list[Callable[..., Any]]] = {}
        for name in sorted(hooks.all_hooks):
            handlers = [getattr(part, name) for part in parts if callable(getattr(part, name, None))]
            if handlers:
                self.hooks[name] = handlers
                setattr(self, name, _dispatcher(name, handlers))


def build_addon() -> WardenAddon:
    return WardenAddon(build_chain())
