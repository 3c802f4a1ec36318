"""Benchmark: Warden's peak memory for a 1 GiB download and 64 MiB uploads through an intercepted
credential host (redaction and leak scanning on), issue 11 finding 7.

Not a timed test: run by hand, `.venv/bin/python bench/bench_memory.py [GiB]`.
Target: peak RSS (VmHWM) grows by less than 64 MiB for the 1 GiB download.
The scenario (origin, rules, agent) is tests/memory_scenario.py, shared with the e2e test.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import trustme

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.memory_scenario import MIB, measure  # noqa: E402

TARGET_MIB = 64


def main() -> int:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    size = int(gib * 1024 * MIB)
    ca = trustme.CA()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        ca_file = work / "origin-ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        started = time.monotonic()
        r = measure(work, ca, ca_file, download=size, upload=64 * MIB)
        seconds = time.monotonic() - started
    print(f"download {size / MIB:.0f} MiB through an intercepted credential host (redaction on), "
          f"{r.redactions} secrets redacted, secret seen by agent: {r.secret_seen_by_agent}")
    print(f"peak RSS: baseline {r.baseline_hwm_kib / 1024:.1f} MiB, after download "
          f"{r.after_download_hwm_kib / 1024:.1f} MiB (growth {r.download_growth_mib:.1f} MiB, target < {TARGET_MIB})")
    print(f"uploads 2 x 64 MiB chunked (leak-scanned): growth {r.upload_growth_mib:.1f} MiB, origin received "
          f"{r.upload_received / MIB:.0f} MiB, leaking upload -> {r.leak_status}, secret reached origin: "
          f"{r.leak_reached_origin}")
    print(f"RSS after: {r.rss_after_kib / 1024:.1f} MiB; wall time {seconds:.0f} s")
    ok = r.download_growth_mib < TARGET_MIB and not r.secret_seen_by_agent and not r.leak_reached_origin
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
