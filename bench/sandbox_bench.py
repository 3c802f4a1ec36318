"""Benchmark `warden sandbox` (by hand, never in CI): start-up overhead and bridge throughput.

    .venv/bin/python bench/sandbox_bench.py [--runs N] [--requests N]

1. Start-up: wall time of `true`, `warden sandbox --attach SOCK -- true` and the embedded
   `warden sandbox --rules DIR -- true` (which starts and stops its own `warden run`).
2. Request loop: N sequential plain-HTTP GETs with urllib (a new proxy connection each) and a
   64 MiB download with curl, inside the sandbox through the bridge, against the same loop
   outside with HTTP_PROXY pointing straight at the same Warden. Both loops time themselves
   (curl: time_total), so the difference is the bridge alone: two relays and a port
   announcement on the admin socket per proxy connection.

Everything is on 127.0.0.1; processes are stopped by PID. Results: printed and written to
bench/results/sandbox-<time>.md and sandbox-latest.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import WARDEN, hosts_file, run_origin, sha256_hex, start_warden  # noqa: E402

RESULTS = REPO / "bench" / "results"
BIG = 64 * 1024 * 1024
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
LOOP = """
import os, sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": os.environ["http_proxy"]}))
t = time.perf_counter()
for _ in range(n):
    opener.open(url, timeout=20).read()
print(time.perf_counter() - t)
"""


def _handler(req: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
    if req.path == "/big":
        return 200, {"Content-Type": "application/octet-stream"}, b"x" * BIG
    return 200, {"Content-Type": "text/plain"}, b"ok\n"


def timed(cmd: list[str], env: dict[str, str], cwd: str) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return elapsed


def run_out(cmd: list[str], env: dict[str, str], cwd: str) -> str:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:6]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    if shutil.which("bwrap") is None:
        print("bench: needs bubblewrap (make system-deps)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="warden-sandbox-bench-", dir="/var/tmp"))
    try:
        return _bench(base, args.runs, args.requests)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _bench(base: Path, runs: int, requests: int) -> int:
    work, proj = base / "warden", base / "proj"
    work.mkdir()
    proj.mkdir()
    with run_origin(_handler) as origin:
        rules = {"agents": [{"id": "coder", "token_sha256": [sha256_hex("tok")], "policies": ["p"]}],
                 "policies": {"p": {"allow": [{"host": "allowed.test", "ports": [origin.port]}]}},
                 "sandbox_profiles": {"default": {"deny_commands": []}},
                 "settings": {"hosts_file": str(hosts_file(work / "hosts")), "private_networks": "allow"}}
        admin = base / "admin" / "warden.sock"
        warden = start_warden(work, rules, extra_args=["--admin-socket", str(admin)], agents={"coder": "tok"})
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(base), "LANG": "C.UTF-8",
               "XDG_STATE_HOME": str(base / "state")}
        cwd = str(proj)
        attach = [WARDEN, "sandbox", "--agent", "coder", "--attach", str(admin), "--"]
        embedded = [WARDEN, "sandbox", "--agent", "coder", "--rules", str(warden.rules_dir),
                    "--confdir", str(work / "certs"), "--audit-log", str(base / "embedded.jsonl"), "--"]
        try:
            timed([*attach, "true"], env, cwd)  # warm caches
            startup = {
                "true": [timed(["true"], env, cwd) for _ in range(runs)],
                "attached": [timed([*attach, "true"], env, cwd) for _ in range(runs)],
                "embedded": [timed([*embedded, "true"], env, cwd) for _ in range(max(3, runs // 2))],
            }
            url = f"http://allowed.test:{origin.port}/small"
            direct_env = dict(env, http_proxy=warden.proxy_url("coder"))
            loop_direct = [float(run_out([PY, "-c", LOOP, url, str(requests)], direct_env, cwd)) for _ in range(3)]
            # the loop times itself inside the sandbox, so the sandbox's start-up is not in it
            loop_bridge = [float(run_out([*attach, PY, "-c", LOOP, url, str(requests)], env, cwd)) for _ in range(3)]
            big = f"http://allowed.test:{origin.port}/big"
            curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}", "--max-time", "120", big]
            dl_direct = [float(run_out(curl, direct_env, cwd)) for _ in range(3)]
            dl_bridge = [float(run_out([*attach, *curl], env, cwd)) for _ in range(3)]
        finally:
            warden.stop()

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.1f} ms (min {min(values) * 1000:.1f})"

    rps_d = requests / statistics.median(loop_direct)
    rps_b = requests / statistics.median(loop_bridge)
    mbs_d = BIG / statistics.median(dl_direct) / 1e6
    mbs_b = BIG / statistics.median(dl_bridge) / 1e6
    text = "\n".join([
        f"# warden sandbox benchmark ({dt.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores)",
        "",
        f"Start-up, median of {runs} runs (embedded: {len(startup['embedded'])}):",
        "",
        "| command | wall time | overhead over `true` |",
        "|---|---|---|",
        f"| `true` | {ms(startup['true'])} | |",
        f"| `warden sandbox --attach SOCK -- true` | {ms(startup['attached'])} | "
        f"{(statistics.median(startup['attached']) - statistics.median(startup['true'])) * 1000:.1f} ms |",
        f"| `warden sandbox --rules DIR -- true` (embedded) | {ms(startup['embedded'])} | "
        f"{(statistics.median(startup['embedded']) - statistics.median(startup['true'])) * 1000:.1f} ms |",
        "",
        f"Request loop ({requests} sequential GETs, new proxy connection each; 64 MiB curl download), median of 3:",
        "",
        "| path | loop | requests/s | download MB/s |",
        "|---|---|---|---|",
        f"| HTTP_PROXY straight to Warden | {ms(loop_direct)} | {rps_d:.0f} | {mbs_d:.0f} |",
        f"| inside the sandbox, through the bridge | {ms(loop_bridge)} | {rps_b:.0f} | {mbs_b:.0f} |",
        "",
        f"Bridge cost: {(1 / rps_b - 1 / rps_d) * 1e6:.0f} us per request+connection "
        f"({(1 - rps_b / rps_d) * 100:.0f}% fewer requests/s), {(1 - mbs_b / mbs_d) * 100:.0f}% lower bulk throughput.",
        "",
    ])
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"sandbox-{stamp}.md").write_text(text)
    (RESULTS / "sandbox-latest.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
