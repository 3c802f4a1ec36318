"""Fail closed: an exception inside a Warden hook denies the flow instead of letting it pass.

mitmproxy's `safecall` logs hook exceptions and lets the flow continue, which for a policy
addon means "allow". Every Warden hook is wrapped with `fail_closed`: on an exception it
answers the flow with a 500 (`internal_error`) or kills the connection, records the
decision for audit/metrics, and logs the exception type (not its text, which could hold
request data) with the traceback at debug level.

Who hears of a swallowed exception is registered per hook owner (`on_hook_error(listener,
*parts)`, done once per chain by `chain.build_chain`), in a WeakKeyDictionary: each error is
reported once, to the chain it happened in, and a chain that is gone is not kept alive.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from egresswarden.core.decision import Decision, Reason, denial_text, deny
from egresswarden.runtime.context import record_of

logger = logging.getLogger("warden")

HookErrorListener = Callable[[str], None]
_listeners: weakref.WeakKeyDictionary[Any, HookErrorListener] = weakref.WeakKeyDictionary()


def on_hook_error(listener: HookErrorListener, *parts: Any) -> None:
    """Tell `listener` (metrics) the hook name of every exception swallowed in one of `parts`."""
    for part in parts:
        _listeners[part] = listener


def _deny_target(hook: str, target: Any) -> None:
    decision = deny(Reason.INTERNAL_ERROR, f"Warden hit an internal error in {hook}; the request was refused",
                    "unknown")
    if isinstance(target, http.HTTPFlow):
        record = record_of(target)
        record.decision = _keep_version(record.decision, decision)
        target.response = refusal_response(record.decision, record.agent)
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


def refusal_response(decision: Decision, agent: str | None) -> http.Response:
    """The response Warden sends for a denial: status from the reason, readable body."""
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-Warden-Reason": decision.reason.value,
               "Cache-Control": "no-store"}
    if decision.reason in (Reason.AUTH_REQUIRED, Reason.AUTH_FAILED):
        headers["Proxy-Authenticate"] = 'Basic realm="warden"'
    if decision.rule_id:
        headers["X-Warden-Rule"] = decision.rule_id
    return http.Response.make(decision.reason.status, denial_text(decision, agent), headers)


def fail_closed(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a hook (sync or async) so that an exception denies instead of allowing."""
    name = hook.__name__

    def handle(owner: Any, target: Any, exc: BaseException) -> None:
        logger.error("warden: %s failed with %s; denying", name, exc.__class__.__name__)
        logger.debug("warden: %s traceback", name, exc_info=exc)
        listener = _listeners.get(owner)
        if listener is not None:
            # a broken metrics listener must not hide the original failure
            with contextlib.suppress(Exception):
                listener(name)
        _deny_target(name, target)

    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def async_wrapper(self: Any, target: Any, *args: Any) -> Any:
            try:
                return await hook(self, target, *args)
            except Exception as exc:
                handle(self, target, exc)
        return async_wrapper

    @functools.wraps(hook)
    def wrapper(self: Any, target: Any, *args: Any) -> Any:
        try:
            return hook(self, target, *args)
        except Exception as exc:
            handle(self, target, exc)
    return wrapper
