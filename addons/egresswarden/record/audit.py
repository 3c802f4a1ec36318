"""Audit addon: turns Outcomes and lifecycle events into audit records, and fails closed.

Records go to `auditlog.AuditWriter` (hash chain, queue, rotation). `AuditGate` sits early
in the addon chain and refuses new connections and requests with 503 `audit_unavailable`
while the log cannot be written, unless `settings.audit.on_failure: continue`: mitmproxy's
own save addon likewise prefers to crash visibly rather than let traffic through unrecorded.

Checkpoint signing: `settings.audit.signing_key` (`${secret:NAME}`) is rendered from the
secrets directory at start and on every reload; a key that changes is used from the next
checkpoint on (verifiers then need both public keys), a key that cannot be read or parsed
stops Warden at start and keeps the previous key on reload (logged).

Audit failures reach `failure_listeners` (alerts) on the event loop, never on the writer
thread or inside `submit` (see `record/journal.py` for the thread model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http

from egresswarden.core.decision import Reason, deny
from egresswarden.core.errors import SecretError
from egresswarden.core.model import AuditSettings
from egresswarden.core.ruleset import RuleSet
from egresswarden.core.secrets import render
from egresswarden.record import fields as F
from egresswarden.record.journal import AuditWriter, KeyError_, Signer, load_signing_key, stdout_sink, utc_now
from egresswarden.record.outcome import McpFields, Outcome
from egresswarden.record.redaction import RedactingFilter, scrubbed_record_json
from egresswarden.runtime.context import record_of
from egresswarden.runtime.failsafe import refusal_response
from egresswarden.runtime.rulestore import ReloadEvent, RuleStore

logger = logging.getLogger("warden")


def outcome_record(o: Outcome) -> dict[str, Any]:
    d = o.decision
    record: dict[str, Any] = {
        F.TIME: o.time,
        F.EVENT: o.event,
        F.REQUEST_ID: o.request_id,
        F.AGENT: o.agent,
        F.IDENTITY: o.identity,
        F.CLIENT_IP: o.client_ip,
        F.CLIENT_PORT: o.client_port,
        F.METHOD: o.method,
        F.SCHEME: o.scheme,
        F.HOST: o.host,
        F.PORT: o.port,
        F.PATH: o.path,
        F.DECISION: d.verdict.value if d else None,
        F.REASON: d.reason.value if d else None,
        F.RULE_ID: d.rule_id if d else None,
        F.MESSAGE: d.message if d else None,
        F.POLICY_VERSION: d.policy_version if d else None,
        F.INTERCEPTION: o.interception.value if o.interception else None,
        F.STATUS: o.status,
        F.BYTES_UP: o.bytes_up,
        F.BYTES_DOWN: o.bytes_down,
        F.DURATION_MS: round(o.duration_seconds * 1000, 3),
        F.UPSTREAM_IP: o.upstream_address,
        F.CREDENTIAL_IDS: list(o.credentials),
    }
    if o.agent_claimed:
        record[F.AGENT_CLAIMED] = o.agent_claimed
    if o.error:
        record[F.ERROR] = o.error
    if o.events:
        record[F.EVENTS] = list(o.events)
    if o.sandbox_id:
        record[F.SANDBOX_ID] = o.sandbox_id
    if o.websocket_messages_up is not None:
        record[F.WEBSOCKET_MESSAGES_UP] = o.websocket_messages_up
        record[F.WEBSOCKET_MESSAGES_DOWN] = o.websocket_messages_down
    if o.mcp is not None:
        record.update(mcp_fields(o.mcp))
    if o.carried_tls is not None:
        record[F.CARRIED_TLS] = o.carried_tls
    if o.revocation is not None:
        record[F.REVOCATION] = o.revocation
        if o.revoke_ms is not None:
            record[F.REVOKE_MS] = o.revoke_ms
    return record


def mcp_fields(m: McpFields) -> dict[str, Any]:
    """The `mcp_*` audit fields of one MCP message (only those that apply)."""
    out: dict[str, Any] = {F.MCP_SERVER: m.server, F.MCP_METHOD: m.method, F.MCP_TRANSPORT: m.transport}
    optional: dict[str, Any] = {
        F.MCP_TOOL: m.tool, F.MCP_RESOURCE: m.resource, F.MCP_PROMPT: m.prompt,
        F.MCP_ARGUMENT_KEYS: list(m.argument_keys) if m.argument_keys is not None else None,
        F.MCP_ARGUMENT_VALUES: m.argument_values, F.MCP_IS_ERROR: m.is_error,
        F.MCP_PROTOCOL_VERSION: m.protocol_version, F.MCP_BATCH: True if m.batch else None,
        F.MCP_HIDDEN: list(m.hidden) or None, F.MCP_CHANGED_TOOLS: list(m.changed_tools) or None,
        F.MCP_CHANGED_PARTS: {tool: list(parts) for tool, parts in m.changed_parts} or None,
        F.MCP_TOOL_COLLISIONS: list(m.tool_collisions) or None, F.MCP_SUBSTITUTED: m.substituted,
        F.MCP_UNPINNED_TOOLS: list(m.unpinned_tools) or None, F.MCP_SESSION: m.session,
        F.MCP_DIRECTION: m.direction, F.MCP_REDACTED: m.redacted or None,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    return out


FailureListener = Callable[[str], None]


def signer_for(rules: RuleSet | None) -> Signer | None:
    """The checkpoint signer the rules ask for. Raises SecretError or KeyError_ (no key material)."""
    if rules is None or not rules.settings.audit.signing_key:
        return None
    secrets_dir = rules.settings.secrets_dir
    if secrets_dir and not Path(secrets_dir).is_absolute():
        secrets_dir = str(Path(rules.model.rules_dir) / secrets_dir)
    text, _ = render(rules.settings.audit.signing_key, secrets_dir)
    return load_signing_key(text)


class Audit:
    def __init__(self, store: RuleStore) -> None:
        self.store = store
        self.writer: AuditWriter | None = None
        self.failure_listeners: list[FailureListener] = []
        self.closing_listeners: list[Callable[[], None]] = []  # write their last records at shutdown
        self._loop: asyncio.AbstractEventLoop | None = None
        store.add_listener(self.on_reload)
        # Log lines too: every `warden` log record is scrubbed before any handler formats it.
        self._log_filter = RedactingFilter(lambda: self.store.current)
        logging.getLogger("warden").addFilter(self._log_filter)

    def load(self, loader: Any) -> None:
        loader.add_option("warden_audit_log", str, "audit.jsonl",
                          "Audit log path (JSON Lines, hash-chained); '-' writes to stdout.")

    def configure(self, updated: set[str]) -> None:
        if "warden_audit_log" in updated and self.writer is None:
            rules = self.store.current
            audit = rules.settings.audit if rules else AuditSettings()
            try:
                signer = signer_for(rules)
            except (SecretError, KeyError_) as e:
                raise exceptions.OptionsError(
                    f"warden: settings.audit.signing_key: {e}") from None
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()
            self.writer = AuditWriter(
                ctx.options.warden_audit_log,
                max_file_bytes=audit.max_file_bytes,
                queue_size=audit.queue_size,
                also_stdout=audit.stdout,
                stdout=stdout_sink(),
                signer=signer,
                checkpoint_records=audit.checkpoint_records,
                checkpoint_seconds=audit.checkpoint_seconds,
                notify=self._writer_failed,
                failure_level=logging.WARNING if audit.on_failure == "continue" else logging.ERROR,
            )
            self.writer.start()

    def _writer_failed(self, message: str) -> None:
        """Called by the writer (any thread) when the log stops being writable."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._dispatch_failure, message)

    def _dispatch_failure(self, message: str) -> None:
        for listener in self.failure_listeners:
            try:
                listener(message)
            except Exception as e:  # one broken listener must not stop the others
                logger.error("warden: audit failure listener failed: %s", e.__class__.__name__)

    def running(self) -> None:
        rules = self.store.current
        self.emit({F.EVENT: "startup", "pid": os.getpid(), F.POLICY_VERSION: rules.version if rules else None,
                   "rules_loaded": rules.rule_count if rules else 0})

    def done(self) -> None:
        for listener in self.closing_listeners:
            try:
                listener()
            except Exception as e:  # one listener's bug must not lose the shutdown record
                logger.error("warden: audit closing listener failed: %s", e.__class__.__name__)
        if self.writer is not None:
            self.emit({F.EVENT: "shutdown", "pid": os.getpid()})
            self.writer.close()

    def emit(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        if F.TIME not in record:  # not setdefault: that would format the time for every record
            record[F.TIME] = utc_now()
        self.writer.submit(scrubbed_record_json(self.store.current, record))  # the one place every record passes

    def on_outcome(self, outcome: Outcome) -> None:
        self.emit(outcome_record(outcome))

    def on_reload(self, event: ReloadEvent) -> None:
        if event.initial:
            return
        if event.ok and event.changed and self.writer is not None:
            try:
                signer = signer_for(self.store.current)
            except (SecretError, KeyError_) as e:
                logger.error("warden: settings.audit.signing_key: %s; keeping the previous key", e)
            else:
                if (signer and signer.key_id) != (self.writer.signer and self.writer.signer.key_id):
                    self.writer.signer = signer  # one reference: the writer thread sees old or new
        result = ("success" if event.changed else "unchanged") if event.ok else "failure"
        self.emit({F.EVENT: "reload", "result": result, "trigger": event.trigger,
                   F.POLICY_VERSION: event.version, "previous_version": event.previous_version,
                   "rules_loaded": event.rule_count, F.DURATION_MS: round(event.duration_seconds * 1000, 3),
                   F.ERROR: event.error})

    @property
    def healthy(self) -> bool:
        return self.writer is None or self.writer.healthy


class AuditGate:
    """Refuses new work while the audit log cannot be written (fail closed by default)."""

    def __init__(self, audit: Audit, store: RuleStore) -> None:
        self.audit = audit
        self.store = store

    def admits(self) -> bool:
        """May new work start: the audit log is writable, or the rules say to carry on without it."""
        if self.audit.healthy:
            return True
        rules = self.store.current
        return rules is not None and rules.settings.audit.on_failure == "continue"

    def _check(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or self.admits():
            return
        rules = self.store.current
        record = record_of(flow)
        # refused before the policy stage saw it: say what was refused
        request = flow.request
        record.method = record.method or request.method
        record.host = record.host or request.host[:256]
        record.port = record.port or request.port
        if request.method != "CONNECT":
            record.scheme = record.scheme or request.scheme
            record.path = record.path or request.path[:2048]
        record.decision = deny(Reason.AUDIT_UNAVAILABLE,
                               "Warden cannot write its audit log, so it refuses new traffic until the log is "
                               "writable again; retry later", rules.version if rules else "none")
        flow.response = refusal_response(record.decision, record.agent)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._check(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._check(flow)
