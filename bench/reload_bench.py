#!/usr/bin/env python3
"""Reload under load (issue 3): requests keep flowing through `warden run`
while its rules directory is rewritten 20 times.

    .venv/bin/python bench/reload_bench.py [--rewrites 20] [--interval 1.5]

Three load streams run the whole time (bench/.build/lg): plain HTTP
keep-alive, HTTPS intercepted keep-alive (an L7 decision per request) and
HTTPS passthrough with a new CONNECT per request (a CONNECT decision per
request). Every rewrite toggles a deny rule for probe.test, and a probe
measures how long until the proxy's answer to `CONNECT probe.test` flips.
Rewrites alternate between an atomic rename (how config management and
Kubernetes ConfigMaps update files) and an in-place truncate-and-write (an
editor saving; the watcher may see a half-written file and must keep the
old rules).

Targets: 0 failed requests; every rewrite takes effect within 2 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.loadgen import LgResult
from benchlib.origin import Origin
from benchlib.procs import Proc
from benchlib.proxies import PROXY_AUTH_HEADER, WARDEN, connect_status, rules_yaml, start_proxy, warden_status
from benchlib.report import f, ok, table
from benchlib.results import write_results
from benchlib.session import Session, bench_session

REPO = Path(__file__).resolve().parent.parent

TARGET_EFFECT_S = 2.0
LOAD_HOSTS = ("plain.test", "intercept.test", "passthrough.test")


def require_warden() -> None:
    why_not = warden_status()
    if why_not is not None:
        sys.exit(f"reload_bench: Warden is not usable yet ({why_not}); this bench needs `warden run`.")


@dataclass(frozen=True)
class Rewrite:
    index: int
    atomic: bool
    probe_denied: bool
    effect_s: float | None      # None: did not take effect within the probe timeout


def write_rules(sess: Session, probe_denied: bool, atomic: bool, index: int) -> None:
    origin = sess.env.origin
    allow = f"      - host: probe.test\n        ports: [{origin.https_port}]\n"
    deny = "  - host: probe.test\n" if probe_denied else ""
    text = f"# rewrite {index}\n" + rules_yaml(origin, sess.env.hosts_file, extra_allow=allow, extra_deny=deny)
    target = sess.env.rules_dir / "bench.yaml"
    if atomic:
        tmp = sess.env.rules_dir / ".bench.yaml.tmp"
        tmp.write_text(text)
        tmp.replace(target)
    else:
        with open(target, "w") as fh:  # truncate, then write in two chunks: a visible partial file
            fh.write(text[: len(text) // 2])
            fh.flush()
            time.sleep(0.05)
            fh.write(text[len(text) // 2:])


def wait_effect(port: int, origin: Origin, probe_denied: bool, timeout: float) -> float | None:
    want = 403 if probe_denied else 200
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if connect_status(port, "probe.test", origin.https_port) == want:
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def start_streams(sess: Session, port: int, seconds: float) -> list[tuple[str, Proc]]:
    o = sess.env.origin
    common = ["-P", f"127.0.0.1:{port}", "-H", PROXY_AUTH_HEADER, "-d", f"{seconds:g}", "-p", "/128B"]
    streams = {
        "http-ka-c8": ["-m", "http", "-t", f"plain.test:{o.http_port}", "-c", "8", "-k", "1"],
        "intercept-ka-c4": ["-m", "https", "-t", f"intercept.test:{o.https_port}", "-c", "4", "-k", "1"],
        "passthrough-new-c4": ["-m", "https", "-t", f"passthrough.test:{o.https_port}", "-c", "4", "-k", "0"],
    }
    return [(name, sess.procs.start(f"lg-{name}", [str(sess.lg), *args, *common]))
            for name, args in streams.items()]


def collect(streams: list[tuple[str, Proc]], sess: Session, timeout: float) -> dict[str, LgResult]:
    out = {}
    for name, proc in streams:
        try:
            proc.popen.wait(timeout=timeout)
        finally:
            sess.procs.stop(proc)
        last = proc.log_path.read_text().strip().splitlines()[-1]
        out[name] = LgResult.from_json(last)
    return out


def audit_failures(audit_log: Path | None) -> str:
    """Why Warden refused load-stream requests, from its audit log (event, host, status, reason)."""
    if audit_log is None or not audit_log.exists():
        return "no audit log"
    counts: dict[str, int] = {}
    for line in audit_log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        status = rec.get("status")
        if rec.get("host") in LOAD_HOSTS and status not in (200, None):
            key = (f"{rec.get('event')} {rec.get('host')} {status} {rec.get('reason')} "
                   f"(rules {rec.get('policy_version')})")
            counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"


def render(rewrites: list[Rewrite], results: dict[str, LgResult], audit: str) -> str:
    failed = sum(r.errors for r in results.values())
    effects = [r.effect_s for r in rewrites if r.effect_s is not None]
    late = [r for r in rewrites if r.effect_s is None or r.effect_s > TARGET_EFFECT_S]
    rows = [[n, f"{r.ok:,}", str(r.errors), f"{r.errors_status}/{r.errors_io}/{r.errors_connect}", f(r.rps),
             f(r.p99_ms, 2), f(r.max_ms, 2)] for n, r in results.items()]
    rw_rows = [[str(r.index), "atomic rename" if r.atomic else "in-place write",
                "deny" if r.probe_denied else "allow",
                "never" if r.effect_s is None else f(r.effect_s * 1000, 0)] for r in rewrites]
    return "\n".join([
        f"# Warden reload under load {dt.datetime.now():%Y-%m-%d %H:%M:%S}", "",
        table(["target", "figure", "met"], [
            ["failed requests = 0", str(failed), ok(failed == 0)],
            [f"every rewrite effective <= {TARGET_EFFECT_S:g} s",
             f"{len(rewrites) - len(late)}/{len(rewrites)}, max {f(max(effects, default=float('nan')), 2)} s",
             ok(not late)],
        ]),
        "## Load streams", "",
        table(["stream", "ok", "failed", "failed: status/io/connect", "req/s", "p99 ms", "max ms"], rows),
        f"Refusals of load-stream requests in Warden's audit log: {audit}", "",
        "## Rewrites (time until CONNECT probe.test flips)", "",
        table(["#", "how", "probe.test", "effective after ms"], rw_rows),
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewrites", type=int, default=20)
    p.add_argument("--interval", type=float, default=1.5, help="seconds between rewrites")
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args()
    require_warden()
    with bench_session(args.keep_tmp) as sess:
        write_rules(sess, probe_denied=False, atomic=True, index=0)
        rp = start_proxy(sess.procs, WARDEN, sess.env)
        try:
            if wait_effect(rp.port, sess.env.origin, False, 5) is None:
                sys.exit("reload_bench: CONNECT probe.test is not allowed by the initial rules")
            seconds = args.rewrites * args.interval + 3
            streams = start_streams(sess, rp.port, seconds)
            time.sleep(1.5)  # streams reach steady state before the first rewrite
            rewrites = []
            for i in range(1, args.rewrites + 1):
                t0 = time.monotonic()
                denied, atomic = i % 2 == 1, i % 4 in (1, 2)  # both kinds of write, both directions
                write_rules(sess, denied, atomic, i)
                effect = wait_effect(rp.port, sess.env.origin, denied, timeout=max(args.interval, 5.0))
                rewrites.append(Rewrite(i, atomic, denied, effect))
                print(f"reload_bench: rewrite {i:2d} {'atomic ' if atomic else 'inplace'} "
                      f"effective after {'never' if effect is None else f'{effect * 1000:.0f} ms'}", flush=True)
                time.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
            results = collect(streams, sess, timeout=seconds + 20)
        finally:
            sess.procs.stop(rp.proc)
        audit = audit_failures(rp.audit_log)
    text = render(rewrites, results, audit)
    write_results("reload", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
