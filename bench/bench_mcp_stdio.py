#!/usr/bin/env python3
"""Added latency of `warden mcp stdio`: one tools/call through Warden vs straight to the server.

    .venv/bin/python bench/bench_mcp_stdio.py [--calls 1000] [--rounds 2]

The server is the test fixture (tests/mcp_stdio_server.py, the `mcp` SDK's MCPServer over
stdio); the tool is `add` with an arguments JSON Schema in the rules, so Warden parses,
decides (catalog, deny list, pins, schema), re-serializes, audits (hash-chained log) and
filters the answer. The client is a minimal line client over pipes (no SDK on the client side,
so its overhead does not hide Warden's). Direct and Warden runs alternate, `--rounds` times
each, after 50 warm-up calls per session; the report gives p50/p99 of each and their difference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.mcp_stdio_helpers import FIXTURE, write_rules  # noqa: E402

WARDEN = str(Path(sys.executable).parent / "warden")
RESULTS = REPO / "bench" / "results"


class LineClient:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        self.next_id = 0

    def request(self, method: str, params: dict[str, object]) -> dict[str, object]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                          "params": params}).encode() + b"\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise EOFError("server closed stdout")
            msg = json.loads(line)
            if msg.get("id") == self.next_id and "method" not in msg:
                return msg  # type: ignore[no-any-return]

    def initialize(self) -> None:
        assert self.proc.stdin is not None
        self.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                    "clientInfo": {"name": "bench", "version": "1"}})
        self.proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        self.proc.stdin.flush()
        self.request("tools/list", {})

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def measure(client: LineClient, calls: int) -> list[float]:
    for i in range(50):
        client.request("tools/call", {"name": "add", "arguments": {"a": i % 100, "b": 1}})
    out = []
    for i in range(calls):
        start = time.perf_counter()
        answer = client.request("tools/call", {"name": "add", "arguments": {"a": i % 100, "b": 2}})
        out.append(time.perf_counter() - start)
        assert "result" in answer and not answer["result"].get("isError"), answer  # type: ignore[union-attr]
    return out


def cpu_seconds(pid: int) -> float:
    """User+system CPU a process has used so far (robust to scheduling noise on a shared machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        setup = write_rules(Path(tmp))
        direct_env = {"PATH": "/usr/bin:/bin", "MCP_LOG": str(Path(tmp) / "direct.log"), "API_TOKEN": "x"}
        direct: list[float] = []
        warden: list[float] = []
        warden_cpu = 0.0
        for _ in range(args.rounds):
            c = LineClient([sys.executable, str(FIXTURE)], env=direct_env)
            c.initialize()
            direct += measure(c, args.calls)
            c.close()
            c = LineClient([WARDEN, *setup.args()])
            c.initialize()
            before = cpu_seconds(c.proc.pid)
            warden += measure(c, args.calls)
            warden_cpu += cpu_seconds(c.proc.pid) - before
            c.close()
        records = sum(1 for _ in setup.audit.open())
    rows = [("direct stdio", direct), ("through warden mcp stdio", warden)]
    lines = [f"# warden mcp stdio latency ({dt.datetime.now().isoformat(timespec='seconds')})", "",
             f"{args.rounds} rounds x {args.calls} tools/call per side (alternating), 50 warm-up calls per session;"
             f" {records} audit records written.", "",
             "| path | p50 us | p99 us | mean us |", "|---|---|---|---|"]
    for name, values in rows:
        lines.append(f"| {name} | {pct(values, 0.5):.0f} | {pct(values, 0.99):.0f} | "
                     f"{statistics.fmean(values) * 1e6:.0f} |")
    lines.append(f"| added by Warden | {pct(warden, 0.5) - pct(direct, 0.5):.0f} | "
                 f"{pct(warden, 0.99) - pct(direct, 0.99):.0f} | "
                 f"{(statistics.fmean(warden) - statistics.fmean(direct)) * 1e6:.0f} |")
    per_call = warden_cpu / (args.rounds * (args.calls + 50)) * 1e6
    lines += ["", f"CPU used by the `warden mcp stdio` process: {per_call:.0f} us per call "
              f"(user+system, /proc; {os.cpu_count()} cores shared with other work, so latency percentiles are noisy)."]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"mcp-stdio-{stamp}.md").write_text(text)
    (RESULTS / "mcp-stdio-latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
