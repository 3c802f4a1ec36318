#!/usr/bin/env python3
"""Warden against Warden: one change at a time, side by side in one run (issue 17).

    .venv/bin/python bench/variants_bench.py --variants ca [--scenarios intercept-new-c16-128B] [--rounds 4]
    .venv/bin/python bench/variants_bench.py --variants loop --scenarios passthrough-ka-c16-128B,passthrough-new-c16-128B
    .venv/bin/python bench/variants_bench.py --variants splice --with-squid \
        --scenarios passthrough-ka-c16-128B,passthrough-new-c16-128B,passthrough-ka-c16-1MiB,passthrough-new-c16-1MiB

Variant sets:
  ca    Warden with an RSA-2048 CA vs an ECDSA P-256 CA (`warden ca init --key-type`): mitmproxy
        signs every leaf with the CA key and gives it the CA's public key, so this is the key
        type of every intercepted handshake.
  loop  Warden on asyncio's default loop vs on uvloop (WARDEN_EVENT_LOOP=asyncio|uvloop).
  splice  Warden relaying passed-through tunnels through mitmproxy's TCP layer
        (`--set warden_splice=false`) vs in the kernel (os.splice, the default).
  fastconnect  Every connection through mitmproxy (`--set warden_fast_connect=false`) vs
        Warden's own listener for allowed passthrough CONNECTs (runtime/fastconnect.py, the default).

`--with-squid` adds squid (bench/README.md) as a third proxy in every round where it applies,
with per-round ratios against it: the issue 17 target for passthrough is >= 0.8x squid.

Same harness as `make bench` (bench/README.md): nginx origin, the C load generator, a fresh
proxy per run, rounds alternate A B A B. On a shared 2-core machine absolute numbers move a
lot; read the per-round ratios, which compare two runs made seconds apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchlib.proxies import SQUID, WARDEN, BenchEnv, ProxySpec, _warden_argv
from benchlib.report import f, table
from benchlib.results import write_results
from benchlib.scenarios import FULL_MATRIX, S
from benchlib.session import bench_session
from run import measure_run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "addons"))
# Scenarios only variant runs measure (not in `make bench`: it already takes ~8 min).
EXTRA_SCENARIOS = [S("passthrough", False, 16, "1MiB")]


def with_set(*items: str) -> object:
    def argv(env: BenchEnv, port: int, extra: dict[str, object]) -> list[str]:
        args = _warden_argv(env, port, extra)
        for item in items:
            args += ["--set", item]
        return args
    return argv


def with_confdir(confdir: Path) -> object:
    def argv(env: BenchEnv, port: int, extra: dict[str, object]) -> list[str]:
        args = _warden_argv(env, port, extra)
        args[args.index("--confdir") + 1] = str(confdir)
        return args
    return argv


def variant_specs(kind: str, tmp: Path) -> list[ProxySpec]:
    if kind == "ca":
        from egresswarden.cli import ca

        specs = []
        for key_type in ("rsa", "ecdsa"):
            confdir = tmp / f"ca-{key_type}"
            ca.init_ca(confdir, key_type=key_type)
            specs.append(ProxySpec(f"warden-{key_type}", with_confdir(confdir), env=dict(WARDEN.env)))  # type: ignore[arg-type]
        return specs
    if kind == "loop":
        return [ProxySpec(f"warden-{loop}", WARDEN.argv, env={**WARDEN.env, "WARDEN_EVENT_LOOP": loop})
                for loop in ("asyncio", "uvloop")]
    if kind == "splice":
        return [ProxySpec("warden-mitmrelay", with_set("warden_splice=false"), env=dict(WARDEN.env)),  # type: ignore[arg-type]
                ProxySpec("warden-splice", with_set("warden_splice=true"), env=dict(WARDEN.env))]  # type: ignore[arg-type]
    if kind == "fastconnect":
        return [ProxySpec("warden-mitmproxy", with_set("warden_fast_connect=false"), env=dict(WARDEN.env)),  # type: ignore[arg-type]
                ProxySpec("warden-fast", with_set("warden_fast_connect=true"), env=dict(WARDEN.env))]  # type: ignore[arg-type]
    raise SystemExit(f"unknown variant set {kind!r}")


def spread(rps: dict[str, list[float]], num: str, den: str) -> str:
    """Per-round req/s ratio num/den (the two ran seconds apart): range and median."""
    ratios = [y / x for x, y in zip(rps[den], rps[num], strict=True)]
    return f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", required=True, choices=["ca", "loop", "splice", "fastconnect"])
    p.add_argument("--with-squid", action="store_true", help="squid as a third proxy where it applies")
    p.add_argument("--scenarios", default="intercept-new-c16-128B")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=3.0)
    args = p.parse_args()
    wanted = args.scenarios.split(",")
    known = FULL_MATRIX + EXTRA_SCENARIOS
    scenarios = [next(sc for sc in known if sc.name == name) for name in wanted if any(sc.name == name for sc in known)]
    if len(scenarios) != len(wanted):
        raise SystemExit(f"unknown scenario in {wanted}; known: {[sc.name for sc in known]}")
    with bench_session() as sess:
        variants = variant_specs(args.variants, sess.tmp)
        rows = []
        for sc in scenarios:
            specs = variants + ([SQUID] if args.with_squid and sc.squid_applicable else [])
            rps: dict[str, list[float]] = {s.name: [] for s in specs}
            p99: dict[str, list[float]] = {s.name: [] for s in specs}
            cpu: dict[str, list[float]] = {s.name: [] for s in specs}
            errors = {s.name: 0 for s in specs}
            for rnd in range(args.rounds):
                order = specs if rnd % 2 == 0 else specs[::-1]  # A B, B A: no fixed second place
                for spec in order:
                    rec = measure_run(sess.procs, sess.lg, sess.env, spec, sc, rnd, args.duration, 0.5)
                    rps[spec.name].append(rec.result.rps)
                    p99[spec.name].append(rec.result.p99_ms)
                    cpu[spec.name].append(rec.cpu_s_per_1k)
                    errors[spec.name] += rec.result.errors
                    print(f"variants: {sc.name:<26} {spec.name:<16} r{rnd} {rec.result.rps:>9,.1f} req/s "
                          f"p99 {rec.result.p99_ms:7.2f} ms errors {rec.result.errors}", flush=True)
            a, b = specs[0].name, specs[1].name
            for spec in specs:
                name = spec.name
                rows.append([sc.name, name, f(statistics.median(rps[name])), f(statistics.median(p99[name]), 2),
                             f(statistics.median(cpu[name]), 3), str(errors[name]),
                             spread(rps, b, a) if name == b else "",
                             spread(rps, name, SQUID.name) if SQUID.name in rps and name != SQUID.name else ""])
    text = (f"# Warden variants: {args.variants}, {args.rounds} rounds x {args.duration:g} s, side by side\n\n"
            + table(["scenario", "variant", "req/s (median)", "p99 ms", "proxy CPU s/1k req", "errors",
                     "per-round req/s ratio B/A", "per-round req/s ratio vs squid"], rows))
    write_results(f"variants-{args.variants}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
