"""The Warden addon chain, in one place. Data flows one way, in this order:

    RuleStore        loads and hot-reloads the rules (configure runs first)
    Audit            opens the audit log (configure), receives Outcomes and lifecycle events
    Identity         who is calling (407 if nobody)
    AuditGate        503 while the audit log cannot be written (fail closed)
    Policy           CONNECT and request decisions, name resolution and address checks
    Interception     passthrough (counted raw relay) or TLS interception, SNI check
    UpstreamGuard    pins each upstream connection to the checked address
    Outcomes         turns finished flows into Outcomes for audit, metrics (and alerts)
    Metrics          Prometheus + /healthz

Later stages read what earlier ones wrote into the flow's FlowRecord; none writes back.
"""

from __future__ import annotations

from typing import Any

from .audit import Audit, AuditGate
from .flowstate import Connections
from .identity import Identity
from .interception import Interception
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
    outcomes.add_sink(audit.on_outcome)
    outcomes.add_sink(metrics.on_outcome)
    return [
        store,
        audit,
        Identity(store, connections),
        AuditGate(audit, store),
        Policy(store, connections),
        interception,
        UpstreamGuard(connections),
        outcomes,
        metrics,
    ]
