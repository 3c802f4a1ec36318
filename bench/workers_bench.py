"""`warden run --workers 2` against `--workers 1` (issue 7 target: >= 1.7x throughput on 2 cores).

Same harness as bench/run.py (nginx origin, the C load generator, processes stopped by PID);
runs alternate w1, w2, w1, w2 and the medians are compared. Usage:
    .venv/bin/python bench/workers_bench.py [--rounds N] [--duration S]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchlib.loadgen import run_lg
from benchlib.proxies import WARDEN, ProxySpec, _warden_argv, start_proxy
from benchlib.results import write_results
from benchlib.scenarios import Scenario
from benchlib.session import bench_session

TARGET = 1.7


def spec(workers: int) -> ProxySpec:
    def argv(env, port, extra):  # noqa: ANN001, ANN202 - harness callback
        return [*_warden_argv(env, port, extra), "--workers", str(workers)]
    return ProxySpec(f"warden-w{workers}", argv, env=WARDEN.env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    scenarios = [Scenario("http", True, 64, "128B"), Scenario("intercept", True, 64, "128B")]
    rows = []
    with bench_session() as sess:
        for sc in scenarios:
            rps: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.rounds):
                for workers in (1, 2):
                    rp = start_proxy(sess.procs, spec(workers), sess.env)
                    try:
                        lg_args = sc.lg_args(sess.env.origin, rp.port)
                        assert lg_args is not None
                        run_lg(sess.lg, lg_args, 1.0)  # warm-up: TLS sessions, certificates
                        result = run_lg(sess.lg, lg_args, args.duration)
                        rps[workers].append(result.ok / args.duration)
                        print(f"workers_bench: {sc.name} w{workers} {rps[workers][-1]:,.1f} req/s "
                              f"errors {result.errors}", file=sys.stderr)
                    finally:
                        sess.procs.stop(rp.proc)
            one, two = statistics.median(rps[1]), statistics.median(rps[2])
            rows.append((sc.name, one, two, two / one))
    lines = [f"# Warden --workers benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}", "",
             "| scenario | 1 worker req/s | 2 workers req/s | ratio | target >= 1.7 |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {one:,.1f} | {two:,.1f} | {ratio:.2f} | {'**met**' if ratio >= TARGET else '**NOT met**'} |"
              for name, one, two, ratio in rows]
    write_results("workers", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
