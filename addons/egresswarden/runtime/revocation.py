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
`needs_interception`, plus `revoke_ms`, the time from the swap of the rules to the close.
Runs on the event loop (reload listeners do), so it never races the relay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from egresswarden.core.decide import decide, decide_addresses
from egresswarden.core.decision import Decision, Interception
from egresswarden.core.facts import RequestFacts
from egresswarden.record.journal import utc_now
from egresswarden.record.outcome import Outcome
from egresswarden.runtime.context import Connections, ConnState, Tunnel, TunnelMode
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
    return decision, None


class Revocation:
    def __init__(self, store: RuleStore, connections: Connections, emit: OutcomeSink) -> None:
        self.store = store
        self.connections = connections
        self.emit = emit
        self.revoked = 0
        store.add_listener(self.on_reload)

    def on_reload(self, event: ReloadEvent) -> None:
        if event.initial or not event.ok or not event.changed:
            return
        started = time.perf_counter()
        rules = self.store.current
        if rules is None:
            return
        for client, state, tunnel in self.connections.open_tunnels():
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
            if close_client(client, abort=True):
                self.revoked += 1
                self._audit(state, tunnel, decision, cause, time.perf_counter() - started)

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
