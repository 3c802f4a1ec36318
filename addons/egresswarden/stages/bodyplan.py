"""BodyPlanner stage: the one place a request's and a response's body plan is decided.

Runs after Policy (which decided the canonical target and the MCP server it addresses) and
before every stage that touches a body (Credentials, Mcp). See `core.bodyplan` for the
plans. Here they are applied: a refusal is answered, a STREAM plan streams the body through
a byte counter (for the audit record), BUFFER leaves mitmproxy's buffering on, and
STREAM_SCAN is left for the stage that owns the scanning callable (Credentials' leak
scanner and redactor, Mcp's event filter), which installs it in the same hook.

A BUFFER request body also takes its declared length from its agent's BufferBudget
(runtime/budget.py) before a byte of it is read; the flow gives it back when it ends.
"""

from __future__ import annotations

from collections.abc import Callable

from mitmproxy import http

from egresswarden.core.bodyplan import BodyPlan, plan_request_body, plan_response_body
from egresswarden.core.credentials import scanner_for
from egresswarden.core.decision import Reason, deny
from egresswarden.runtime.budget import BufferBudget
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
    def __init__(self, budget: BufferBudget | None = None) -> None:
        self.budget = budget or BufferBudget()

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
        if planned.plan is BodyPlan.BUFFER and not self._reserve(record, planned.length):
            limit = rules.settings.max_buffered_bytes_per_agent
            record.decision = deny(
                Reason.BUFFER_LIMIT,
                f"agent '{record.agent}' already has {self.budget.held(record.agent or '')} bytes of request bodies "
                f"held by Warden (limit {limit} per agent); this body would take it past the limit. Wait for "
                f"requests in flight to finish, or send fewer large bodies at once", rules.version)
            flow.response = refusal_response(record.decision, record.agent, mcp=record.mcp_server is not None)
        elif planned.plan is BodyPlan.REFUSE:
            assert planned.reason is not None
            record.decision = deny(planned.reason, planned.message, rules.version)
            flow.response = refusal_response(record.decision, record.agent, mcp=record.mcp_server is not None)
        elif planned.plan is BodyPlan.STREAM:
            request.stream = byte_counter(record, upstream=True)

    def _reserve(self, record: FlowRecord, length: int) -> bool:
        """Take a BUFFER body's declared length from its agent's budget; False if refused.
        (A bodiless request takes nothing.)"""
        if length == 0:
            return True
        rules = record.rules
        assert rules is not None and record.agent is not None  # Identity and Policy ran
        record.buffer_reservation = self.budget.reserve(
            record.agent, length, rules.settings.max_buffered_bytes_per_agent, owner=record)
        return record.buffer_reservation is not None

    def response(self, flow: http.HTTPFlow) -> None:
        self._release(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._release(flow)

    @staticmethod
    def _release(flow: http.HTTPFlow) -> None:
        reservation = record_of(flow).buffer_reservation
        if reservation is not None:
            reservation.release()

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
