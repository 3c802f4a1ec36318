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

Each sink (settings.alerts) chooses its kinds. Delivery runs in one thread per sink with a
bounded queue: retries with exponential backoff, deduplication per (kind, agent, reason,
rule) within `dedup_window_seconds`, at most `max_per_minute` deliveries. The webhook is
called directly (proxy variables ignored), never through Warden itself. A dead sink only
shows in metrics (`warden_alerts_failed_total`) and on stderr. Payload: JSON with `text`
(a one-line summary, so Slack-compatible sinks show something readable), `kind` and the
full audit `record`. Every alert raised is also written to the audit log as an `alert` event.
"""

from __future__ import annotations

import contextlib
import json
import queue
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
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


def alert_kinds(o: Outcome) -> list[str]:
    """The alert kinds an outcome raises (usually zero or one)."""
    kinds = [e for e in o.events if e in ("secret_leak", "mcp_deny", "tool_changed")]
    d = o.decision
    if d is None or d.verdict is not Verdict.DENY:
        return kinds
    if d.reason is Reason.SECRET_LEAK:
        kind = "secret_leak"
    elif d.reason is Reason.PRIVATE_ADDRESS:
        kind = "ssrf"
    elif d.reason in _AUTH:
        kind = "auth_failure"
    elif o.event == "mcp":
        kind = "mcp_deny"
    else:
        kind = "deny"
    if kind not in kinds:
        kinds.append(kind)
    return kinds


def summary(kind: str, record: dict[str, Any]) -> str:
    who = record.get("agent") or record.get("agent_claimed") or "unauthenticated client"
    target = record.get("host") or ""
    if record.get("port"):
        target += f":{record['port']}"
    what = " ".join(str(x) for x in (record.get("method"), target, record.get("path") or "") if x).strip()
    reason = record.get("reason") or record.get("error") or ""
    rule = f" (rule {record['rule_id']})" if record.get("rule_id") else ""
    return f"[warden] {kind}: {who} {what} -> {reason}{rule}".strip()


class _SinkWorker:
    """Delivers alerts to one webhook from its own thread."""

    def __init__(self, sink: AlertSink, headers: dict[str, str]) -> None:
        self.sink = sink
        self.headers = {"Content-Type": "application/json", "User-Agent": "warden-alerts", **headers}
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self.sent_times: deque[float] = deque()
        self.last_sent: dict[tuple, float] = {}
        context = ssl.create_default_context(cafile=sink.ca_file) if sink.ca_file else ssl.create_default_context()
        # ProxyHandler({}): never route alerts through HTTP(S)_PROXY, i.e. never through Warden.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPSHandler(context=context))
        self.thread = threading.Thread(target=self._run, name=f"warden-alerts-{sink.id}", daemon=True)
        self.thread.start()

    def offer(self, kind: str, key: tuple, payload: dict[str, Any]) -> str | None:
        """Queue an alert unless suppressed; returns the suppression cause, if any."""
        if kind not in self.sink.events:
            return "not_subscribed"
        now = time.monotonic()
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
        metrics = registry()
        while True:
            payload = self.queue.get()
            if payload is None:
                return
            body = json.dumps(payload, default=str).encode()
            delay = 0.5
            for attempt in range(self.sink.max_retries + 1):
                try:
                    request = urllib.request.Request(self.sink.url, data=body, headers=self.headers, method="POST")
                    with self.opener.open(request, timeout=self.sink.timeout_seconds) as response:
                        response.read(1024)
                    metrics.alerts_sent.labels(self.sink.id).inc()
                    break
                except (urllib.error.URLError, OSError, ValueError) as e:
                    if attempt == self.sink.max_retries:
                        metrics.alerts_failed.labels(self.sink.id).inc()
                        print(f"warden: alert sink {self.sink.id} failed after {attempt + 1} attempts: "
                              f"{e.__class__.__name__}", file=sys.stderr, flush=True)
                    else:
                        time.sleep(delay)
                        delay = min(delay * 2, 30)


class Alerts:
    def __init__(self, store: RuleStore, audit: Audit) -> None:
        self.store = store
        self.audit = audit
        self.workers: dict[str, _SinkWorker] = {}
        self._config: tuple = ()
        store.add_listener(self.on_reload)

    def running(self) -> None:
        self._configure_sinks()
        if self.audit.writer is not None:
            self.audit.writer.failure_listeners.append(self._audit_failed)

    def done(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    def _configure_sinks(self) -> None:
        rules = self.store.current
        sinks = rules.settings.alerts if rules else ()
        secrets_dir = rules.settings.secrets_dir if rules else None
        config = tuple(sinks)
        if config == self._config:
            return
        for worker in self.workers.values():
            worker.stop()
        self.workers = {}
        for sink in sinks:
            try:
                headers = {name: render(template, secrets_dir)[0] for name, template in sink.headers}
            except SecretError as e:
                print(f"warden: alert sink {sink.id} disabled: {e}", file=sys.stderr, flush=True)
                continue
            self.workers[sink.id] = _SinkWorker(sink, headers)
        self._config = config

    def raise_alert(self, kind: str, record: dict[str, Any]) -> None:
        if not self.workers:
            return
        key = (kind, record.get("agent") or record.get("agent_claimed"), record.get("reason"), record.get("rule_id"))
        record = scrub_record(self.store.current, record)  # no secret or placeholder leaves in an alert
        text = summary(kind, record)
        payload = {"text": text, "kind": kind, "record": record}
        delivered_to = []
        metrics = registry()
        for sink_id, worker in self.workers.items():
            cause = worker.offer(kind, key, payload)
            if cause is None:
                delivered_to.append(sink_id)
            elif cause != "not_subscribed":
                metrics.alerts_suppressed.labels(cause).inc()
        if delivered_to:
            self.audit.emit({"event": "alert", "kind": kind, "summary": text, "sinks": delivered_to,
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
