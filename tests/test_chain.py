"""The chain is one mitmproxy addon; every handler of every part must be reachable through it."""

from __future__ import annotations

import inspect

from egresswarden.runtime.chain import WardenAddon, build_addon
from mitmproxy import hooks


def test_every_part_hook_is_dispatched_in_chain_order() -> None:
    addon = build_addon()
    assert "load" in addon.hooks and "configure" in addon.hooks
    for part in addon.parts:
        for name, member in inspect.getmembers(part, callable):
            if name in hooks.all_hooks:
                dispatched = [getattr(h, "__wrapped__", h) for h in addon.hooks[name]]
                assert member in dispatched, f"{type(part).__name__}.{name} is not dispatched"
    order = [type(p).__name__ for p in addon.parts]
    seen = [getattr(h, "__wrapped__", h).__qualname__.split(".")[0] for h in addon.hooks["requestheaders"]]
    assert seen == sorted(seen, key=order.index), "handlers must run in chain order"


def test_async_handlers_are_awaited() -> None:
    import asyncio

    calls: list[str] = []

    class Sync:
        def request(self, flow: object) -> None:
            calls.append("sync")

    class Async:
        async def request(self, flow: object) -> None:
            await asyncio.sleep(0)
            calls.append("async")

    addon = WardenAddon([Sync(), Async(), Sync()])
    asyncio.run(addon.request(object()))  # type: ignore[attr-defined]
    assert calls == ["sync", "async", "sync"]
