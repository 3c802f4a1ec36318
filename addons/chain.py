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

Later stages read what earlier ones wrote into the flow's FlowRecord; none writes back.
"""

from __future__ import annotations

from typing import Any

from .alerts import Alerts
from .audit import Audit, AuditGate
from .credentials import Credentials
from .flowstate import Connections
from .identity import Identity
from .interception import Interception
from .mcp import Mcp
from .metrics import Metrics
from .outcome import Outcomes
from .policy import Policy
from .rulestore import RuleStore
from .upstream import UpstreamGuard


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
        Mcp(store, outcomes),  # after Credentials: wraps its response redactor stream (see addons/mcp.py)
        interception,
        UpstreamGuard(connections),
        outcomes,
        metrics,
        alerts,
    ]
