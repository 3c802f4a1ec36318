"""runtime/addonmanager.CachedAddonManager keeps mitmproxy's dispatch semantics.

Run against mitmproxy's own Master and hooks (no proxy needed): order, errors, AddonHalt,
script-like addons whose sub-addons change, and handlers rewired in `running`."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from egresswarden.runtime.addonmanager import CachedAddonManager
from mitmproxy import exceptions, hooks, master, options
from mitmproxy.proxy import server_hooks
from mitmproxy.test import tflow


class Recorder:
    def __init__(self, name: str, calls: list[str], fail: bool = False, halt: bool = False) -> None:
        self.name, self.calls, self.fail, self.halt = name, calls, fail, halt

    def client_connected(self, client: Any) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError("boom")
        if self.halt:
            raise exceptions.AddonHalt()


class Parent:
    """Like the script loader: `addons` may change at any time."""

    def __init__(self, calls: list[str]) -> None:
        self.name = "parent"
        self.addons: list[Any] = []
        self.calls = calls

    async def client_connected(self, client: Any) -> None:
        self.calls.append("parent")


class Rewired:
    name = "rewired"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def running(self) -> None:
        self.client_connected = lambda client: self.calls.append("rewired-late")  # type: ignore[method-assign]

    def client_connected(self, client: Any) -> None:
        self.calls.append("rewired-early")


def run(coro_fn: Any) -> Any:
    async def main() -> Any:
        m = master.Master(options.Options())
        m.addons = CachedAddonManager(m)
        return await coro_fn(m)
    return asyncio.run(main())


def connected(m: master.Master) -> Any:
    return m.addons.handle_lifecycle(server_hooks.ClientConnectedHook(tflow.tclient_conn()))


def test_order_and_update_hook_run_as_mitmproxy_runs_them() -> None:
    calls: list[str] = []

    async def scenario(m: master.Master) -> None:
        m.addons.add(Recorder("a", calls), Recorder("b", calls))
        await connected(m)
        await connected(m)  # second time from the cached plan
    run(scenario)
    assert calls == ["a", "b", "a", "b"]


def test_an_error_is_logged_and_the_next_addon_still_runs(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    async def scenario(m: master.Master) -> None:
        m.addons.add(Recorder("a", calls, fail=True), Recorder("b", calls))
        with caplog.at_level(logging.ERROR):
            await connected(m)
    run(scenario)
    assert calls == ["a", "b"]
    assert any("Addon error: boom" in r.getMessage() for r in caplog.records)


def test_addon_halt_stops_the_event() -> None:
    calls: list[str] = []

    async def scenario(m: master.Master) -> None:
        m.addons.add(Recorder("a", calls, halt=True), Recorder("b", calls))
        await connected(m)
    run(scenario)
    assert calls == ["a"]


def test_sub_addons_added_later_are_seen() -> None:
    calls: list[str] = []

    async def scenario(m: master.Master) -> None:
        parent = Parent(calls)
        m.addons.add(parent)
        await connected(m)
        parent.addons.append(Recorder("child", calls))  # no register: the loader's own bookkeeping
        await connected(m)
    run(scenario)
    assert calls == ["parent", "parent", "child"]


def test_handlers_rewired_in_running_and_added_addons_are_picked_up() -> None:
    calls: list[str] = []

    async def scenario(m: master.Master) -> None:
        m.addons.add(Rewired(calls))
        await connected(m)
        await m.addons.trigger_event(hooks.RunningHook())
        await connected(m)
        m.addons.add(Recorder("new", calls))
        await connected(m)
    run(scenario)
    assert calls == ["rewired-early", "rewired-late", "rewired-late", "new"]


def test_update_follows_flow_events_when_someone_listens() -> None:
    calls: list[str] = []

    class Updates:
        def requestheaders(self, f: Any) -> None:
            calls.append("requestheaders")

        def update(self, flows: list[Any]) -> None:
            calls.append(f"update:{len(flows)}")

    async def scenario(m: master.Master) -> None:
        from mitmproxy.proxy.layers.http import HttpRequestHeadersHook

        m.addons.add(Updates())
        await m.addons.handle_lifecycle(HttpRequestHeadersHook(tflow.tflow()))
    run(scenario)
    assert calls == ["requestheaders", "update:1"]


def test_option_changes_reach_configure_and_rewire_handlers() -> None:
    calls: list[str] = []

    class Configured:
        def configure(self, updated: set[str]) -> None:
            if "listen_port" in updated:
                calls.append("configure")
                self.client_connected = lambda client: calls.append("after-configure")

        def client_connected(self, client: Any) -> None:
            calls.append("before")

    async def scenario(m: master.Master) -> None:
        m.addons.add(Configured())
        await connected(m)
        m.options.update(listen_port=8081)
        await connected(m)
    run(scenario)
    assert calls == ["before", "configure", "after-configure"]
