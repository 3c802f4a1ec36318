#!/usr/bin/env python3
"""`warden replay` throughput and memory on a generated 1,000,000-record audit log, and
`warden test` time for 1,000 cases (issue 16).

    .venv/bin/python bench/policytools_bench.py [--records 1000000] [--cases 1000]

The log is written the way record/journal.py writes it (same fields, compact JSON, hash
chain), rotated into files of 250,000 records with the oldest gzip-compressed, for the
example rules in rules/: a traffic mix of CONNECTs (passed through and intercepted),
requests inside intercepted tunnels, plain-HTTP requests, tunnel_close and the occasional
startup/chain_start record. Paths repeat as real traffic does (a few thousand distinct
ones) and 5% carry a unique id, so the decision memo is exercised on hits and misses.
The proposed rules are the example rules with github-api-read narrowed to /repos/acme/*/pulls/**.

`warden replay` runs as a subprocess (one core), so its peak RSS (ru_maxrss) is its own.
Targets: >= 100,000 records/s; memory independent of the number of records.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib.report import table
from benchlib.results import write_results

REPO = Path(__file__).resolve().parent.parent
WARDEN = str(Path(sys.executable).parent / "warden")
TARGET_RPS = 100_000

HOSTS = [  # (host, interception, rule, weight)
    ("github.com", "passthrough", "github-web", 30),
    ("objects.githubusercontent.com", "passthrough", "github-objects", 15),
    ("api.github.com", "intercept", "github-api-read", 30),
    ("pypi.org", "intercept", "pypi-index", 15),
    ("files.pythonhosted.org", "passthrough", "pythonhosted", 10),
]
API_PATHS = [f"/repos/acme/{repo}/{kind}/{n}" for repo in ("widgets", "gears", "infra", "docs")
             for kind in ("pulls", "issues", "commits", "branches") for n in range(120)] + ["/user"]
PYPI_PATHS = [f"/simple/{p}/" for p in ("requests", "httpx", "numpy", "pandas", "mitmproxy", "pyyaml")] * 4


_OLD: dict[tuple[str, ...], tuple[str, str, str | None, str | None]] = {}


def _old_decision(agent: str, host: str, method: str | None, path: str | None) -> tuple[str, str, str | None, str | None]:
    """(decision, reason, rule_id, interception) under the example rules, from core.plan itself."""
    key = (agent, host, method or "", path or "")
    found = _OLD.get(key)
    if found is None:
        from egresswarden.core.loader import load_ruleset
        from egresswarden.core.plan import plan

        global _RULES
        if _RULES is None:
            _RULES = load_ruleset(REPO / "rules", secrets=False)
        ip = ipaddress.ip_address("140.82.112.3")
        p = plan(_RULES, agent, "https", host, 443, method, path, [ip])
        found = _OLD[key] = (p.decision.verdict.value, p.decision.reason.value, p.decision.rule_id,
                             p.interception.value if p.interception else None)
    return found


_RULES: Any = None


def _record(rng: random.Random, seq_time: float) -> dict[str, object]:
    host, layer, _rule, _ = rng.choices(HOSTS, weights=[h[3] for h in HOSTS])[0]
    agent = "coder" if rng.random() < 0.9 else "claw"
    t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seq_time)) + f".{int(seq_time * 1e6) % 1_000_000:06d}Z"
    base: dict[str, object] = {"time": t, "request_id": f"{rng.getrandbits(64):016x}", "agent": agent,
                               "identity": "token", "client_ip": "10.1.2.3", "client_port": rng.randrange(30000, 60000)}
    roll = rng.random()
    if layer == "intercept" and roll < 0.75:
        path = rng.choice(API_PATHS if host == "api.github.com" else PYPI_PATHS)
        if rng.random() < 0.05:
            path = f"/repos/acme/widgets/pulls/{rng.getrandbits(40)}"
        method = "GET" if rng.random() < 0.97 else "POST"
        decision, reason, rule_id, mode = _old_decision(agent, host, method, path)
        if mode != "intercept":
            decision, reason, rule_id, mode = _old_decision(agent, host, None, None)
            event = {"event": "connect", "method": "CONNECT", "scheme": "https", "path": None,
                     "interception": mode, "status": 200 if decision != "deny" else 403}
        else:
            event = {"event": "request", "method": method, "scheme": "https", "path": path + "?page=REDACTED",
                     "interception": "intercept", "status": 200 if decision != "deny" else 403}
    elif roll < 0.93:
        decision, reason, rule_id, mode = _old_decision(agent, host, None, None)
        event = {"event": "connect", "method": "CONNECT", "scheme": "https", "path": None,
                 "interception": mode, "status": 200 if decision != "deny" else 403}
    else:
        decision, reason, rule_id, _ = _old_decision(agent, host, None, None)
        event = {"event": "tunnel_close", "method": "CONNECT", "scheme": "https", "path": None,
                 "interception": "passthrough", "status": None}
    rec = {**base, **event, "host": host, "port": 443, "decision": decision, "reason": reason, "rule_id": rule_id,
           "message": f"decided by rule {rule_id}", "policy_version": "ea01de690c64", "bytes_up": 120,
           "bytes_down": 4096, "duration_ms": 12.5, "upstream_ip": "140.82.112.3", "credential_ids": []}
    # field order as outcome_record writes it: time, event, request_id, ...
    order = ["time", "event", "request_id", "agent", "identity", "client_ip", "client_port", "method", "scheme",
             "host", "port", "path", "decision", "reason", "rule_id", "message", "policy_version", "interception",
             "status", "bytes_up", "bytes_down", "duration_ms", "upstream_ip", "credential_ids"]
    return {k: rec[k] for k in order}


def generate(directory: Path, records: int, per_file: int = 250_000) -> list[Path]:
    rng = random.Random(16)
    prev = "0" * 64
    seq_time = 1_790_000_000.0
    files: list[Path] = []
    written = 0
    index = 0
    while written < records:
        n = min(per_file, records - written)
        last = written + n >= records
        name = "audit.jsonl" if last else f"audit.jsonl.2026120{index}T000000000000Z"
        path = directory / name
        seq = 0
        with path.open("wb") as f:
            def emit(rec: dict[str, object]) -> None:
                nonlocal prev, seq
                seq += 1
                rec["seq"], rec["prev_hash"] = seq, prev
                line = json.dumps(rec, separators=(",", ":"), ensure_ascii=False).encode()
                prev = hashlib.sha256(line).hexdigest()
                f.write(line + b"\n")
            emit({"event": "chain_start", "time": "2026-12-01T00:00:00.000000Z", "file": name})
            if index == 0:
                emit({"event": "startup", "time": "2026-12-01T00:00:00.000001Z", "pid": 1, "rules_loaded": 7})
            for _ in range(n - (2 if index == 0 else 1)):
                seq_time += 0.002
                emit(_record(rng, seq_time))
        written += n
        if index == 0 and not last:
            with path.open("rb") as src, gzip.open(f"{path}.gz", "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst)
            path.unlink()
            path = Path(f"{path}.gz")
        files.append(path)
        index += 1
    return files


def run_measured(args: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of a subprocess, reaped with wait4 for its own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen not to wait again
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if proc.returncode not in (0, 1, 3):
            raise RuntimeError(f"{args[:3]} failed: {err.read().decode()}")
        return wall, usage.ru_maxrss / 1024, out.read().decode()


def stricter_rules(directory: Path) -> Path:
    new = directory / "rules-new"
    shutil.copytree(REPO / "rules", new, ignore=shutil.ignore_patterns("schema.json"))
    policies = new / "policies.yaml"
    policies.write_text(policies.read_text().replace('paths: ["/repos/acme/**", "/user"]',
                                                     'paths: ["/repos/acme/*/pulls/**", "/user"]'))
    return new


def cases_file(path: Path, n: int) -> None:
    rng = random.Random(1)
    lines = ["defaults: {agent: coder}", "cases:"]
    for i in range(n):
        p = rng.choice(API_PATHS)
        lines += [f"  - name: case {i}", f"    request: GET https://api.github.com{p}", "    expect: allow",
                  "    rule: github-api-read"]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--cases", type=int, default=1000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="warden-policytools-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        files = generate(work, args.records)
        gen_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in files) / 2**20
        new_rules = stricter_rules(work)
        replay_args = [WARDEN, "replay", "--rules", str(new_rules), "--json", *map(str, files)]
        wall, rss, out = run_measured(replay_args)
        report = json.loads(out)
        # Peak memory by log size: the first file (250,000 records), the first two, all four.
        by_size = []
        for k in (1, 2):
            part = files[:k]
            _, r, part_out = run_measured([WARDEN, "replay", "--rules", str(new_rules), "--json", *map(str, part)])
            by_size.append(f"{json.loads(part_out)['records']:,} records: {r:.1f} MiB")
        cases = work / "cases.yaml"
        cases_file(cases, args.cases)
        test_wall, test_rss, test_out = run_measured([WARDEN, "test", str(REPO / "rules"), str(cases)])
        empty = work / "one.yaml"
        cases_file(empty, 1)
        base_wall, _, _ = run_measured([WARDEN, "test", str(REPO / "rules"), str(empty)])
    rps = report["records_per_cpu_second"]
    rows = [
        ["replay records", f"{report['records']:,}", f"{len(files)} files ({size:.0f} MiB, oldest gzip)"],
        ["replay loop, CPU time", f"{report['cpu_seconds']:.2f} s",
         f"{rps:,} records per CPU second (one core); target >= {TARGET_RPS:,}"],
        ["replay loop, wall time", f"{report['seconds']:.2f} s",
         f"{report['records_per_second']:,} records/s on this shared machine (load {os.getloadavg()[0]:.1f})"],
        ["replay wall (incl. start, rules load)", f"{wall:.2f} s", ""],
        ["replay peak RSS", f"{rss:.1f} MiB", "; ".join(by_size)],
        ["newly denied found", f"{report['changes']['newly_denied']['records']:,}",
         f"{len(report['changes']['newly_denied']['groups'])} groups"],
        [f"warden test, {args.cases} cases", f"{test_wall:.2f} s wall", f"1 case: {base_wall:.2f} s (startup); "
                                                                        f"RSS {test_rss:.1f} MiB"],
    ]
    verdict = "PASS" if rps >= TARGET_RPS else "FAIL"
    text = (f"# warden replay / warden test ({verdict})\n\nGenerated log in {gen_s:.1f} s. One core, "
            f"{os.cpu_count()} CPUs shared with other work.\n\n" + table(["measure", "value", "notes"], rows) + "\n\n"
            f"warden test output: `{test_out.strip().splitlines()[-1]}`\n")
    write_results("policytools", text)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
