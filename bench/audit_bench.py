#!/usr/bin/env python3
"""Audit writer throughput: signed checkpoints on vs off (issue 12).

    .venv/bin/python bench/audit_bench.py [--records 200000] [--rounds 3]

Runs the real `AuditWriter` (queue, writer thread, hash chain, O_APPEND writes) in this
process on a temporary directory, submitting typical `request` records as fast as the queue
accepts them, and measures records per second from the first submit until `close()` has
flushed everything and written the shutdown checkpoint. Both variants alternate A B A B in
one run (the machine is shared: compare side by side, not across runs). Checkpoints use the
default cadence (every 1,000 records or 5 s) and once every 100 records as a stress case.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addons"))

from egresswarden.record.journal import AuditWriter, generate_key_pair, load_signing_key, verify_chain  # noqa: E402

RECORD = {"event": "request", "request_id": "0123456789abcdef", "agent": "coder", "identity": "token",
          "client_ip": "10.0.0.7", "client_port": 51234, "method": "GET", "scheme": "https",
          "host": "api.github.com", "port": 443, "path": "/repos/acme/widgets/pulls?state=REDACTED",
          "decision": "allow", "reason": "allowed", "rule_id": "github-api-read",
          "message": "allowed by rule github-api-read", "policy_version": "3f2a9c1b7d10",
          "interception": "intercept", "status": 200, "bytes_up": 0, "bytes_down": 5120, "duration_ms": 12.5,
          "upstream_ip": "140.82.112.6", "credential_ids": ["github"]}


def run(records: int, every: int | None) -> float:
    with tempfile.TemporaryDirectory() as d:
        signer = load_signing_key(generate_key_pair()[0].decode()) if every else None
        w = AuditWriter(str(Path(d) / "audit.jsonl"), queue_size=records + 16, signer=signer,
                        checkpoint_records=every or 1000)
        w.start()
        started = time.perf_counter()
        for i in range(records):
            record = dict(RECORD)
            record["seq_hint"] = i
            w.submit(record)
        w.close(timeout=300)
        took = time.perf_counter() - started
        assert w.stats.written == records + 0 or w.stats.written >= records, w.stats
        assert verify_chain([Path(d) / "audit.jsonl"]).ok
        return records / took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = {"checkpoints off": None, "checkpoints every 1000 (default)": 1000, "checkpoints every 100": 100}
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, every in variants.items():
            results[name].append(run(args.records, every))
    base = statistics.median(results["checkpoints off"])
    print(f"| variant ({args.records:,} records, {args.rounds} rounds, median) | records/s | vs off |")
    print("| --- | --- | --- |")
    for name, values in results.items():
        m = statistics.median(values)
        print(f"| {name} | {m:,.0f} | {m / base:.3f} |")


if __name__ == "__main__":
    main()
