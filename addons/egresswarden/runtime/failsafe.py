"""Fail closed: an exception inside a Warden hook denies the flow instead of letting it pass.

mitmproxy's `safecall` logs hook exceptions and lets the flow continue, which for a policy
addon means "allow". The chain's dispatcher (`runtime.chain`) wraps every flow and
connection handler of every stage with `fail_closed`, so no handler can forget it: on an
exception it answers the flow with a 500 (`internal_error`) or kills the connection, records
the decision for audit/metrics, tells the chain's error callback (metrics count it once per
chain), and logs the exception type (not its text, which could hold request data) with the
traceback at debug level. Stream callables (bodies, SSE) are wrapped with `guarded_stream`:
on an exception the rest of the body is dropped, never passed unchecked.

Lifecycle hooks (load, configure, running, done) are not wrapped: an invalid rule set at
start-up must stop Warden, as mitmproxy's own option errors do.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from egresswarden.core.decision import Decision, Reason, denial_text, deny
from egresswarden.runtime.context import FlowRecord, record_of

logger = logging.getLogger("warden")

HookErrorCallback = Callable[[str], None]
LIFECYCLE_HOOKS = frozenset({"load", "configure", "running", "done", "update", "add_log"})


def _deny_target(hook: str, target: Any) -> None:
    decision = deny(Reason.INTERNAL_ERROR, f"Warden hit an internal error in {hook}; the request was refused",
                    "unknown")
    if isinstance(target, http.HTTPFlow):
        record = record_of(target)
        record.decision = _keep_version(record.decision, decision)
        target.response = refusal_response(record.decision, record.agent)
        if target.websocket is not None:
            target.kill()
        return
    # Connection-level hook data: kill what we can reach.
    server = getattr(target, "server", None)
    if server is not None:
        server.error = "warden: internal error"
    context = getattr(target, "context", None)
    client = getattr(target, "client", None) or (context.client if context is not None else None)
    if client is not None and hook != "server_connect":
        client.error = "warden: internal error"


def _keep_version(previous: Decision | None, decision: Decision) -> Decision:
    if previous is None:
        return decision
    return Decision(decision.verdict, decision.reason, decision.rule_id, decision.message, previous.policy_version)


def refusal_response(decision: Decision, agent: str | None, *, mcp: bool = False) -> http.Response:
    """The response Warden sends for a denial: status from the reason, readable body.

    `mcp`: the request went to an MCP endpoint and its JSON-RPC id is unknown (the body was
    never read): a JSON-RPC error object carries the same text, so MCP clients show it."""
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-Warden-Reason": decision.reason.value,
               "Cache-Control": "no-store"}
    if decision.reason in (Reason.AUTH_REQUIRED, Reason.AUTH_FAILED):
        headers["Proxy-Authenticate"] = 'Basic realm="warden"'
    if decision.reason.status == 429:  # a load limit (buffer_limit, scan_limit, connection_limit)
        headers["Retry-After"] = "1"
    if decision.rule_id:
        headers["X-Warden-Rule"] = decision.rule_id
    text = denial_text(decision, agent)
    if mcp:
        import json

        headers["Content-Type"] = "application/json"
        body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": text}}).encode()
        response = http.Response.make(decision.reason.status, body, headers)
    else:
        response = http.Response.make(decision.reason.status, text, headers)
    # The HTTP/1 reason phrase names the reason code: clients that show only the status line
    # (pip: "403 Client Error: <reason> for url", requests' raise_for_status) then still tell
    # the agent why. Only the code (fixed ASCII), never the message, which quotes what the agent sent.
    response.reason = f"Refused by Warden: {decision.reason.value}"
    return response


def fail_closed(hook: Callable[..., Any], on_error: HookErrorCallback | None = None,
                name: str | None = None) -> Callable[..., Any]:
    """Wrap a bound hook (sync or async) so that an exception denies instead of allowing."""
    hook_name = name or hook.__name__

    def handle(target: Any, exc: BaseException) -> None:
        logger.error("warden: %s failed with %s; denying", hook_name, exc.__class__.__name__)
        logger.debug("warden: %s traceback", hook_name, exc_info=exc)
        if on_error is not None:
            try:
                on_error(hook_name)
            except Exception:  # a broken metrics callback must not hide the original failure
                logger.debug("warden: hook error callback failed", exc_info=True)
        _deny_target(hook_name, target)

    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def async_wrapper(target: Any, *args: Any) -> Any:
            try:
                return await hook(target, *args)
            except Exception as exc:
                handle(target, exc)
        return async_wrapper

    @functools.wraps(hook)
    def wrapper(target: Any, *args: Any) -> Any:
        try:
            return hook(target, *args)
        except Exception as exc:
            handle(target, exc)
    return wrapper


def guarded_stream(stream: Callable[[bytes], bytes | list[bytes]], record: FlowRecord,
                   what: str) -> Callable[[bytes], bytes | list[bytes]]:
    """Wrap a body stream callable: an exception ends the body (nothing more is forwarded) and
    is recorded as an internal error on the flow, instead of passing the rest unchecked."""
    dead = False

    def guarded(chunk: bytes) -> bytes | list[bytes]:
        nonlocal dead
        if dead:
            return []
        try:
            return stream(chunk)
        except Exception as exc:
            dead = True
            logger.error("warden: %s stream failed with %s; dropping the rest of the body", what,
                         exc.__class__.__name__)
            record.decision = _keep_version(record.decision, deny(
                Reason.INTERNAL_ERROR, f"Warden hit an internal error while checking a streamed body ({what})",
                "unknown"))
            return []
    return guarded
