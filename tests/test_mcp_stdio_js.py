"""A second MCP client implementation through `warden mcp stdio`: the TypeScript SDK's own Client
and StdioClientTransport (tests/js/client.mjs), against the same real SDK stdio server.

The npm package is installed from the registry into tests/js/node_modules (pinned in
tests/js/package.json and package-lock.json) on first use, or by `make js-test-deps`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from .harness import WARDEN
from .mcp_stdio_helpers import write_rules

JS = Path(__file__).resolve().parent / "js"


def ensure_sdk() -> None:
    if (JS / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json").exists():
        return
    npm = shutil.which("npm")
    assert npm is not None, "npm is needed (make system-deps installs nodejs and npm)"
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=JS, check=True, timeout=300)


def test_typescript_sdk_client_through_warden_mcp_stdio(tmp_path: Path) -> None:
    ensure_sdk()
    setup = write_rules(tmp_path)
    node = shutil.which("node")
    assert node is not None
    out = subprocess.run([node, str(JS / "client.mjs"), WARDEN, *setup.args()], capture_output=True, text=True,
                         timeout=120, cwd=JS)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "delete_all" not in seen["tools"] and "get_weather" in seen["tools"]
    assert seen["weather"] == {"text": "sunny in Kyoto (metric)", "isError": False}
    assert seen["denied"]["isError"] and "explicitly denied" in seen["denied"]["text"]
    assert seen["bad"]["isError"] and "'maximum' must hold (100)" in seen["bad"]["text"]
    assert "not allowed" in seen["resource"]
    assert [r["tool"] for r in setup.ran()] == ["get_weather"]
    assert setup.verify().returncode == 0
