"""Which asyncio event loop `warden run` uses: asyncio's own, or uvloop (libuv) on request.

    WARDEN_EVENT_LOOP=asyncio   (default) asyncio's default loop
    WARDEN_EVENT_LOOP=auto      uvloop if it can be imported, else asyncio
    WARDEN_EVENT_LOOP=uvloop    uvloop, or refuse to start without it

uvloop is an optional dependency (`pip install egresswarden[fast]`). It is not the default
because it is a trade-off (README, "Performance", 2026-12-02 evening, quiet machine): new
passthrough tunnels 1.18x the rate at 0.74 vs 0.94 ms CPU, passthrough keep-alive 1.06x, but
intercepted new connections 0.91x (6.25 vs 5.61 ms CPU). An intercepted connection costs six
times a passed-through one, so in a mixed fleet asyncio spends less CPU overall; uvloop pays
for a deployment that is mostly passthrough. The asyncio loop is also the one every test but
tests/test_eventloop.py runs on.

The one incompatibility (issue 17): mitmproxy's `Master.run` installs
`asyncio.eager_task_factory`, and uvloop 0.23 calls a task factory with an `eager_start`
keyword that Python 3.12/3.13's factory does not accept, so every `create_task` raised
TypeError. The loop below keeps mitmproxy's choice (eager tasks) and drops that keyword
before calling the standard factory: same tasks, same eagerness, on uvloop.

`install()` must run before mitmproxy starts its loop (it sets the event loop policy that
`asyncio.run` uses).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any

ENV = "WARDEN_EVENT_LOOP"
CHOICES = ("asyncio", "auto", "uvloop")
DEFAULT = "asyncio"


class EventLoopError(RuntimeError):
    """WARDEN_EVENT_LOOP names a loop that cannot be used."""


def _eager_task_factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], *,
                        eager_start: bool | None = None, **kwargs: Any) -> asyncio.Task[Any]:
    # uvloop passes eager_start (None: "the factory decides"); the standard factory is eager.
    return asyncio.eager_task_factory(loop, coro, **kwargs)


def _uvloop_policy() -> asyncio.AbstractEventLoopPolicy:
    import uvloop

    class Loop(uvloop.Loop):
        def set_task_factory(self, factory: Any) -> None:
            if factory is asyncio.eager_task_factory:
                factory = _eager_task_factory
            super().set_task_factory(factory)

    class Policy(uvloop.EventLoopPolicy):  # type: ignore[misc]
        def _loop_factory(self) -> Loop:
            return Loop()

    policy: asyncio.AbstractEventLoopPolicy = Policy()
    return policy


def install(choice: str | None = None) -> str:
    """Set the loop policy for `choice` (default: $WARDEN_EVENT_LOOP, else DEFAULT); return "uvloop" or "asyncio"."""
    choice = (choice or os.environ.get(ENV) or DEFAULT).strip().lower()
    if choice not in CHOICES:
        raise EventLoopError(f"{ENV}={choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        policy = _uvloop_policy()
    except ImportError:
        if choice == "uvloop":
            raise EventLoopError(f"{ENV}=uvloop, but uvloop is not installed (pip install uvloop)") from None
        return "asyncio"
    asyncio.set_event_loop_policy(policy)
    return "uvloop"
