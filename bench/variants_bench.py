#!/usr/bin/env python3
"""Warden against Warden: one change at a time, side by side in one run (issue 17).

    .venv/bin/python bench/variants_bench.py --variants ca [--scenarios intercept-new-c16-128B] [--rounds 4]
    .venv/bin/python bench/variants_bench.py --variants loop --scenarios passthrough-ka-c16-128B,passthrough-new-c16-128B

Variant sets:
  ca    Warden with an RSA-2048 CA vs an ECDSA P-256 CA (`warden ca init --key-type`): mitmproxy
        signs every leaf with the CA key and gives it the CA's public key, so this is the key
        type of every intercepted handshake.
  loop  Warden on asyncio's default loop vs on uvloop (WARDEN_EVENT_LOOP=asyncio|uvloop).

Same harness as `make bench` (bench/README.md): nginx origin, the C load generator, a fresh
proxy per run, rounds alternate A B A B. On a shared 2-core machine absolute numbers move a
lot; read the per-round ratios, which compare two runs made seconds apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchlib.proxies import WARDEN, BenchEnv, ProxySpec, _warden_argv
from benchlib.report import f, table
from benchlib.results import write_results
from benchlib.scenarios import FULL_MATRIX
from benchlib.session import bench_session
from run import measure_run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "addons"))


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
    raise SystemExit(f"unknown variant set {kind!r}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", required=True, choices=["ca", "loop"])
    p.add_argument("--scenarios", default="intercept-new-c16-128B")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=3.0)
    args = p.parse_args()
    wanted = args.scenarios.split(",")
    scenarios = [sc for sc in FULL_MATRIX if sc.name in wanted]
    if len(scenarios) != len(wanted):
        raise SystemExit(f"unknown scenario in {wanted}; known: {[sc.name for sc in FULL_MATRIX]}")
    with bench_session() as sess:
        specs = variant_specs(args.variants, sess.tmp)
        rows = []
        for sc in scenarios:
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
            ratios = [y / x for x, y in zip(rps[a], rps[b], strict=True)]
            for name in (a, b):
                rows.append([sc.name, name, f(statistics.median(rps[name])), f(statistics.median(p99[name]), 2),
                             f(statistics.median(cpu[name]), 3), str(errors[name]),
                             f"{min(ratios):.2f}-{max(ratios):.2f}" if name == b else ""])
    text = (f"# Warden variants: {args.variants}, {args.rounds} rounds x {args.duration:g} s\n\n"
            + table(["scenario", "variant", "req/s (median)", "p99 ms", "proxy CPU s/1k req", "errors",
                     "per-round req/s ratio B/A"], rows))
    write_results(f"variants-{args.variants}", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
