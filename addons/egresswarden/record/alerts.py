"""Alerts addon: real-time webhook alerts, never in the way of traffic.

Which outcomes raise which alert kind:
    deny          any denied connect/request/MCP call (except the kinds below)
    ssrf          reason private_address
    auth_failure  reasons auth_required / auth_failed / source_not_allowed
    secret_leak   reason secret_leak, or a "secret_leak" event on the flow
    mcp_deny      a denied MCP message, or an "mcp_deny" event
    tool_changed  an MCP tool definition changed after approval ("tool_changed" event)
    reload_failed a rule change that failed validation (the old rules stay in force)
    audit_failure the audit log cannot be written

One outcome raises at most one alert, the most specific kind first: secret_leak,
tool_changed, ssrf, auth_failure, mcp_deny, deny.

Each sink (settings.alerts) chooses its kinds. Delivery runs in one thread per sink with a
bounded queue: retries with exponential backoff, deduplication per (kind, agent, reason,
rule, destination) within `dedup_window_seconds`, where the destination is host and port,
plus MCP server and tool, so ten denied hosts are ten alerts; at most `max_per_minute`
deliveries. The webhook is called directly (proxy variables ignored), never through Warden
itself. A sink never dies: any exception in a delivery (a broken status line, a TLS error,
a timeout) is retried, then counted in `warden_alerts_failed_total{sink}`, logged with the
sink id and the exception class (never the URL or header values), and audited as an
`alert_failed` record. Payload: JSON with `text` (a one-line summary a human reads at a
glance; Slack-compatible sinks show it), `kind` and the full audit `record`. Every alert
raised is also written to the audit log as an `alert` event whose `sinks` lists the sinks it
was queued for (delivery failures follow as `alert_failed`).

Thread model: `raise_alert`, `on_outcome`, `on_reload` and the audit-failure listener all
run on the event loop (audit failures are forwarded there by the Audit addon), and hold
`_lock` anyway while they touch dedup and rate state. Sink threads only read their own
queue, and write to the audit log through `Audit.emit` (a non-blocking queue put). No path
calls back into the audit writer from inside it, so an audit failure cannot recurse.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import queue
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from egresswarden.core.decision import Reason, Verdict
from egresswarden.core.errors import SecretError
from egresswarden.core.model import AlertSink
from egresswarden.core.secrets import render
from egresswarden.record.audit import Audit, outcome_record
from egresswarden.record.metrics import registry
from egresswarden.record.outcome import Outcome
from egresswarden.record.redaction import scrub_record
from egresswarden.runtime.rulestore import ReloadEvent, RuleStore

QUEUE_SIZE = 1000
_AUTH = {Reason.AUTH_REQUIRED, Reason.AUTH_FAILED, Reason.SOURCE_NOT_ALLOWED}
_PRIORITY = ("secret_leak", "tool_changed", "ssrf", "auth_failure", "mcp_deny", "deny")
logger = logging.getLogger("warden")


def alert_kinds(o: Outcome) -> list[str]:
    """The alert kind an outcome raises: none or exactly one, the most specific."""
    kinds = {e for e in o.events if e in ("secret_leak", "mcp_deny", "tool_changed")}
    d = o.decision
    if o.event == "request" and o.mcp_audited:
        # the HTTP request that carried MCP messages: each message has its own `mcp` outcome,
        # with server and tool, which raises the alert; this one would be a second copy
        kinds -= {"mcp_deny", "tool_changed"}
        if d is not None and d.reason.value.startswith("mcp_"):
            d = None
    if d is not None and d.verdict is Verdict.DENY:
        if d.reason is Reason.SECRET_LEAK:
            kinds.add("secret_leak")
        elif d.reason is Reason.PRIVATE_ADDRESS:
            kinds.add("ssrf")
        elif d.reason in _AUTH:
            kinds.add("auth_failure")
        elif o.event == "mcp" or "mcp_deny" in kinds:
            kinds.add("mcp_deny")
        else:
            kinds.add("deny")
    return [k for k in _PRIORITY if k in kinds][:1]


def dedup_key(kind: str, record: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two alerts the same event: who, why, and where to (host, port, MCP tool)."""
    return (kind, record.get("agent") or record.get("agent_claimed"), record.get("reason"), record.get("rule_id"),
            record.get("host"), record.get("port"), record.get("mcp_server"),
            record.get("mcp_tool") or record.get("mcp_resource") or record.get("mcp_prompt"),
            tuple(record.get("mcp_changed_tools") or ()) if kind == "tool_changed" else None,
            record.get("error") if kind in ("reload_failed", "audit_failure") else None)


def _first_lines(text: str, n: int = 3, width: int = 300) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    out = "; ".join(lines[:n])
    if len(lines) > n:
        out += f" (+{len(lines) - n} more)"
    return out[:width]


def summary(kind: str, record: dict[str, Any]) -> str:
    """One line a human on call reads at a glance."""
    if kind == "reload_failed":
        return (f"[warden] reload_failed: the rule change was rejected, version {record.get('policy_version')} "
                f"stays in force: {_first_lines(record.get('error') or 'unknown error')}")
    if kind == "audit_failure":
        return (f"[warden] audit_failure: {record.get('error') or 'audit log not writable'}; Warden refuses new "
                f"traffic until the log is writable again")
    who = record.get("agent") or record.get("agent_claimed") or "unauthenticated client"
    target = record.get("host") or ""
    if record.get("port"):
        target += f":{record['port']}"
    if kind == "tool_changed":
        tools = record.get("mcp_changed_tools") or ([record["mcp_tool"]] if record.get("mcp_tool") else [])
        parts = record.get("mcp_changed_parts") or {}

        def described(tool: object) -> str:
            changed = [p for p in parts.get(str(tool), ()) if p != "unknown"]
            return f"{tool} ({', '.join(changed)} changed)" if changed else str(tool)
        names = ", ".join(described(t) for t in tools[:10]) or "a tool"
        return (f"[warden] tool_changed: MCP server {record.get('mcp_server') or target} changed the definition of "
                f"{names} since it was pinned (a pin covers name, description, input/output schema and annotations); "
                f"seen by agent {who}. Calls are denied until it is reviewed and re-pinned with `warden mcp pin`.")
    what = " ".join(str(x) for x in (record.get("method"), target, record.get("path") or "") if x).strip()
    if record.get("mcp_server"):
        item = record.get("mcp_tool") or record.get("mcp_resource") or record.get("mcp_prompt") or ""
        what = f"MCP {record['mcp_server']} {record.get('mcp_method') or ''} {item}".strip()
    reason = record.get("reason") or record.get("error") or ""
    rule = f" (rule {record['rule_id']})" if record.get("rule_id") else ""
    return f"[warden] {kind}: {who} {what} -> {reason}{rule}".strip()


def _cause(e: BaseException) -> str:
    """What went wrong, without the URL, its query or header values."""
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        inner = e.reason
        return f"URLError({inner.__class__.__name__})" if isinstance(inner, BaseException) else "URLError"
    return e.__class__.__name__


class _SinkWorker:
    """Delivers alerts to one webhook from its own thread."""

    def __init__(self, sink: AlertSink, headers: dict[str, str], audit: Audit | None = None) -> None:
        self.sink = sink
        self.audit = audit
        self.headers = {"Content-Type": "application/json", "User-Agent": "warden-alerts", **headers}
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self.sent_times: deque[float] = deque()
        self.last_sent: dict[tuple[Any, ...], float] = {}
        context = ssl.create_default_context(cafile=sink.ca_file) if sink.ca_file else ssl.create_default_context()
        # ProxyHandler({}): never route alerts through HTTP(S)_PROXY, i.e. never through Warden.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPSHandler(context=context))
        self.thread = threading.Thread(target=self._run, name=f"warden-alerts-{sink.id}", daemon=True)
        self.thread.start()

    def offer(self, kind: str, key: tuple[Any, ...], payload: dict[str, Any]) -> str | None:
        """Queue an alert unless suppressed; returns the suppression cause, if any."""
        if kind not in self.sink.events:
            return "not_subscribed"
        now = time.monotonic()
        if len(self.last_sent) > 10000:  # bounded memory: forget keys older than the window
            self.last_sent = {k: t for k, t in self.last_sent.items() if now - t < self.sink.dedup_window_seconds}
        last = self.last_sent.get(key)
        if last is not None and now - last < self.sink.dedup_window_seconds:
            return "dedup"
        while self.sent_times and now - self.sent_times[0] > 60:
            self.sent_times.popleft()
        if len(self.sent_times) >= self.sink.max_per_minute:
            return "rate_limit"
        try:
            self.queue.put_nowait(payload)
        except queue.Full:
            return "queue_full"
        self.last_sent[key] = now
        self.sent_times.append(now)
        return None

    def stop(self) -> None:
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(None)

    def _run(self) -> None:
        while True:
            payload = self.queue.get()
            if payload is None:
                return
            try:
                self._deliver(payload)
            except Exception as e:  # never let the thread die: the next alert must still go out
                logger.error(f"warden: alert sink {self.sink.id}: internal error {e.__class__.__name__}")

    def _deliver(self, payload: dict[str, Any]) -> None:
        metrics = registry()
        body = json.dumps(payload, default=str).encode()
        delay = 0.5
        for attempt in range(self.sink.max_retries + 1):
            try:
                request = urllib.request.Request(self.sink.url, data=body, headers=self.headers, method="POST")
                with self.opener.open(request, timeout=self.sink.timeout_seconds) as response:
                    response.read(1024)
                metrics.alerts_sent.labels(self.sink.id).inc()
                return
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                cause = _cause(e)
            if attempt < self.sink.max_retries:
                time.sleep(delay)
                delay = min(delay * 2, 30)
        metrics.alerts_failed.labels(self.sink.id).inc()
        logger.error(f"warden: alert sink {self.sink.id} failed after {self.sink.max_retries + 1} attempts: {cause}")
        if self.audit is not None:
            self.audit.emit({"event": "alert_failed", "kind": payload.get("kind"), "sink": self.sink.id,
                             "error": cause, "request_id": payload.get("record", {}).get("request_id")})


class Alerts:
    def __init__(self, store: RuleStore, audit: Audit) -> None:
        self.store = store
        self.audit = audit
        self.workers: dict[str, _SinkWorker] = {}
        self._config: tuple[Any, ...] = ()
        self._lock = threading.Lock()
        store.add_listener(self.on_reload)
        audit.failure_listeners.append(self._audit_failed)

    def running(self) -> None:
        self._configure_sinks()

    def done(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    def _configure_sinks(self) -> None:
        rules = self.store.current
        sinks = rules.settings.alerts if rules else ()
        secrets_dir = rules.settings.secrets_dir if rules else None
        if secrets_dir and rules is not None and not Path(secrets_dir).is_absolute():
            secrets_dir = str(Path(rules.model.rules_dir) / secrets_dir)
        rendered: dict[str, dict[str, str] | SecretError] = {}
        for sink in sinks:
            try:
                rendered[sink.id] = {name: render(template, secrets_dir)[0] for name, template in sink.headers}
            except SecretError as e:
                rendered[sink.id] = e
        # compare rendered headers too: a rotated webhook token must reach the sink
        config = tuple((sink, tuple(sorted(h.items())) if isinstance(h, dict) else str(h))
                       for sink in sinks for h in [rendered[sink.id]])
        if config == self._config:
            return
        with self._lock:
            for worker in self.workers.values():
                worker.stop()
            self.workers = {}
            for sink in sinks:
                headers = rendered[sink.id]
                if isinstance(headers, SecretError):
                    logger.error(f"warden: alert sink {sink.id} disabled: {headers}")
                    continue
                self.workers[sink.id] = _SinkWorker(sink, headers, self.audit)
            self._config = config

    def raise_alert(self, kind: str, record: dict[str, Any]) -> None:
        if not self.workers:
            return
        key = dedup_key(kind, record)
        record = scrub_record(self.store.current, record)  # no secret or placeholder leaves in an alert
        text = summary(kind, record)
        payload = {"text": text, "kind": kind, "record": record}
        queued_for = []
        metrics = registry()
        with self._lock:
            for sink_id, worker in self.workers.items():
                cause = worker.offer(kind, key, payload)
                if cause is None:
                    queued_for.append(sink_id)
                elif cause != "not_subscribed":
                    metrics.alerts_suppressed.labels(cause).inc()
        if queued_for:
            self.audit.emit({"event": "alert", "kind": kind, "summary": text, "sinks": queued_for,
                             "request_id": record.get("request_id"), "agent": record.get("agent")})

    def on_outcome(self, o: Outcome) -> None:
        if not self.workers:
            return
        kinds = alert_kinds(o)
        if kinds:
            record = outcome_record(o)
            for kind in kinds:
                self.raise_alert(kind, record)

    def on_reload(self, event: ReloadEvent) -> None:
        if event.ok:
            self._configure_sinks()
        else:
            self.raise_alert("reload_failed", {"event": "reload", "result": "failure",
                                               "policy_version": event.version, "error": event.error})

    def _audit_failed(self, message: str) -> None:
        self.raise_alert("audit_failure", {"event": "audit_failure", "error": message})
