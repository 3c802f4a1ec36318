"""A declared stdio server with `sandbox_profile` runs under `warden sandbox` (bubblewrap): the
SDK client -> `warden mcp stdio` -> `warden sandbox --agent dev --profile files` -> the server.

Paths live under /var/tmp: the sandbox's /tmp is private by design.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .mcp_stdio_helpers import FIXTURE, Setup, sdk_client, text_of, write_rules


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="warden-mcp-sbx-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_sandboxed_stdio_server_runs_in_the_sandbox_and_cannot_read_denied_paths(base: Path) -> None:
    work = base / "work"
    work.mkdir()
    (work / "notes.txt").write_text("project notes")
    secret_file = base / "private" / "key.pem"
    secret_file.parent.mkdir()
    secret_file.write_text("PRIVATE KEY")
    # The server script must exist inside the sandbox: a checkout under /tmp would not (private /tmp).
    server = base / "mcp_stdio_server.py"
    shutil.copy(FIXTURE, server)
    extra = {"cwd": str(work), "sandbox_profile": "files", "args": [str(server)]}
    setup: Setup = write_rules(base, server_extra=extra)
    setup.server_log = work / "server.log"  # the workdir is what the sandbox may write
    write_rules(base, server_extra=extra,
                server_env={"MCP_LOG": str(setup.server_log)}, setup=setup,
                policy_extra={"tools": ["get_weather", "read_file", "show_env"]},
                extra_doc={"sandbox_profiles": {"files": {"deny": [str(secret_file.parent)],
                                                          "env_inherit": ["MCP_LOG", "API_TOKEN"]}}})

    async def body(c: Any) -> tuple[Any, ...]:
        return (await c.call_tool("get_weather", {"location": "Bern"}),
                await c.call_tool("read_file", {"path": str(work / "notes.txt")}),
                await c.call_tool("read_file", {"path": str(secret_file)}),
                await c.call_tool("show_env", {"name": "WARDEN_SANDBOX_ID"}))

    async def main() -> tuple[Any, ...]:
        async with sdk_client(setup) as client:
            return await body(client)

    weather, notes, denied, sandbox_id = asyncio.run(asyncio.wait_for(main(), 120))
    assert text_of(weather) == "sunny in Bern (metric)"
    assert text_of(notes) == "project notes"
    assert text_of(denied).startswith("cannot read") and "PRIVATE KEY" not in text_of(denied)
    assert text_of(sandbox_id).startswith("WARDEN_SANDBOX_ID=sb-")  # it really ran inside `warden sandbox`
    started = next(r for r in setup.records() if r.get("event") == "mcp_session" and r.get("result") == "started")
    assert started["sandbox_profile"] == "files"
    assert [r["tool"] for r in setup.ran()] == ["get_weather", "read_file", "read_file", "show_env"]
