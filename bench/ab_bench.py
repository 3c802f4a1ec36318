"""Two Warden builds side by side (and bare mitmdump), interleaved, on chosen scenarios.

`make bench` compares Warden with bare mitmdump and squid; this answers "did my change pay
off?" on a noisy machine: the builds run in alternation, round after round, in one
invocation, so background load hits both alike. Reported per scenario and build: median
req/s over rounds and proxy CPU ms per request (the steadier number), plus the ratio of
each to the first build.

    .venv/bin/python bench/ab_bench.py --other /path/to/other/checkout/.venv/bin/warden \\
        --scenarios http-ka-c64-128B,intercept-ka-c16-1MiB --rounds 5 --duration 5

`--startup N` measures only start-up instead (spawn -> first proxied request answered 200, as
`make bench` does), N alternating starts per build.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package: benchlib beside it

from benchlib.loadgen import run_lg  # noqa: E402
from benchlib.procs import tree_cpu_seconds  # noqa: E402
from benchlib.proxies import BARE, ProxySpec, other_build, own_ca, start_proxy, warden_binary  # noqa: E402
from benchlib.scenarios import FULL_MATRIX  # noqa: E402
from benchlib.session import bench_session  # noqa: E402
from benchlib.setup import byte_compile_warden  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", required=True, help="the other build's warden executable")
    p.add_argument("--scenarios", default="http-ka-c64-128B,intercept-ka-c16-1MiB,cred-ka-c16-128B")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--no-bare", action="store_true")
    p.add_argument("--startup", type=int, default=0, metavar="N",
                   help="measure start-up only: N alternating starts per build")
    p.add_argument("--other-ca-key", choices=("ecdsa", "rsa"),
                   help="give the other build its own CA of this key type (a build from before "
                        "2026-12-01 ran on mitmproxy's RSA-2048 CA); default: the shared one")
    args = p.parse_args()
    names = [n.strip() for n in args.scenarios.split(",")]
    scenarios = [s for s in FULL_MATRIX if s.name in names]
    specs = [other_build("this", warden_binary()), other_build("other", args.other)]
    byte_compile_warden(args.other)  # bench_session does this build's
    if not args.no_bare:
        specs.append(BARE)
    if args.startup:
        return startup_only(specs, args.startup)
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with bench_session(False) as sess:
        if args.other_ca_key:
            specs[1] = other_build("other", args.other, own_ca(warden_binary(), sess.tmp / "other-ca", args.other_ca_key))
        for rnd in range(args.rounds):
            for sc in scenarios:
                order = specs if rnd % 2 == 0 else specs[::-1]  # no build always goes first
                for spec in order:
                    rp = start_proxy(sess.procs, spec, sess.env)
                    try:
                        lg_args = sc.lg_args(sess.env.origin, rp.port)
                        assert lg_args is not None
                        run_lg(sess.lg, lg_args, args.warmup)
                        cpu0 = tree_cpu_seconds(rp.proc.pid)
                        res = run_lg(sess.lg, lg_args, args.duration)
                        cpu = tree_cpu_seconds(rp.proc.pid) - cpu0
                    finally:
                        sess.procs.stop(rp.proc)
                    ms = cpu / res.ok * 1000 if res.ok else float("nan")
                    results.setdefault((sc.name, spec.name), []).append((res.rps, ms))
                    print(f"round {rnd + 1} {sc.name:24} {spec.name:6} {res.rps:10,.1f} req/s "
                          f"{ms:6.3f} ms CPU/req errors {res.errors}", flush=True)
    print(f"\n| scenario | build | req/s (median of {args.rounds}) | x this | CPU ms/req | x this |")
    print("|---|---|---|---|---|---|")
    for sc in scenarios:
        ref = results[(sc.name, "this")]
        ref_rps = statistics.median(r for r, _ in ref)
        ref_ms = statistics.median(m for _, m in ref)
        for spec in specs:
            runs = results[(sc.name, spec.name)]
            rps = statistics.median(r for r, _ in runs)
            ms = statistics.median(m for _, m in runs)
            print(f"| {sc.name} | {spec.name} | {rps:,.1f} | {rps / ref_rps:.2f} | {ms:.3f} | {ms / ref_ms:.2f} |")
    return 0


def startup_only(specs: list[ProxySpec], n: int) -> int:
    times: dict[str, list[float]] = {spec.name: [] for spec in specs}
    with bench_session(False) as sess:
        for i in range(n):
            for spec in specs if i % 2 == 0 else specs[::-1]:
                rp = start_proxy(sess.procs, spec, sess.env)
                sess.procs.stop(rp.proc)
                times[spec.name].append(rp.startup_s * 1000)
    ref = statistics.median(times["this"])
    print(f"\n| build | start-up ms (median of {n}) | min | max | x this |")
    print("|---|---|---|---|---|")
    for name, ms in times.items():
        med = statistics.median(ms)
        print(f"| {name} | {med:,.0f} | {min(ms):,.0f} | {max(ms):,.0f} | {med / ref:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
