"""Audit records and alerts of `warden mcp stdio`: the same `mcp` records as HTTP MCP, in a local chain.

Each record is built as an `Outcome` and turned into JSON by `record.audit.outcome_record`,
the function HTTP MCP records pass through, so field names cannot drift; stdio records add
`mcp_transport: "stdio"`, `mcp_session` (one id per `warden mcp stdio` process) and
`mcp_direction` (`client` for messages from the agent, `server` for messages from the server).

The log is hash-chained by `record.journal.AuditWriter`. One writer per file: the chain is
only valid with one appender, so a process takes an exclusive lock (`<file>.lock`, flock)
and, when another live session holds it, writes `<stem>-2<suffix>`, `-3`, ... instead
(`warden audit verify` checks each file). Alerts go through the sinks of settings.alerts
(the same delivery worker `warden run` uses), and every alert delivered is recorded as an
`alert` event, as `warden run` does.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import uuid
from pathlib import Path
from typing import IO, Any

from egresswarden.core.credentials import Scanner
from egresswarden.core.decision import Decision
from egresswarden.core.errors import SecretError
from egresswarden.core.ruleset import RuleSet
from egresswarden.core.secrets import render
from egresswarden.record.alerts import _SinkWorker, alert_kinds, summary
from egresswarden.record.audit import outcome_record
from egresswarden.record.journal import AuditWriter, utc_now
from egresswarden.record.outcome import McpFields, Outcome

MAX_LOCK_ATTEMPTS = 64


def default_audit_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "warden" / "mcp-stdio-audit.jsonl"


def _lock_file(path: Path) -> tuple[Path, IO[bytes]]:
    """Lock `path` (or the first free sibling) for this process; returns (path, lock handle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, MAX_LOCK_ATTEMPTS + 1):
        candidate = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        handle = open(candidate.with_name(candidate.name + ".lock"), "ab")  # noqa: SIM115 - held for the process
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return candidate, handle
    raise OSError(f"{MAX_LOCK_ATTEMPTS} sessions already write audit logs next to {path}")


class Recorder:
    """Writes a session's `mcp` records and raises its alerts."""

    def __init__(self, rules: RuleSet, path: str | None, agent: str, server: str, scanner: Scanner) -> None:
        self.agent = agent
        self.server = server
        self.scanner = scanner
        self.session = uuid.uuid4().hex[:16]
        self.seq = 0
        self._lock: IO[bytes] | None = None
        # Never "-": stdout carries the protocol.
        locked, self._lock = _lock_file(Path(path) if path else default_audit_path())
        target = self.path = str(locked)
        audit = rules.settings.audit
        self.writer = AuditWriter(target, max_file_bytes=audit.max_file_bytes, queue_size=audit.queue_size)
        self.fail_open = audit.on_failure == "continue"
        self.sinks: list[_SinkWorker] = []
        self._configure_sinks(rules)

    def _configure_sinks(self, rules: RuleSet) -> None:
        secrets_dir = rules.settings.secrets_dir
        for sink in rules.settings.alerts:
            try:
                headers = {name: render(template, secrets_dir)[0] for name, template in sink.headers}
            except SecretError as e:
                print(f"warden mcp stdio: alert sink {sink.id} disabled: {e}", file=sys.stderr, flush=True)
                continue
            self.sinks.append(_SinkWorker(sink, headers))

    def start(self) -> None:
        self.writer.start()

    @property
    def healthy(self) -> bool:
        return self.writer.healthy or self.fail_open

    def close(self) -> None:
        for sink in self.sinks:
            sink.stop()
        for sink in self.sinks:
            sink.thread.join(5)
        self.writer.close()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()

    def redact(self, value: Any) -> Any:
        """Argument values for the record, without secrets of the server's environment."""
        text = json.dumps(value, ensure_ascii=False, default=str)
        return "REDACTED: contains a credential" if self.scanner.redact_str(text, force=True)[1] else value

    def emit(self, decision: Decision, fields: McpFields, *, events: tuple[str, ...] = (),
             duration: float = 0.0, engine: float = 0.0, error: str | None = None) -> None:
        self.seq += 1
        outcome = Outcome(event="mcp", time=utc_now(), request_id=f"{self.session}-{self.seq}", decision=decision,
                          agent=self.agent, identity="declared", scheme="stdio", duration_seconds=duration,
                          engine_seconds=engine, events=events, error=error, mcp=fields)
        record = outcome_record(outcome)
        self.writer.submit(record)
        if self.sinks:
            for kind in alert_kinds(outcome):
                self._alert(kind, record)

    def event(self, record: dict[str, Any]) -> None:
        """A non-`mcp` record of this session (start, end, reload)."""
        self.writer.submit({"time": utc_now(), "mcp_transport": "stdio", "mcp_session": self.session,
                            "agent": self.agent, "mcp_server": self.server, **record})

    def _alert(self, kind: str, record: dict[str, Any]) -> None:
        key = (kind, record.get("agent"), record.get("reason"), record.get("rule_id"))
        what = record.get("mcp_tool") or record.get("mcp_method") or ""
        text = summary(kind, {**record, "host": f"mcp-stdio:{self.server}", "path": f" {what}"})
        payload = {"text": text, "kind": kind, "record": record}
        delivered = [worker.sink.id for worker in self.sinks if worker.offer(kind, key, payload) is None]
        if delivered:
            self.writer.submit({"event": "alert", "time": utc_now(), "kind": kind, "summary": text, "sinks": delivered,
                                "request_id": record.get("request_id"), "agent": record.get("agent")})
