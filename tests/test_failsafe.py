"""Hook exceptions deny: mitmproxy's safecall would log them and let the flow through."""

from __future__ import annotations

from egresswarden.runtime.context import record_of
from egresswarden.runtime.failsafe import fail_closed, on_hook_error
from mitmproxy.test import taddons, tflow


class Exploding:
    @fail_closed
    def requestheaders(self, flow) -> None:  # noqa: ANN001
        raise RuntimeError("secret-looking text that must not reach the agent")

    @fail_closed
    async def http_connect(self, flow) -> None:  # noqa: ANN001
        raise KeyError("boom")


def test_sync_hook_exception_denies_with_500_and_no_exception_text() -> None:
    seen: list[str] = []
    addon = Exploding()
    on_hook_error(seen.append, addon)
    with taddons.context(addon):
        flow = tflow.tflow()
        addon.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 500
        body = flow.response.get_text()
        assert "internal_error" in body and "secret-looking" not in body
        assert record_of(flow).decision is not None and record_of(flow).decision.reason.value == "internal_error"
        assert seen == ["requestheaders"]  # once, to the listener registered for this part
        other: list[str] = []
        on_hook_error(other.append, Exploding())
        addon.requestheaders(tflow.tflow())
        assert seen == ["requestheaders"] * 2 and other == []


def test_async_hook_exception_denies() -> None:
    import asyncio

    async def run() -> None:
        addon = Exploding()
        with taddons.context(addon):
            flow = tflow.tflow()
            flow.request.method = "CONNECT"
            await addon.http_connect(flow)
            assert flow.response is not None and flow.response.status_code == 500

    asyncio.run(run())
