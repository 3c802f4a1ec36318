#!/usr/bin/env python3
"""Soak (issue 3): 200,000 requests through Warden with audit log and metrics
on; resident memory at start and end (target: growth < 10%).

    .venv/bin/python bench/soak.py [--requests 200000] [--chunk 5] [--max-seconds 1200]

Traffic rotates, chunk by chunk, through the request kinds that allocate
per-request state in Warden (plain HTTP, intercepted HTTPS, credential
injection, new passthrough tunnels, denied CONNECTs). "Start" RSS is taken
after one warm-up chunk of every kind, so one-off allocations (imports,
generated leaf certificates, connection pools) are not counted as growth.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import urllib.request
from pathlib import Path

from benchlib.loadgen import run_lg
from benchlib.procs import tree_rss_mib
from benchlib.proxies import WARDEN, RunningProxy, start_proxy, warden_status
from benchlib.report import f, ok, table
from benchlib.results import write_results
from benchlib.scenarios import Scenario
from benchlib.session import Session, bench_session

REPO = Path(__file__).resolve().parent.parent

TARGET_GROWTH = 0.10
MIX = [Scenario("http", True, 16, "128B"), Scenario("intercept", True, 16, "128B"),
       Scenario("cred", True, 16, "128B"), Scenario("passthrough", False, 16, "128B"),
       Scenario("denied", False, 16, "128B")]


def require_warden() -> None:
    why_not = warden_status()
    if why_not is not None:
        sys.exit(f"soak: Warden is not usable yet ({why_not}); this soak needs `warden run`.")


def run_chunk(sess: Session, rp: RunningProxy, sc: Scenario, seconds: float) -> tuple[int, int]:
    args = sc.lg_args(sess.env.origin, rp.port)
    assert args is not None
    res = run_lg(sess.lg, args, seconds)
    return res.ok, res.errors


def metrics_summary(rp: RunningProxy) -> str:
    if rp.metrics_port is None:
        return "n/a"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{rp.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode(errors="replace")
    except OSError as e:
        return f"unreachable ({e})"
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    return f"{len(text):,} bytes, {len(samples):,} samples"


def audit_summary(rp: RunningProxy) -> str:
    if rp.audit_log is None or not rp.audit_log.exists():
        return "not written"
    size = rp.audit_log.stat().st_size
    with open(rp.audit_log, "rb") as fh:
        lines = sum(1 for _ in fh)
    return f"{size / 2**20:,.1f} MiB, {lines:,} records"


def downsample(xs: list[float], n: int) -> list[float]:
    """At most n evenly spaced points, always including the first and the last."""
    if len(xs) <= n:
        return xs
    return [xs[round(i * (len(xs) - 1) / (n - 1))] for i in range(n)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--chunk", type=float, default=5.0, help="seconds per load chunk")
    p.add_argument("--max-seconds", type=float, default=1200, help="stop (and say so) after this long")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args()
    require_warden()
    with bench_session(args.keep_tmp) as sess:
        rp = start_proxy(sess.procs, WARDEN, sess.env)
        try:
            for sc in MIX:  # warm-up: one chunk of every kind
                run_chunk(sess, rp, sc, min(args.chunk, 2.0))
            rss_start = tree_rss_mib(rp.proc.pid)
            done = errors = chunks = 0
            trace: list[float] = [rss_start]
            t0 = time.monotonic()
            while done < args.requests and time.monotonic() - t0 < args.max_seconds:
                ok_n, err_n = run_chunk(sess, rp, MIX[chunks % len(MIX)], args.chunk)
                done, errors, chunks = done + ok_n, errors + err_n, chunks + 1
                trace.append(tree_rss_mib(rp.proc.pid))
                print(f"soak: {done:>9,} requests, RSS {trace[-1]:7.1f} MiB, errors {errors}", flush=True)
            elapsed = time.monotonic() - t0
            rss_end = tree_rss_mib(rp.proc.pid)
            metrics, audit = metrics_summary(rp), audit_summary(rp)
        finally:
            sess.procs.stop(rp.proc)
    growth = (rss_end - rss_start) / rss_start
    complete = done >= args.requests
    text = "\n".join([
        f"# Warden soak {dt.datetime.now():%Y-%m-%d %H:%M:%S}", "",
        table(["target", "figure", "met"], [
            [f"RSS growth < {TARGET_GROWTH:.0%} over {args.requests:,} requests",
             f"{rss_start:.1f} -> {rss_end:.1f} MiB ({growth:+.1%})",
             ok(growth < TARGET_GROWTH) if complete else f"incomplete ({done:,} requests)"],
        ]),
        table(["figure", "value"], [
            ["requests (after warm-up)", f"{done:,} in {elapsed:.0f} s ({done / elapsed:,.0f} req/s)"],
            ["failed requests", str(errors)],
            ["RSS min / max during soak", f"{min(trace):.1f} / {max(trace):.1f} MiB"],
            ["RSS trace (MiB, start to end)", " ".join(f(x, 1) for x in downsample(trace, 16))],
            ["metrics endpoint at end", metrics],
            ["audit log at end", audit],
            ["traffic mix (rotating chunks)", ", ".join(sc.name for sc in MIX)],
        ]),
    ])
    write_results("soak", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
