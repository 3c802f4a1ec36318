"""BodyPlanner stage: the one place a request's and a response's body plan is decided.

Runs after Policy (which decided the canonical target and the MCP server it addresses) and
before every stage that touches a body (Credentials, Mcp). See `core.bodyplan` for the
plans. Here they are applied: a refusal is answered, a STREAM plan streams the body through
a byte counter (for the audit record), BUFFER leaves mitmproxy's buffering on, and
STREAM_SCAN is left for the stage that owns the scanning callable (Credentials' leak
scanner and redactor, Mcp's event filter), which installs it in the same hook.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from egresswarden.core.bodyplan import BodyPlan, plan_request_body, plan_response_body
from egresswarden.core.credentials import scanner_for
from egresswarden.core.decision import deny
from egresswarden.runtime.context import FlowRecord, record_of
from egresswarden.runtime.failsafe import refusal_response


def byte_counter(record: FlowRecord, upstream: bool) -> Callable[[bytes], bytes]:
    """A stream callable that passes chunks unchanged and counts them for the audit record."""
    def count(chunk: bytes) -> bytes:
        if upstream:
            record.bytes_up += len(chunk)
        else:
            record.bytes_down += len(chunk)
        return chunk
    return count


def _is_sse(response: http.Response) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.split(";")[0].strip().lower() == "text/event-stream"


class BodyPlanner:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        record = record_of(flow)
        rules = record.rules
        if rules is None:
            raise RuntimeError("body plan asked for before the policy decided")  # fail closed
        request = flow.request
        planned = plan_request_body(
            request.method, request.headers.get("content-length"),
            "chunked" in request.headers.get("transfer-encoding", "").lower(),
            request.is_http2 or request.is_http3, request.headers.get("content-encoding"),
            mcp=record.mcp_server is not None, scan=scanner_for(rules).automaton is not None,
            max_buffered=rules.settings.body_scan_max_buffered_bytes, max_mcp=rules.settings.max_mcp_body_bytes)
        record.body = planned.plan
        if planned.plan is BodyPlan.REFUSE:
            assert planned.reason is not None
            record.decision = deny(planned.reason, planned.message, rules.version)
            flow.response = refusal_response(record.decision, record.agent, mcp=record.mcp_server is not None)
        elif planned.plan is BodyPlan.STREAM:
            request.stream = byte_counter(record, upstream=True)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        response = flow.response
        rules = record.rules
        if response is None or rules is None or record.response_body is not None:
            return
        creds = record.creds
        redact = bool(creds is not None and creds.injected and creds.redact_ids())
        planned = plan_response_body(
            response.headers.get("content-length"), response.headers.get("content-encoding"),
            mcp=record.mcp_server is not None and record.mcp is not None and not record.mcp.answered,
            sse=_is_sse(response), redact=redact, max_buffered=rules.settings.body_scan_max_buffered_bytes,
            max_mcp=rules.settings.max_mcp_body_bytes)
        record.response_body = planned.plan
        if planned.plan is BodyPlan.REFUSE:
            assert planned.reason is not None
            record.decision = deny(planned.reason, planned.message, rules.version)
            flow.response = refusal_response(record.decision, record.agent)
        elif planned.plan is BodyPlan.STREAM:
            response.stream = byte_counter(record, upstream=False)
