"""mitmproxy's AddonManager with the per-event handler lookup done once, not per event.

mitmproxy's `trigger_event` walks the whole addon chain for every event: for each of the
~14 addons `warden run` loads it enters a `safecall()` context manager, runs a generator
that `traverse`s the addon's sub-addons and `getattr`s the hook name, and rebuilds the
hook's argument list (`dataclasses.fields`) per handler; `handle_lifecycle` then does it all
again for the `update` event after each flow event, which no loaded addon handles. Profiled
on plain HTTP keep-alive, that machinery was ~15% of the proxy's CPU per request, more than
all of Warden's stages together.

`CachedAddonManager` computes, per hook name, the handlers of the chain once and calls them
directly, with the same semantics:
* order: chain order, each addon before its sub-addons (mitmproxy's `traverse`);
* errors: an exception from a handler is logged as "Addon error" (as `safecall` does) and
  skips the rest of that top-level addon's subtree, never the next addon; `AddonHalt` stops
  the event; `OptionsError` propagates;
* freshness: the cache is dropped whenever the chain can change (register, remove, clear)
  and on every lifecycle event (load, configure, running, done...), the moments addons
  (re)wire their handlers (e.g. stages/interception.py patches mitmproxy's NextLayer in
  `running`). Lifecycle events themselves go through mitmproxy's own code, uncached.
* addons whose sub-addons can change at run time (anything with an `addons` attribute, e.g.
  the script loader) are never flattened: mitmproxy's own `invoke_addon` walks them live.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from mitmproxy import addonmanager, exceptions, flow, hooks

logger = logging.getLogger("mitmproxy.addonmanager")  # the logger safecall() writes to

# One entry per top-level addon: its handlers for one hook, or None if its subtree is
# dynamic and must be walked by mitmproxy's invoke_addon on every event.
_Entry = tuple[Any, tuple[Callable[..., Any], ...] | None]

# The events after which addons may have (re)wired their handlers. Not `update`: it follows
# every flow event and is cached like them.
REWIRING_HOOKS = frozenset({"load", "configure", "running", "done"})


class CachedAddonManager(addonmanager.AddonManager):
    def __init__(self, master: Any) -> None:
        super().__init__(master)  # type: ignore[no-untyped-call]
        self._plans: dict[str, tuple[_Entry, ...]] = {}

    # -- the chain changes: forget every plan ----------------------------------------------
    def register(self, addon: Any) -> Any:
        self._plans.clear()
        return super().register(addon)  # type: ignore[no-untyped-call]

    def remove(self, addon: Any) -> None:
        self._plans.clear()
        super().remove(addon)  # type: ignore[no-untyped-call]

    def clear(self) -> None:
        self._plans.clear()
        super().clear()  # type: ignore[no-untyped-call]

    def add(self, *addons: Any) -> None:  # typed, for callers under mypy --strict
        super().add(*addons)  # type: ignore[no-untyped-call]

    def trigger(self, event: hooks.Hook) -> None:
        # The sync API: configure (option changes) and add_log (every log line, uncached here).
        if event.name in REWIRING_HOOKS:
            self._plans.clear()
            super().trigger(event)
            self._plans.clear()
        else:
            super().trigger(event)

    # -- events --------------------------------------------------------------------------------
    def _plan(self, name: str) -> tuple[_Entry, ...]:
        plan: list[_Entry] = []
        for top in self.chain:
            subtree = list(addonmanager.traverse([top]))
            if any(hasattr(a, "addons") for a in subtree):
                plan.append((top, None))
                continue
            funcs = []
            for a in subtree:
                func = getattr(a, name, None)
                if func is None or inspect.ismodule(func):
                    continue  # mitmproxy skips module attributes named like a hook, too
                if not callable(func):
                    raise exceptions.AddonManagerError(f"Addon handler {name} ({a}) not callable")
                funcs.append(func)
            if funcs:
                plan.append((top, tuple(funcs)))
        return tuple(plan)

    def _plan_for(self, name: str) -> tuple[_Entry, ...]:
        plan = self._plans.get(name)
        if plan is None:
            plan = self._plans[name] = self._plan(name)
        return plan

    async def handle_lifecycle(self, event: hooks.Hook) -> None:
        args = event.args()
        await self._trigger(event, args)
        # mitmproxy follows every flow event with `update`; skip building it when nobody listens
        if isinstance(args[0], flow.Flow) and self._plan_for("update"):
            await self.trigger_event(hooks.UpdateHook([args[0]]))

    async def trigger_event(self, event: hooks.Hook) -> None:
        await self._trigger(event, None)

    async def _trigger(self, event: hooks.Hook, args: list[Any] | None) -> None:
        name = event.name
        if name in REWIRING_HOOKS:
            self._plans.clear()
            await super().trigger_event(event)
            self._plans.clear()  # handlers may have been rewired during the event
            return
        plan = self._plan_for(name)
        if not plan:
            return
        if args is None:
            args = event.args()
        for top, funcs in plan:
            try:
                if funcs is None:
                    with addonmanager.safecall():
                        await self.invoke_addon(top, event)
                    continue
                for func in funcs:
                    result = func(*args)
                    if result is not None and inspect.isawaitable(result):
                        await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as e:
                logger.error(f"Addon error: {e}", exc_info=sys.exc_info())
