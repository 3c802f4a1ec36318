"""Hook exceptions deny: mitmproxy's safecall would log them and let the flow through.

The chain's dispatcher applies `fail_closed` to every flow and connection handler of every
part, so a stage cannot forget it."""

from __future__ import annotations

import asyncio

from egresswarden.runtime.chain import WardenAddon
from egresswarden.runtime.context import record_of
from egresswarden.runtime.failsafe import guarded_stream
from mitmproxy.test import taddons, tflow


class Exploding:
    def requestheaders(self, flow) -> None:  # noqa: ANN001
        raise RuntimeError("secret-looking text that must not reach the agent")

    async def http_connect(self, flow) -> None:  # noqa: ANN001
        raise KeyError("boom")

    def configure(self, updated) -> None:  # noqa: ANN001
        if "boom" in updated:
            raise ValueError("lifecycle errors must propagate")


def test_sync_hook_exception_denies_with_500_and_no_exception_text() -> None:
    seen: list[str] = []
    addon = WardenAddon([Exploding()], seen.append)
    with taddons.context(addon):
        flow = tflow.tflow()
        addon.requestheaders(flow)  # type: ignore[attr-defined]
        assert flow.response is not None and flow.response.status_code == 500
        body = flow.response.get_text()
        assert body is not None and "internal_error" in body and "secret-looking" not in body
        decision = record_of(flow).decision
        assert decision is not None and decision.reason.value == "internal_error"
    assert seen == ["requestheaders"], "one count per swallowed exception"


def test_async_hook_exception_denies() -> None:
    async def run() -> None:
        addon = WardenAddon([Exploding()])
        with taddons.context(addon):
            flow = tflow.tflow()
            flow.request.method = "CONNECT"
            await addon.http_connect(flow)  # type: ignore[attr-defined]
            assert flow.response is not None and flow.response.status_code == 500

    asyncio.run(run())


def test_lifecycle_errors_propagate() -> None:
    addon = WardenAddon([Exploding()])
    try:
        addon.configure({"boom"})  # type: ignore[attr-defined]
    except ValueError:
        return
    raise AssertionError("a configure error was swallowed")


def test_a_failing_stream_callable_ends_the_body_instead_of_passing_it() -> None:
    flow = tflow.tflow()
    calls = 0

    def scan(chunk: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("scanner bug")
        return chunk

    guarded = guarded_stream(scan, record_of(flow), "test")
    assert guarded(b"first") == b"first"
    assert guarded(b"second") == []
    assert guarded(b"third") == [], "nothing after a failure is forwarded"
    decision = record_of(flow).decision
    assert decision is not None and decision.reason.value == "internal_error"
