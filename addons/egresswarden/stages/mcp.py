"""MCP addon: per-agent tool catalogs with constrained arguments, enforced on the wire.

Acts only on requests whose host/port (as decided by Policy) and path name a declared MCP
server (`mcp_servers:`), and only when the body is JSON-RPC 2.0; anything else there is left
to the ordinary allow rules. Policy lives in `engine/mcp.py`; this addon moves bytes:

    requestheaders   Accept-Encoding: identity (so SSE events can be parsed)
    Runs after Credentials in the chain so that its SSE filter wraps the credentials response
    redactor (a later addon assigning `flow.response.stream` would otherwise silently drop the
    filter and leak unfiltered tools/list events).

    request          decide every message (each batch element on its own); answer denials
                     itself (HTTP 200, same JSON-RPC id) without contacting the server;
                     forward only the allowed elements of a mixed batch
    responseheaders  SSE responses: stream event by event through a filter
    response         JSON responses: filter tools/prompts/resources lists, merge Warden's
                     answers for denied batch elements; emit one `mcp` Outcome per message
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mitmproxy import http

from egresswarden.core import mcp as E
from egresswarden.core.bodyplan import BodyPlan, DecodeLimit, UnsupportedCoding, decode_for_scan
from egresswarden.core.decision import Decision, Reason, Verdict, deny
from egresswarden.core.model import McpServer
from egresswarden.core.plan import decide_mcp
from egresswarden.core.ruleset import RuleSet
from egresswarden.record.journal import utc_now
from egresswarden.record.outcome import McpFields, Outcome, Outcomes, redact_query
from egresswarden.runtime import pinstore
from egresswarden.runtime.context import record_of
from egresswarden.runtime.failsafe import refusal_response
from egresswarden.runtime.rulestore import RuleStore

logger = logging.getLogger("warden")

MAX_SSE_EVENT = 16 * 1024 * 1024  # an event larger than this is refused, not passed unfiltered


@dataclass(slots=True)
class CallAudit:
    md: E.MessageDecision
    is_error: bool | None = None
    batch: bool = False
    protocol_version: str | None = None
    events: list[str] = field(default_factory=list)


@dataclass(slots=True)
class McpFlow:
    server: McpServer
    policies: E.McpPolicies
    agent: str
    started: float = field(default_factory=time.monotonic)
    calls: list[CallAudit] = field(default_factory=list)
    by_id: dict[str, CallAudit] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)  # Warden's answers to merge
    batch: bool = False
    answered: bool = False  # Warden answered the whole request itself
    modern: bool = False
    report: E.FilterReport = field(default_factory=E.FilterReport)
    legacy_session: str | None = None  # HTTP+SSE POST: the session_id it names
    legacy_key: tuple[str, str] | None = None  # HTTP+SSE GET stream: (server, session) it announced
    legacy_answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> Warden's answer
    substituted: str | None = None  # HTTP+SSE: what Warden sent the server instead of a denied message


def _id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class SseFilter:
    """`flow.response.stream` callable: passes SSE events through one by one, rewriting the
    JSON-RPC results that list tools/prompts/resources. Buffers only up to the next blank line."""

    def __init__(self, addon: Mcp, flow: http.HTTPFlow, state: McpFlow, inner: Any = None) -> None:
        self.addon = addon
        self.inner = inner if callable(inner) else None  # e.g. the credentials redactor, run first
        self.dead = False
        self.flow = flow
        self.state = state
        self.buf = b""

    def __call__(self, data: bytes) -> bytes:
        if self.dead:
            return b""
        try:
            if self.inner is None:
                return self._feed(data)
            out = self._feed(self.inner(data)) if data else self._feed(self.inner(b"")) + self._feed(b"")
            return out
        except Exception as exc:  # fail closed: never pass an event we could not check
            logger.error("warden: mcp SSE filter failed with %s; truncating stream", exc.__class__.__name__)
            self.dead = True
            return b""

    def _feed(self, data: bytes) -> bytes:
        out = []
        self.buf += data
        while True:
            idx, sep = self._boundary()
            if idx < 0:
                break
            event = self.buf[:idx]
            self.buf = self.buf[idx + sep:]
            out.append(self._event(event) + b"\n\n")
        if len(self.buf) > MAX_SSE_EVENT:
            raise ValueError("SSE event too large")
        if data == b"":  # end of stream
            if self.buf.strip():
                out.append(self._event(self.buf) + b"\n\n")
            self.buf = b""
            for answer in self.state.answers:
                out.append(b"event: message\ndata: " + _dumps(answer) + b"\n\n")
            self.state.answers = []
        return b"".join(out)

    def _boundary(self) -> tuple[int, int]:
        best, size = -1, 0
        for sep in (b"\n\n", b"\r\n\r\n", b"\r\r"):
            i = self.buf.find(sep)
            if i >= 0 and (best < 0 or i < best):
                best, size = i, len(sep)
        return best, size

    def _event(self, raw: bytes) -> bytes:
        lines = raw.replace(b"\r\n", b"\n").split(b"\n")
        data_lines = [ln[5:].removeprefix(b" ") for ln in lines if ln.startswith(b"data:")]
        if not data_lines:
            return raw
        if any(ln.replace(b" ", b"") == b"event:endpoint" for ln in lines):
            self.addon.register_legacy_stream(self.state, b"\n".join(data_lines).decode("utf-8", "replace"))
            return raw
        try:
            msg = json.loads(b"\n".join(data_lines))
        except ValueError:
            return raw
        new, modified = self.addon.filter_server_message(self.flow, self.state, msg)
        if not modified:
            return raw
        others = [ln for ln in lines if not ln.startswith(b"data:")]
        return b"\n".join([*others, b"data: " + _dumps(new)])


class JsonBufferFilter:
    """`flow.response.stream` callable for non-SSE bodies another addon streams: collects the
    body (through `inner` first), filters it as JSON at the end. Bounded by MAX_SSE_EVENT."""

    def __init__(self, addon: Mcp, flow: http.HTTPFlow, state: McpFlow, inner: Any) -> None:
        self.addon, self.flow, self.state = addon, flow, state
        self.inner = inner if callable(inner) else None
        self.buf = b""
        self.dead = False

    def __call__(self, data: bytes) -> bytes:
        if self.dead:
            return b""
        try:
            self.buf += self.inner(data) if self.inner else data  # inner(b"") flushes its tail
            if len(self.buf) > MAX_SSE_EVENT:
                raise ValueError("MCP response too large to filter")
            if data != b"":
                return b""
            body, self.buf = self.buf, b""
            new = self.addon.filter_json_body(self.flow, self.state, body)
            return new if new is not None else body
        except Exception as exc:  # fail closed: send nothing we could not check
            logger.error("warden: mcp JSON filter failed with %s; dropping body", exc.__class__.__name__)
            self.dead = True
            return b""


class Mcp:
    def __init__(self, store: RuleStore, outcomes: Outcomes) -> None:
        self.store = store
        self.outcomes = outcomes
        self.pins = E.PinStore()
        self._pins_version: RuleSet | None = None  # the rule set whose mcp_pins the pin store holds
        # HTTP+SSE (2024-11-05): (server id, session id) -> the GET stream's state
        self.legacy_streams: dict[tuple[str, str], McpFlow] = {}

    def register_legacy_stream(self, state: McpFlow, endpoint: str) -> None:
        session = parse_qs(urlsplit(endpoint.strip()).query).get("session_id")
        if session:
            state.legacy_key = (state.server.id, session[0])
            self.legacy_streams[state.legacy_key] = state

    def policies(self, rules: RuleSet) -> E.McpPolicies:
        policies = E.mcp_policies_for(rules)  # compiled with the rule set, off the event loop
        if self._pins_version is not rules:
            pinstore.attach(self.pins, rules)  # rule pins, settings.mcp_unpinned, the durable store
            self._pins_version = rules
        return policies

    # -- request side ------------------------------------------------------------------------
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        record = record_of(flow)
        rules = record.rules
        if record.mcp_server is None or rules is None or record.agent is None:
            return  # Policy decided the target addresses no declared MCP server
        policies = self.policies(rules)
        server = next(s for s in rules.model.mcp_servers if s.id == record.mcp_server)
        flow.request.headers["Accept-Encoding"] = "identity"
        state = record.mcp = McpFlow(server, policies, record.agent)
        legacy = server.legacy_sse_messages_path
        target = record.target
        path = target.canonical_path if target is not None else None
        if legacy and flow.request.method == "POST" and path is not None and (
                path == legacy or path.startswith(legacy.rstrip("/") + "/")):
            session = parse_qs(urlsplit(flow.request.path).query).get("session_id")
            state.legacy_session = session[0] if session else None

    def request(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        state = record.mcp
        if state is None or flow.response is not None:
            return
        if record.body is not BodyPlan.BUFFER:
            raise RuntimeError("an MCP request body was not buffered")  # BodyPlanner never allows it: fail closed
        owner = self.legacy_streams.get((state.server.id, state.legacy_session or ""))
        if owner is not None and owner.agent != state.agent:
            record.decision = deny(Reason.MCP_NO_POLICY, "HTTP+SSE session belongs to another agent",
                                   state.policies.version)
            record.add_event("mcp_deny")
            flow.response = refusal_response(record.decision, record.agent)
            return
        body = flow.request.raw_content or b""
        if flow.request.headers.get("content-encoding"):
            try:
                body = decode_for_scan(body, flow.request.headers.get("content-encoding"),
                                       state.policies.rules.settings.max_mcp_body_bytes)
            except (UnsupportedCoding, DecodeLimit, ValueError):
                body = b"\xff"  # undecodable: refused below as not JSON-RPC
        parsed = E.parse_messages(body)
        if parsed is None:
            if not body.strip() and flow.request.method != "POST":
                return  # a GET (server stream) or DELETE (end of session): the allow rules decided it
            # Every POST to an MCP endpoint is JSON-RPC; one Warden cannot parse is not forwarded
            # (the server might parse it differently and run what Warden never decided).
            record.decision = deny(Reason.MCP_INVALID_MESSAGE,
                                   "the body of this request to an MCP endpoint is not a JSON-RPC 2.0 message "
                                   "Warden can decide", state.policies.version)
            record.add_event("mcp_deny")
            state.answered = True
            flow.response = http.Response.make(
                400, _dumps({"jsonrpc": "2.0", "id": None,
                             "error": {"code": -32700, "message": record.decision.message}}),
                {"Content-Type": "application/json", "Cache-Control": "no-store",
                 "X-Warden-Reason": record.decision.reason.value})
            return
        messages, batch = parsed
        state.batch = batch
        started = time.perf_counter()
        header_version = flow.request.headers.get("MCP-Protocol-Version")
        mcp_method = flow.request.headers.get("Mcp-Method")
        mcp_name = flow.request.headers.get("Mcp-Name")
        forward: list[dict[str, Any]] = []
        answers: list[dict[str, Any]] = []
        first_denial: Decision | None = None
        for msg in messages:
            version = E.protocol_version(msg, header_version)
            modern = E.is_modern(version)
            state.modern = state.modern or modern
            problem = None
            if (mcp_method is not None or mcp_name is not None) and "method" in msg:
                problem = ("Mcp-Method/Mcp-Name headers cannot describe a batch" if batch
                           else E.check_headers(msg, mcp_method, mcp_name))
            if problem is not None:
                md = E.MessageDecision(deny(Reason.MCP_HEADER_MISMATCH, problem, state.policies.version),
                                       E.short(msg.get("method"), 80), text=f"Warden refused this request: {problem}.",
                                       error_code=E.JSONRPC_HEADER_MISMATCH, event="mcp_deny")
            else:
                md = decide_mcp(state.policies, self.pins, state.agent, state.server, msg)  # report mode applied
            audit = CallAudit(md, batch=batch, protocol_version=version)
            if md.event and md.decision.verdict is not Verdict.ALLOW:
                audit.events.append(md.event)
                record.add_event(md.event)
            if md.method is not None and ("id" in msg or not md.allowed):
                state.calls.append(audit)
            if md.allowed:
                forward.append(msg)
                if "id" in msg and "method" in msg:
                    state.by_id[_id_key(msg["id"])] = audit
            else:
                first_denial = first_denial or md.decision
                answer = E.denial_answer(msg, md, modern)
                if answer is not None:
                    answers.append(answer)
        record.engine_seconds += time.perf_counter() - started
        if first_denial is None:
            return
        stream = self.legacy_streams.get((state.server.id, state.legacy_session or ""))
        if stream is not None and stream.agent != state.agent:
            stream = None  # another agent's session: never route answers into its stream
        if stream is not None and not batch and "id" in messages[0] and answers:
            # HTTP+SSE: the answer must arrive on the session's GET stream, so the server is sent
            # a harmless ping with the same id and the stream filter swaps its result for ours.
            stream.legacy_answers[_id_key(messages[0]["id"])] = answers[0]
            flow.request.content = _dumps({"jsonrpc": "2.0", "id": messages[0]["id"], "method": "ping"})
            state.substituted = "ping"
            return
        if not forward:
            state.answered = True
            record.decision = first_denial
            if not answers:
                flow.response = http.Response.make(202, b"", {"Cache-Control": "no-store"})
            else:
                body = _dumps(answers if batch else answers[0])
                flow.response = http.Response.make(200, body, {"Content-Type": "application/json",
                                                               "Cache-Control": "no-store",
                                                               "X-Warden-Reason": first_denial.reason.value})
            return
        # Mixed batch: forward only the allowed elements, merge Warden's answers into the response.
        state.answers = answers
        flow.request.content = _dumps(forward if batch else forward[0])

    # -- response side -----------------------------------------------------------------------
    def filter_server_message(self, flow: http.HTTPFlow, state: McpFlow, msg: Any) -> tuple[Any, bool]:
        """Filter one server->client message; note tool errors. Returns (message, modified)."""
        before_changed = len(state.report.changed)
        items = msg if isinstance(msg, list) else [msg]
        modified = False
        if isinstance(msg, dict) and state.legacy_answers and "id" in msg and ("result" in msg or "error" in msg):
            answer = state.legacy_answers.pop(_id_key(msg["id"]), None)
            if answer is not None:
                return answer, True
        for item in items:
            if not isinstance(item, dict):
                continue
            audit = state.by_id.get(_id_key(item.get("id"))) if "id" in item else None
            if audit is not None:
                result = item.get("result")
                audit.is_error = bool("error" in item or (isinstance(result, dict) and result.get("isError")))
            result = item.get("result")
            if isinstance(result, dict) and any(k in result for k in ("tools", "prompts", "resources")):
                E.filter_result(state.policies, self.pins, state.agent, state.server.id, result, state.report)
                modified = True
        record = record_of(flow)
        if len(state.report.changed) > before_changed:
            record.add_event("tool_changed")
        if state.report.collisions:
            record.add_event("tool_collision")
        return msg, modified

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = record_of(flow).mcp
        if state is None or state.answered or flow.response is None:
            return
        ctype = flow.response.headers.get("Content-Type", "")
        if record_of(flow).response_body is not BodyPlan.STREAM_SCAN and not flow.response.stream:
            return  # buffered whole (bounded by the plan): filtered in `response`
        if ctype.split(";")[0].strip().lower() == "text/event-stream":
            if flow.response.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                # We asked for identity; a server that compresses anyway cannot be filtered.
                flow.response = http.Response.make(502, b"Warden: MCP server sent a compressed event stream\n",
                                                   {"Content-Type": "text/plain"})
                return
            # Compose with a stream an earlier addon set (credentials' redactor), never replace it.
            flow.response.stream = SseFilter(self, flow, state, flow.response.stream)
        elif flow.response.stream:
            if state.answers and flow.response.status_code == 202:
                flow.response.status_code = 200
                flow.response.headers["Content-Type"] = "application/json"
                flow.response.headers.pop("Content-Length", None)
            # Another addon (credentials' redactor) streams this body: a JSON answer would pass
            # unfiltered, so buffer it whole (bounded) and filter it at the end of the stream.
            flow.response.stream = JsonBufferFilter(self, flow, state, flow.response.stream)

    def filter_json_body(self, flow: http.HTTPFlow, state: McpFlow, body: bytes) -> bytes | None:
        """Filter a whole JSON response body; merge pending answers. None when unchanged."""
        if not body.strip() and state.answers:
            answers, state.answers = state.answers, []
            return _dumps(answers if state.batch else answers[0])
        try:
            msg = json.loads(body) if body.strip() else None
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(msg, (dict, list)):
            return None
        msg, modified = self.filter_server_message(flow, state, msg)
        if state.answers:
            msg = (msg if isinstance(msg, list) else [msg]) + state.answers
            state.answers = []
            modified = True
        return _dumps(msg) if modified else None

    def response(self, flow: http.HTTPFlow) -> None:
        state = record_of(flow).mcp
        if state is None or flow.response is None:
            return
        resp = flow.response
        if not state.answered and not resp.stream:
            new = self.filter_json_body(flow, state, resp.get_content(strict=False) or b"") if resp.raw_content else None
            if new is not None:
                resp.content = new
            elif state.answers and resp.status_code in (200, 202) and not resp.raw_content:
                resp.status_code = 200
                resp.headers["Content-Type"] = "application/json"
                resp.content = _dumps(state.answers if state.batch else state.answers[0])
                state.answers = []
        self._emit(flow, state)

    def error(self, flow: http.HTTPFlow) -> None:
        state = record_of(flow).mcp
        if state is not None:
            self._emit(flow, state)

    # -- audit ---------------------------------------------------------------------------------
    @staticmethod
    def _safe_values(rules: RuleSet, values: Any) -> Any:
        """Argument values for the audit log, unless they hold a credential secret (the credentials
        addon substitutes placeholders before MCP sees the body)."""
        text = json.dumps(values, ensure_ascii=False, default=str)
        try:
            from egresswarden.core.credentials import scanner_for
            found = scanner_for(rules).redact_str(text, force=True)[1] > 0
        except Exception:  # no scanner: fall back to the plain secret values
            found = any(secret.value in text for secret in rules.secrets)
        return "REDACTED: contains a credential" if found else values
    def _emit(self, flow: http.HTTPFlow, state: McpFlow) -> None:
        if state.legacy_key is not None:
            self.legacy_streams.pop(state.legacy_key, None)
        record = record_of(flow)
        if record.mcp_audited:
            return
        record.mcp_audited = True
        duration = time.monotonic() - state.started
        peer = flow.client_conn.peername or ("", 0)
        report = state.report
        calls = list(state.calls)
        if not calls and (report.changed or report.hidden or report.collisions):
            # e.g. a server stream (GET) that carried a list: audit what was filtered
            calls.append(CallAudit(E.MessageDecision(Decision(Verdict.ALLOW, Reason.ALLOWED, None, "server stream",
                                                              state.policies.version), "stream")))
        list_call = next((c for c in calls if c.md.method in ("tools/list", "stream")), None)
        for call in calls:
            md = call.md
            events = list(call.events)
            lists = call is list_call or (list_call is None and md.method is not None and md.method.endswith("/list"))
            if lists and report.changed:
                events.append("tool_changed")
            if lists and report.collisions:
                events.append("tool_collision")
            fields = McpFields(
                server=state.server.id, method=md.method, tool=md.tool, resource=md.resource, prompt=md.prompt,
                argument_keys=tuple(md.argument_keys) if md.argument_keys is not None else None,
                argument_values=(self._safe_values(state.policies.rules, md.argument_values)
                                 if md.argument_values is not None else None),
                is_error=call.is_error,
                protocol_version=E.short(call.protocol_version, 32) if call.protocol_version else None,
                batch=call.batch, substituted=state.substituted,
                hidden=tuple(sorted(set(report.hidden))[:100]) if lists else (),
                changed_tools=tuple(sorted(set(report.changed))[:100]) if lists else (),
                changed_parts=tuple(sorted(report.changed_parts.items())[:100]) if lists else (),
                tool_collisions=tuple(sorted(set(report.collisions))[:100]) if lists else (),
            )
            self.outcomes.emit(Outcome(
                event="mcp", time=utc_now(), request_id=record.request_id, decision=md.decision, agent=state.agent,
                identity=record.identity_method, sandbox_id=record.sandbox_id, client_ip=str(peer[0]),
                method=flow.request.method, scheme=record.scheme, host=record.host, port=record.port,
                path=redact_query(record.path), interception=record.interception,
                status=flow.response.status_code if flow.response else None, duration_seconds=duration,
                engine_seconds=record.engine_seconds, events=tuple(events),
                error=flow.error.msg if flow.error else None, mcp=fields,
            ))
