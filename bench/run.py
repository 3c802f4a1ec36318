#!/usr/bin/env python3
"""Warden proxy benchmark (GitHub issue 3): Warden vs bare mitmdump vs squid.

    .venv/bin/python bench/run.py            # full run, < 10 min on 2 cores
    .venv/bin/python bench/run.py --quick    # smoke run, < 90 s

Env: BENCH_ROUNDS (default 2), BENCH_DURATION (seconds per measured run,
default 4), BENCH_SCENARIOS (comma-separated scenario names to keep),
BENCH_WARDEN (warden executable, default .venv/bin/warden),
BENCH_NO_SQUID=1 (skip the squid reference column),
BENCH_CA_KEY=rsa (the shared CA, default ecdsa as `warden ca init` makes it),
BENCH_A=bare (force the bare-mitmdump stand-in for A),
BENCH_BASELINE=<warden of the build issue 17 started from> (intercepted new connections
side by side with it, on its own CA: BENCH_BASELINE_CA_KEY, default rsa as it shipped).
See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.loadgen import LgResult, run_lg
from benchlib.procs import Procs, tree_cpu_seconds, tree_peak_rss_mib
from benchlib.proxies import (
    BARE,
    BARE_AS_A,
    PROXY_AUTH_HEADER,
    SQUID,
    WARDEN,
    BenchEnv,
    ProxySpec,
    RunningProxy,
    other_build,
    own_ca,
    start_proxy,
    warden_binary,
    warden_status,
)
from benchlib.report import Report, RunRecord, Summary, f, med, ok, summarize, table
from benchlib.scenarios import FULL_MATRIX, QUICK_MATRIX, Scenario
from benchlib.session import Session, bench_session
from benchlib.setup import byte_compile_warden

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
TARGET_RPS_RATIO, TARGET_P99_RATIO, TARGET_STARTUP_RATIO = 0.95, 1.10, 1.5
# Issue 17's targets. "2x today's Warden" for intercepted new connections: the build of
# 2026-12-01 12:48 (66daadd), side by side when BENCH_BASELINE names its `warden`; else an
# estimate from this run's Warden/bare against that build's Warden/bare then (120.0 vs 91.9
# req/s), since an absolute req/s moves with the machine's state (2x on a quiet day).
ISSUE17_SQUID_RATIO, ISSUE17_BARE_RATIO = 0.8, 1.3
INTERCEPT_NEW = "intercept-new-c16-128B"
ISSUE17_BASELINE_BARE_RATIO = 120.0 / 91.9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 5 scenarios, 1 round, 1 s runs")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (logs, configs)")
    return p.parse_args()


def config(args: argparse.Namespace) -> tuple[list[Scenario], int, float, float]:
    """(scenarios, rounds, measured seconds, warm-up seconds)."""
    scenarios = QUICK_MATRIX if args.quick else FULL_MATRIX
    rounds = args.rounds or int(os.environ.get("BENCH_ROUNDS", 1 if args.quick else 2))
    duration = args.duration or float(os.environ.get("BENCH_DURATION", 1 if args.quick else 4))
    if keep := os.environ.get("BENCH_SCENARIOS"):
        names = {n.strip() for n in keep.split(",")}
        scenarios = [s for s in scenarios + FULL_MATRIX if s.name in names]
        scenarios = list(dict.fromkeys(scenarios))
    warmup = 0.3 if args.quick else 0.5
    return scenarios, rounds, duration, warmup


# ---------------------------------------------------------------- measurements

def measure_run(procs: Procs, lg: Path, env: BenchEnv, spec: ProxySpec, sc: Scenario, rnd: int,
                duration: float, warmup: float) -> RunRecord:
    """Fresh proxy per run, so VmHWM is this scenario's peak and start-up is sampled."""
    rp = start_proxy(procs, spec, env)
    try:
        lg_args = sc.lg_args(env.origin, rp.port)
        assert lg_args is not None
        run_lg(lg, lg_args, warmup)  # cert generation, upstream pools, JIT-ish caches
        cpu0 = tree_cpu_seconds(rp.proc.pid)
        res = run_lg(lg, lg_args, duration)
        cpu = tree_cpu_seconds(rp.proc.pid) - cpu0
        rss = tree_peak_rss_mib(rp.proc.pid)
    finally:
        procs.stop(rp.proc)
    per_1k = cpu / res.ok * 1000 if res.ok else float("nan")
    return RunRecord(sc, spec.name, rnd, res, per_1k, rss, rp.startup_s)


def direct_ceilings(lg: Path, env: BenchEnv, scenarios: list[Scenario],
                    duration: float) -> dict[str, LgResult]:
    """The load generator straight at nginx: proves it is not the bottleneck."""
    out: dict[str, LgResult] = {}
    for sc in scenarios:
        args = sc.lg_args(env.origin, None)
        if args is not None:
            out[sc.name] = run_lg(lg, args, duration)
    return out


def through_tunnel(port: int, host: str, tls_port: int, path: str | None = None) -> tuple[str, bytes]:
    """CONNECT host through the proxy, TLS in the tunnel; (sha256 of the leaf
    certificate the client sees, body of GET path or b"")."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(f"CONNECT {host}:{tls_port} HTTP/1.1\r\nHost: {host}:{tls_port}\r\n"
                    f"{PROXY_AUTH_HEADER}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(1)  # byte-wise: must not swallow the TLS that follows
            if not chunk:
                raise RuntimeError("proxy closed during CONNECT")
            head += chunk
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            raise RuntimeError(f"CONNECT refused: {head.splitlines()[0]!r}")
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # we compare fingerprints
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
            body = b""
            if path:
                tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{tls_port}\r\nConnection: close\r\n\r\n"
                            .encode())
                while chunk := tls.recv(65536):
                    body += chunk
                body = body.split(b"\r\n\r\n", 1)[-1]
    assert der is not None
    return hashlib.sha256(der).hexdigest(), body


@dataclass(frozen=True)
class Checks:
    passthrough_origin_cert: bool   # passthrough.test: the client sees nginx's own certificate
    intercept_proxy_cert: bool      # intercept.test: a proxy-issued one (the check can fail)
    injected: bool                  # cred.test: the origin received the injected Authorization
    audit: str


def behaviour_checks(procs: Procs, env: BenchEnv, spec: ProxySpec) -> Checks:
    rp = start_proxy(procs, spec, env)
    try:
        s, origin_sha = env.origin.https_port, env.origin.cert_sha256
        pt = through_tunnel(rp.port, "passthrough.test", s)[0] == origin_sha
        ic = through_tunnel(rp.port, "intercept.test", s)[0] != origin_sha
        _, seen = through_tunnel(rp.port, "cred.test", s, "/echo-auth")
        injected = seen.strip() == b"injected"  # nginx compares the header with CRED_SECRET
        time.sleep(0.3)  # let the audit writer flush
        audit = audit_interceptions(rp)
    finally:
        procs.stop(rp.proc)
    return Checks(pt, ic, injected, audit)


def audit_interceptions(rp: RunningProxy) -> str:
    """host=interception counts from the audit log (secondary evidence; Warden only)."""
    if rp.audit_log is None:
        return "n/a"
    if not rp.audit_log.exists():
        return "audit log not written"
    counts: dict[str, int] = {}
    for line in rp.audit_log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "interception" not in rec:
            continue  # lifecycle records (chain_start, startup, ...)
        creds = ",".join(rec.get("credential_ids") or [])
        key = f"{rec.get('event')} {rec.get('host')}={rec.get('interception')}" + (f" cred={creds}" if creds else "")
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "empty"


# ---------------------------------------------------------------- report

def proxied_section(summ: dict[tuple[str, str], Summary], scenarios: list[Scenario],
                    proxies: list[str]) -> str:
    rows = []
    for sc in scenarios:
        for px in proxies:
            sm = summ.get((sc.name, px))
            if sm is None:
                if px == "squid":
                    rows.append([sc.name, px, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "0"])
                continue
            rows.append([sc.name, px, f(sm.rps), f(sm.p50_ms, 2), f(sm.p99_ms, 2),
                         f(sm.cpu_s_per_1k, 3), f(sm.peak_rss_mib), str(sm.errors), str(sm.runs)])
    return "## Proxied scenarios (medians over rounds)\n\n" + table(
        ["scenario", "proxy", "req/s", "p50 ms", "p99 ms", "proxy CPU s/1k req", "peak RSS MiB", "errors",
         "runs"], rows)


def paired_ratios(records: list[RunRecord], scenario: str, a: str, b: str) -> list[float]:
    """req/s A/B of each round (A and B ran back to back): shows how noisy the figure is."""
    by_round = {(r.proxy, r.round): r.result.rps for r in records if r.scenario.name == scenario}
    rounds = sorted({rnd for (_, rnd) in by_round})
    return [by_round[(a, r)] / by_round[(b, r)] for r in rounds if (a, r) in by_round and (b, r) in by_round]


def targets_section(summ: dict[tuple[str, str], Summary], records: list[RunRecord], scenarios: list[Scenario],
                    a: str, b: str) -> tuple[str, int, int, int]:
    """(markdown, scenarios compared, throughput targets met, p99 targets met)."""
    rows, n, rps_met, p99_met = [], 0, 0, 0
    for sc in scenarios:
        sa, sb = summ.get((sc.name, a)), summ.get((sc.name, b))
        if not sa or not sb:
            continue
        rr, pr = sa.rps / sb.rps, sa.p99_ms / sb.p99_ms
        n, rps_met, p99_met = n + 1, rps_met + (rr >= TARGET_RPS_RATIO), p99_met + (pr <= TARGET_P99_RATIO)
        per_round = paired_ratios(records, sc.name, a, b)
        spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "n/a"
        sq = summ.get((sc.name, "squid"))
        rows.append([sc.name, f(rr, 3), ok(rr >= TARGET_RPS_RATIO), spread, f(pr, 3),
                     ok(pr <= TARGET_P99_RATIO), f(sq.rps) if sq else "n/a"])
    text = f"## Targets per scenario ({a} / {b})\n\n" + table(
        ["scenario", f"req/s ratio (>= {TARGET_RPS_RATIO})", "met", "per-round req/s ratios",
         f"p99 ratio (<= {TARGET_P99_RATIO})", "met", "squid req/s"], rows)
    return text, n, rps_met, p99_met


def intercept_new_rows(summ: dict[tuple[str, str], Summary], a: str, b: str,
                       side_by_side: list[RunRecord]) -> list[list[str]]:
    if side_by_side:
        by_round: dict[int, dict[str, float]] = {}
        for r in side_by_side:
            by_round.setdefault(r.round, {})[r.proxy] = r.result.rps
        rounds = [v[a] / v["baseline"] for v in by_round.values() if v.get("baseline")]
        pair = summarize(side_by_side)
        ours, base = pair.get((INTERCEPT_NEW, a)), pair.get((INTERCEPT_NEW, "baseline"))
        if ours and base and rounds:
            ratio = ours.rps / base.rps
            return [[f"{INTERCEPT_NEW}: {a} / the issue's build, side by side >= 2",
                     f"{f(ratio, 2)} (per round {f(min(rounds), 2)}-{f(max(rounds), 2)}; {f(ours.rps)} vs "
                     f"{f(base.rps)} req/s)", ok(ratio >= 2.0)]]
    sa, sb = summ.get((INTERCEPT_NEW, a)), summ.get((INTERCEPT_NEW, b))
    if not (sa and sb):
        return []
    estimate = sa.rps / sb.rps / ISSUE17_BASELINE_BARE_RATIO
    return [[f"{INTERCEPT_NEW}: >= 2x the issue's build, estimated as ({a}/{b}) / "
             f"{ISSUE17_BASELINE_BARE_RATIO:.2f} (BENCH_BASELINE measures it side by side)",
             f"{f(estimate, 2)} ({a}/{b} {f(sa.rps / sb.rps, 2)})", ok(estimate >= 2.0)]]


def issue17_section(summ: dict[tuple[str, str], Summary], a: str, b: str,
                    side_by_side: list[RunRecord]) -> str:
    """Each of issue 17's proxy targets, met or not, from this run (engine and memory targets
    have their own benchmarks: bench/engine_bench.py, bench/conn_memory_bench.py)."""
    rows = []

    def get(name: str, proxy: str) -> Summary | None:
        return summ.get((name, proxy))

    for name in ("passthrough-ka-c16-128B", "passthrough-new-c16-128B", "passthrough-ka-c16-1MiB"):
        sa, sq = get(name, a), get(name, "squid")
        if sa and sq:
            ratio = sa.rps / sq.rps
            rows.append([f"{name}: {a}/squid >= {ISSUE17_SQUID_RATIO}", f(ratio, 2),
                         ok(ratio >= ISSUE17_SQUID_RATIO)])
            rows.append([f"{name}: p99 at or below squid's", f"{f(sa.p99_ms, 2)} vs {f(sq.p99_ms, 2)} ms",
                         ok(sa.p99_ms <= sq.p99_ms)])
    rows += intercept_new_rows(summ, a, b, side_by_side)
    for name in ("http-ka-c16-128B", "http-ka-c64-128B", "http-ka-c16-1MiB", "intercept-ka-c16-128B",
                 "intercept-ka-c64-128B", "intercept-ka-c16-1MiB"):
        sa, sb = get(name, a), get(name, b)
        if sa and sb:
            ratio = sa.rps / sb.rps
            rows.append([f"{name}: {a}/{b} >= {ISSUE17_BARE_RATIO}", f(ratio, 2), ok(ratio >= ISSUE17_BARE_RATIO)])
    if not rows:
        return ""
    return ("## Issue 17 targets (this run; engine and memory: bench/engine_bench.py, bench/conn_memory_bench.py)\n\n"
            + table(["target", "measured", "met"], rows))


def checks_section(checks: dict[str, Checks]) -> str:
    rows = [[px, ok(c.passthrough_origin_cert), "yes" if c.intercept_proxy_cert else "no",
             "yes" if c.injected else "no", c.audit] for px, c in checks.items()]
    return "## Behaviour checks (what the client and the origin see, independent of Warden)\n\n" + table(
        ["proxy", "passthrough.test shows the origin's cert (never intercepted)",
         "intercept.test shows a proxy-issued cert (the check can fail)",
         "cred.test: origin got the injected Authorization", "audit log: event host=interception: count"], rows)


def startup_section(startups: dict[str, list[float]], a: str, b: str) -> tuple[str, float]:
    ratio = med(startups.get(a, [])) / med(startups.get(b, []))
    rows = [[px, f(med(v) * 1000, 0), f(min(v) * 1000, 0), f(max(v) * 1000, 0), str(len(v))]
            for px, v in startups.items() if v]
    return ("## Start-up: spawn to first proxied request answered 200\n\n"
            + table(["proxy", "median ms", "min ms", "max ms", "samples"], rows)
            + f"\nStart-up ratio {a}/{b}: {f(ratio, 2)} (target <= {TARGET_STARTUP_RATIO}): "
            f"{ok(ratio <= TARGET_STARTUP_RATIO)}\n"), ratio


def ceiling_section(summ: dict[tuple[str, str], Summary], ceilings: dict[str, LgResult],
                    scenarios: list[Scenario], a: str, b: str) -> str:
    rows = []
    for sc in scenarios:
        c = ceilings.get(sc.name)
        if c is None:
            rows.append([sc.name, "n/a", "n/a", "n/a", "n/a", "n/a"])
            continue
        # Headroom against the proxies being compared (squid is only a reference).
        best = max((s.rps for (n, px), s in summ.items() if n == sc.name and px in (a, b)),
                   default=float("nan"))
        rows.append([sc.name, f(c.rps), f(c.p50_ms, 3), f(c.p99_ms, 3),
                     f(c.cpu_s / max(c.ok, 1) * 1000, 3), f(c.rps / best, 1) + "x"])
    return "## Load generator ceiling (lg direct to nginx, no proxy)\n\n" + table(
        ["scenario", "req/s", "p50 ms", "p99 ms", "lg CPU s/1k req", f"headroom vs fastest of {a}/{b}"], rows)


def render(report: Report, records: list[RunRecord], ceilings: dict[str, LgResult],
           scenarios: list[Scenario], a: str, b: str, checks: dict[str, Checks],
           startups: dict[str, list[float]], side_by_side: list[RunRecord]) -> None:
    summ = summarize(records)
    targets, n, rps_met, p99_met = targets_section(summ, records, scenarios, a, b)
    startup, startup_ratio = startup_section(startups, a, b)
    passthrough_ok = all(c.passthrough_origin_cert for c in checks.values())
    report.sections.append("## Summary\n\n" + table(["target", "result"], [
        [f"req/s {a}/{b} >= {TARGET_RPS_RATIO}", f"{rps_met}/{n} scenarios"],
        [f"p99 {a}/{b} <= {TARGET_P99_RATIO}", f"{p99_met}/{n} scenarios"],
        ["allowed hosts without L7 rules never intercepted", ok(passthrough_ok)],
        [f"start-up {a}/{b} <= {TARGET_STARTUP_RATIO}", f"{f(startup_ratio, 2)}: {ok(startup_ratio <= 1.5)}"],
    ]))
    report.sections += [proxied_section(summ, scenarios, [a, b, "squid"]), targets, issue17_section(summ, a, b, side_by_side),
                        checks_section(checks),
                        startup, ceiling_section(summ, ceilings, scenarios, a, b)]


# ---------------------------------------------------------------- main

def run_matrix(sess: Session, specs: list[ProxySpec], scenarios: list[Scenario], rounds: int,
               duration: float, warmup: float) -> tuple[list[RunRecord], dict[str, list[float]]]:
    """Every scenario: A B squid, A B squid, ... (alternating rounds); start-up samples per proxy."""
    records: list[RunRecord] = []
    startups: dict[str, list[float]] = {s.name: [] for s in specs}
    for sc in scenarios:
        for rnd in range(rounds):
            for spec in specs:
                if spec is SQUID and not sc.squid_applicable:
                    continue
                rec = measure_run(sess.procs, sess.lg, sess.env, spec, sc, rnd, duration, warmup)
                records.append(rec)
                startups[spec.name].append(rec.startup_s)
                print(f"bench: {sc.name:<28} {spec.name:<8} r{rnd} {rec.result.rps:>10,.1f} req/s "
                      f"p99 {rec.result.p99_ms:8.2f} ms  errors {rec.result.errors}", flush=True)
    return records, startups


def main() -> int:
    args = parse_args()
    scenarios, rounds, duration, warmup = config(args)
    with_squid = os.environ.get("BENCH_NO_SQUID") != "1"

    why_not = warden_status()
    if why_not is None:
        spec_a, a_note = WARDEN, f"A = Warden ({warden_binary()})"
    else:
        spec_a = BARE_AS_A
        a_note = (f"A = **bare mitmdump stand-in** ({why_not}): this run only validates the "
                  "harness, A and B are the same program")
        print(f"bench: Warden not usable ({why_not}); A = bare mitmdump stand-in", flush=True)
    spec_b = BARE
    t_start = time.monotonic()
    # Other work on the machine shows up as noise; say how busy it was.
    load_at_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    report = Report(f"Warden proxy benchmark {dt.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")
    with bench_session(args.keep_tmp) as sess:
        print(f"bench: direct-to-origin ceilings ({len(scenarios)} scenarios)", flush=True)
        ceilings = direct_ceilings(sess.lg, sess.env, scenarios, min(duration, 2.0))
        checks = {spec.name: behaviour_checks(sess.procs, sess.env, spec) for spec in (spec_a, spec_b)}
        specs = [spec_a, spec_b] + ([SQUID] if with_squid else [])
        records, startups = run_matrix(sess, specs, scenarios, rounds, duration, warmup)
        side_by_side, baseline_note = (baseline_runs(sess, spec_a, scenarios, rounds, duration, warmup)
                                       if why_not is None else ([], ""))
        elapsed = time.monotonic() - t_start
        report.notes += [
            a_note, "B = bare mitmdump 12 (`-q`, bench/bare_addon.py for *.test resolution and the "
            "CONNECT denied.test -> 403 answer, `ignore_hosts` = passthrough.test)",
            "squid " + ("5 reference (no cache, CONNECT tunnelled, no ssl-bump)" if with_squid else "skipped"),
            f"load generator: bench/loadgen/lg.c (C, one blocking thread per connection); "
            f"{rounds} round(s) x {duration:g} s per scenario and proxy, {warmup:g} s warm-up, "
            f"fresh proxy process per run", f"machine: {os.cpu_count()} CPUs, load average at start {load_at_start}; "
            f"total wall time {elapsed:.0f} s",
            "CA (both mitmproxies, one confdir): " + ca_key_type(sess.env.confdir),
        ]
        if baseline_note:
            report.notes.append(baseline_note)
        render(report, records, ceilings, scenarios, spec_a.name, spec_b.name, checks, startups, side_by_side)
    write_results(report.render())
    return 0


def baseline_runs(sess: Session, spec_a: ProxySpec, scenarios: list[Scenario], rounds: int,
                  duration: float, warmup: float) -> tuple[list[RunRecord], str]:
    """A and the issue's build (BENCH_BASELINE) alternating on intercepted new connections,
    and the report's note saying so; ([], "") without BENCH_BASELINE."""
    exe = os.environ.get("BENCH_BASELINE")
    sc = next((s for s in scenarios if s.name == INTERCEPT_NEW), None)
    if not exe or sc is None:
        return [], ""
    byte_compile_warden(exe)
    key = os.environ.get("BENCH_BASELINE_CA_KEY", "rsa")
    confdir = own_ca(warden_binary(), sess.tmp / "baseline-ca", key)
    print(f"bench: {INTERCEPT_NEW} side by side with the baseline build {exe}", flush=True)
    records, _ = run_matrix(sess, [spec_a, other_build("baseline", exe, confdir)], [sc], rounds, duration, warmup)
    return records, (f"baseline = the build issue 17 started from ({exe}), on its own {key.upper()} CA, "
                     f"side by side with A in {INTERCEPT_NEW} only")


def ca_key_type(confdir: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    cert = x509.load_pem_x509_certificate((confdir / "mitmproxy-ca-cert.pem").read_bytes())
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name} (`warden ca init`)"
    return type(key).__name__.removesuffix("PublicKey").lstrip("_")


def write_results(text: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}.md").write_text(text)
    (RESULTS / "latest.md").write_text(text)
    print("\n" + text)
    print(f"bench: written to {RESULTS / (stamp + '.md')} and {RESULTS / 'latest.md'}")


if __name__ == "__main__":
    sys.exit(main())
