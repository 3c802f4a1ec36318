"""Metrics addon: Prometheus metrics, /livez, /readyz (and /healthz) on their own listener.

The listener is `runtime.probes.ProbeServer` (bounded threads, timeouts). Liveness is an
event-loop heartbeat: a task ticks every `HEARTBEAT_SECONDS`; /livez fails once no tick came
for `LIVENESS_STALL_SECONDS` (a wedged loop serves nobody: restart it). Readiness is rules
loaded and audit log writable: an audit failure stops traffic (503 to agents, /readyz 503)
without getting the pod restarted, which would lose the records still queued.

Metric objects live in one process-wide registry created once (`registry()`): a mitmproxy
script reload or a second addon instance reuses them instead of raising duplicate-timeseries
errors. Labels are bounded: agent ids, rule ids, credential ids and reason codes come from
the rule files and the code, never a raw host, path or client address. An unauthenticated
client is counted as agent "-".
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitmproxy import ctx, exceptions
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from egresswarden.core.decision import Reason
from egresswarden.record import metric_names as N
from egresswarden.record.audit import Audit
from egresswarden.record.outcome import Outcome
from egresswarden.runtime.budget import BufferBudget
from egresswarden.runtime.connlimits import ConnectionCounts
from egresswarden.runtime.probes import ProbeServer, Response, json_response
from egresswarden.runtime.rulestore import ReloadEvent, RuleStore
from egresswarden.stages.interception import Interception
from egresswarden.stages.upstream_tls import UpstreamSessions

if TYPE_CHECKING:
    from egresswarden.runtime.fastconnect import FastConnect

NO_AGENT = "-"
HEARTBEAT_SECONDS = 1.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set for each worker by runtime/workers.py
LIVENESS_STALL_SECONDS = 10.0
_LATENCY_BUCKETS = (0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                    0.025, 0.05, 0.1)
_UPSTREAM_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class WardenMetrics:
    registry: CollectorRegistry
    requests: Counter
    connects: Counter
    bytes: Counter
    decision_duration: Histogram
    upstream_duration: Histogram
    active_tunnels: Gauge
    rules_loaded: Gauge
    policy_info: Gauge
    reloads: Counter
    last_reload_success: Gauge
    audit_queue_depth: Gauge
    audit_write_failures: Counter
    audit_records: Counter
    audit_healthy: Gauge
    alerts_sent: Counter
    alerts_failed: Counter
    alerts_suppressed: Counter
    credentials_injected: Counter
    secret_leaks: Counter
    ssrf_refusals: Counter
    auth_failures: Counter
    mcp_calls: Counter
    hook_errors: Counter
    tunnels_revoked: Counter
    probe_refused: Counter
    buffered_request_bytes: Gauge
    front_door: Counter
    client_connections: Gauge
    max_connections: Gauge
    agent_connections: Gauge
    connections_refused: Counter
    upstream_tls_handshakes: Counter


@lru_cache(maxsize=1)
def registry() -> WardenMetrics:
    """The process-wide metric set, created on first use and never again."""
    r = CollectorRegistry(auto_describe=True)
    dl = ("agent", "decision", "reason")
    return WardenMetrics(
        registry=r,
        requests=Counter(N.REQUESTS, "HTTP requests seen (intercepted or plain), by decision", dl, registry=r),
        connects=Counter(N.CONNECTS, "CONNECT requests, by decision", dl, registry=r),
        bytes=Counter(N.BYTES, "Body bytes relayed (tunnels: all bytes), by agent and direction",
                      ("agent", "direction"), registry=r),
        decision_duration=Histogram(N.DECISION_DURATION, "Policy engine time per decision", ("stage",),
                                    buckets=_LATENCY_BUCKETS, registry=r),
        upstream_duration=Histogram(N.UPSTREAM_DURATION, "Time from request to complete upstream response",
                                    buckets=_UPSTREAM_BUCKETS, registry=r),
        active_tunnels=Gauge(N.ACTIVE_TUNNELS, "Passthrough tunnels currently open", registry=r,
                             multiprocess_mode="livesum"),
        rules_loaded=Gauge(N.RULES_LOADED, "Allow and deny rules in the rule set in force", registry=r,
                           multiprocess_mode="livemax"),
        policy_info=Gauge(N.POLICY_INFO, "The policy version in force (1; 0 for versions replaced)", ("version",),
                          registry=r, multiprocess_mode="livemax"),
        reloads=Counter(N.RELOADS, "Rule reload attempts by result", ("result",), registry=r),
        last_reload_success=Gauge(N.LAST_RELOAD_SUCCESS, "Unix time of the last successful rule load", registry=r,
                                  multiprocess_mode="livemax"),
        audit_queue_depth=Gauge(N.AUDIT_QUEUE_DEPTH, "Audit records waiting to be written", registry=r,
                                multiprocess_mode="livesum"),
        audit_write_failures=Counter(N.AUDIT_WRITE_FAILURES, "Failed audit writes (each retried)", registry=r),
        audit_records=Counter(N.AUDIT_RECORDS, "Audit records written", registry=r),
        audit_healthy=Gauge(N.AUDIT_HEALTHY, "1 if the audit log is writable, else 0", registry=r,
                            multiprocess_mode="livemin"),
        alerts_sent=Counter(N.ALERTS_SENT, "Alerts delivered, by sink", ("sink",), registry=r),
        alerts_failed=Counter(N.ALERTS_FAILED, "Alerts given up after retries, by sink", ("sink",), registry=r),
        alerts_suppressed=Counter(N.ALERTS_SUPPRESSED, "Alerts not sent, by cause", ("cause",), registry=r),
        credentials_injected=Counter(N.CREDENTIALS_INJECTED, "Credential injections, by credential id",
                                     ("credential",), registry=r),
        secret_leaks=Counter(N.SECRET_LEAKS, "Requests denied for carrying a secret elsewhere", ("agent",), registry=r),
        ssrf_refusals=Counter(N.SSRF_REFUSALS, "Connections refused by the SSRF guard", ("agent",), registry=r),
        auth_failures=Counter(N.AUTH_FAILURES, "Failed proxy authentications, by reason", ("reason",), registry=r),
        mcp_calls=Counter(N.MCP_CALLS, "MCP messages decided", ("agent", "server", "decision", "reason"), registry=r),
        hook_errors=Counter(N.HOOK_ERRORS, "Exceptions in Warden hooks (each denied its flow)", ("hook",), registry=r),
        tunnels_revoked=Counter(N.TUNNELS_REVOKED, "Open tunnels closed because a reload no longer allows them",
                                ("agent", "reason"), registry=r),
        probe_refused=Counter(N.PROBE_REFUSED, "Metrics/health connections closed at once: too many open",
                              registry=r),
        buffered_request_bytes=Gauge(N.BUFFERED_REQUEST_BYTES,
                                     "Request-body bytes held in memory now, by agent (see max_buffered_bytes_per_agent)",
                                     ("agent",), registry=r, multiprocess_mode="livesum"),
        front_door=Counter(N.FRONT_DOOR, "Client connections on warden run's listener, by path: fast (an allowed "
                           "passthrough tunnel kept off mitmproxy), mitmproxy (handed over), head_timeout (closed: no "
                           "request head in time), head_too_large (431), no_head (closed by the client before a head), evicted "
                           "(closed without a head, to make room at warden_max_connections)", ("path",), registry=r),
        client_connections=Gauge(N.CLIENT_CONNECTIONS, "Client connections open now", registry=r,
                                 multiprocess_mode="livesum"),
        max_connections=Gauge(N.MAX_CONNECTIONS, "Client connections one process holds at most (warden_max_connections)",
                              registry=r, multiprocess_mode="livesum"),
        agent_connections=Gauge(N.AGENT_CONNECTIONS, "Client connections counted toward each agent's limit "
                                "(settings.limits.max_connections_per_agent)", ("agent",), registry=r,
                                multiprocess_mode="livesum"),
        connections_refused=Counter(N.CONNECTIONS_REFUSED, "Client connections refused by a connection limit: "
                                    "process (503 at accept) or agent (429 on its CONNECT or first request)",
                                    ("limit",), registry=r),
        upstream_tls_handshakes=Counter(N.UPSTREAM_TLS_HANDSHAKES, "Completed TLS handshakes towards upstreams, by "
                                        "whether a session was resumed (warden_upstream_tls_resumption)",
                                        ("resumed",), registry=r),
    )


def _split_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class Metrics:
    def __init__(self, store: RuleStore, audit: Audit, interception: Interception,
                 budget: BufferBudget | None = None, front_door: FastConnect | None = None,
                 counts: ConnectionCounts | None = None, sessions: UpstreamSessions | None = None) -> None:
        self.store = store
        self.sessions = sessions
        self.counts = counts
        self._counted_agents: set[str] = set()  # agents with an agent_connections series
        self.front_door = front_door
        self.audit = audit
        self.interception = interception
        self.budget = budget
        self._buffering_agents: set[str] = set()  # agents with a buffered_request_bytes series
        self.metrics = registry()
        self.server: ProbeServer | None = None
        self._shown_version: str | None = None
        self.heartbeat = time.monotonic()
        self._heartbeat_task: asyncio.Task[None] | None = None
        store.add_listener(self.on_reload)

    def hook_error(self, hook: str) -> None:
        """The chain's fail-closed callback: one count per swallowed hook exception."""
        self.metrics.hook_errors.labels(hook=hook).inc()

    def load(self, loader: Any) -> None:
        loader.add_option("warden_metrics_listen", str, "127.0.0.1:9464",
                          "HOST:PORT for /metrics and /healthz; empty disables the listener.")
        loader.add_option("warden_metrics_port_file", str, "",
                          "Write the metrics listener's port to this file once bound (for port 0).")

    def configure(self, updated: set[str]) -> None:
        if "warden_metrics_listen" in updated:
            self._stop()
            listen = ctx.options.warden_metrics_listen
            if listen:
                try:
                    self.server = ProbeServer(_split_listen(listen), self.routes())
                except (OSError, ValueError) as e:
                    raise exceptions.OptionsError(f"warden: cannot listen for metrics on {listen}: {e}") from None
                self.server.start("warden-metrics")
                if ctx.options.warden_metrics_port_file:
                    Path(ctx.options.warden_metrics_port_file).write_text(str(self.server.server_address[1]))
        if self.store.current is not None:
            self._set_rules_gauges(self.store.current.version, self.store.current.rule_count)

    def running(self) -> None:
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        # A worker (--workers N) is never scraped itself: the supervisor merges the workers'
        # metric files, so the gauges sampled at scrape time are sampled here (red team 18: the
        # merged connection and tunnel gauges read 0).
        worker = bool(os.environ.get(MULTIPROC_ENV))
        while True:
            self.heartbeat = time.monotonic()
            if worker:
                self.refresh()
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def done(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            self._heartbeat_task = None
        self._stop()

    def _stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def routes(self) -> dict[str, Callable[[], Response]]:
        def metrics() -> Response:
            self.refresh()
            return 200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST

        def ready() -> Response:
            return json_response(*self.health())

        def live() -> Response:
            return json_response(*self.liveness())

        return {"/metrics": metrics, "/readyz": ready, "/healthz": ready, "/livez": live}

    def liveness(self) -> tuple[int, dict[str, Any]]:
        lag = time.monotonic() - self.heartbeat
        ok = lag < LIVENESS_STALL_SECONDS
        return (200 if ok else 503), {"status": "ok" if ok else "stalled", "loop_lag_seconds": round(lag, 3)}

    def refresh(self) -> None:
        """Gauges sampled at scrape time."""
        m = self.metrics
        writer = self.audit.writer
        m.active_tunnels.set(self.interception.active_tunnels)
        if writer is not None:
            m.audit_queue_depth.set(writer.depth)
            m.audit_healthy.set(1 if writer.healthy else 0)
            # counters mirror the writer's own totals (it runs in another thread)
            self._sync_counter(m.audit_records, writer.stats.written)
            self._sync_counter(m.audit_write_failures, writer.stats.write_failures)
        if self.server is not None:
            self._sync_counter(m.probe_refused, self.server.refused)
        door = self.front_door
        if door is not None:
            for path, total in (("fast", door.fast_tunnels), ("mitmproxy", door.handed_over),
                                ("head_timeout", door.head_timeouts), ("head_too_large", door.heads_refused),
                                ("no_head", door.no_head)):
                self._sync_counter(m.front_door.labels(path=path), total)
        counts = self.counts
        if counts is not None:
            m.client_connections.set(counts.open_clients())
            m.max_connections.set(counts.max_connections)
            for agent in self._counted_agents - counts.per_agent.keys():
                m.agent_connections.labels(agent=agent).set(0)
            for agent, held_now in counts.per_agent.items():
                m.agent_connections.labels(agent=agent).set(held_now)
            self._counted_agents |= counts.per_agent.keys()
            self._sync_counter(m.connections_refused.labels(limit="process"), counts.refused_process)
            self._sync_counter(m.connections_refused.labels(limit="agent"), counts.refused_agent)
            self._sync_counter(m.front_door.labels(path="evicted"), counts.evicted)
        if self.sessions is not None:
            self._sync_counter(m.upstream_tls_handshakes.labels(resumed="true"), self.sessions.resumed)
            self._sync_counter(m.upstream_tls_handshakes.labels(resumed="false"), self.sessions.full)
        if self.budget is not None:
            held = self.budget.snapshot()
            for agent in self._buffering_agents - held.keys():
                m.buffered_request_bytes.labels(agent=agent).set(0)
            for agent, nbytes in held.items():
                m.buffered_request_bytes.labels(agent=agent).set(nbytes)
            self._buffering_agents |= held.keys()

    @staticmethod
    def _sync_counter(counter: Counter, total: int) -> None:
        current = counter._value.get()  # noqa: SLF001 - prometheus_client has no public getter
        if total > current:
            counter.inc(total - current)

    def health(self) -> tuple[int, dict[str, Any]]:
        rules = self.store.current
        audit_ok = self.audit.healthy
        report = {
            "status": "ok" if rules is not None and audit_ok else "unhealthy",
            "rules_loaded": rules.rule_count if rules else 0,
            "policy_version": rules.version if rules else None,
            "audit_writable": audit_ok,
        }
        return (200 if report["status"] == "ok" else 503), report

    def _set_rules_gauges(self, version: str, count: int) -> None:
        m = self.metrics
        m.rules_loaded.set(count)
        # Set the replaced version to 0 rather than clear(): in multiprocess mode (--workers)
        # values live in per-process files that clear() does not reach.
        if self._shown_version is not None and self._shown_version != version:
            m.policy_info.labels(version=self._shown_version).set(0)
        m.policy_info.labels(version=version).set(1)
        self._shown_version = version
        m.last_reload_success.set(time.time())

    def on_reload(self, event: ReloadEvent) -> None:
        if event.initial and self.store.current is None:
            return
        result = ("success" if event.changed else "unchanged") if event.ok else "failure"
        self.metrics.reloads.labels(result=result).inc()
        if event.ok and event.version:
            self._set_rules_gauges(event.version, event.rule_count)

    def on_outcome(self, o: Outcome) -> None:
        m = self.metrics
        agent = o.agent or NO_AGENT
        d = o.decision
        decision = d.verdict.value if d else "none"
        reason = d.reason.value if d else "none"
        if o.event == "mcp" and o.mcp is not None:
            m.mcp_calls.labels(agent, o.mcp.server, decision, reason).inc()
            m.decision_duration.labels("mcp").observe(o.engine_seconds)
        elif o.event == "connect":
            m.connects.labels(agent, decision, reason).inc()
            m.decision_duration.labels("connect").observe(o.engine_seconds)
        elif o.event == "request":
            m.requests.labels(agent, decision, reason).inc()
            m.decision_duration.labels("request").observe(o.engine_seconds)
            if o.upstream_seconds is not None:
                m.upstream_duration.observe(o.upstream_seconds)
        elif o.event == "tunnel_revoked":
            m.tunnels_revoked.labels(agent, o.revocation if reason == "allowed" else reason).inc()
        if o.bytes_up:
            m.bytes.labels(agent, "up").inc(o.bytes_up)
        if o.bytes_down:
            m.bytes.labels(agent, "down").inc(o.bytes_down)
        if d is not None:
            if d.reason is Reason.PRIVATE_ADDRESS:
                m.ssrf_refusals.labels(agent).inc()
            elif d.reason in (Reason.AUTH_REQUIRED, Reason.AUTH_FAILED, Reason.SOURCE_NOT_ALLOWED):
                m.auth_failures.labels(o.auth_failure or d.reason.value).inc()
            elif d.reason is Reason.SECRET_LEAK:
                m.secret_leaks.labels(agent).inc()
        for credential in o.credentials:
            m.credentials_injected.labels(credential).inc()
