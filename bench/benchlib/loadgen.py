"""Driving bench/.build/lg (see bench/loadgen/lg.c) and parsing its JSON."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LgResult:
    ok: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    elapsed_s: float
    cpu_s: float          # the generator's own CPU time
    errors_connect: int = 0
    errors_status: int = 0  # answered, but not with the expected status
    errors_io: int = 0

    @classmethod
    def from_json(cls, raw: str) -> LgResult:
        d = json.loads(raw)
        return cls(d["ok"], d["errors"], d["rps"], d["p50_ms"], d["p99_ms"], d["max_ms"], d["elapsed_s"], d["cpu_s"],
                   d["errors_connect"], d["errors_status"], d["errors_io"])


def run_lg(lg: Path, args: list[str], duration: float) -> LgResult:
    # Blocked I/O inside lg times out after 10 s, so duration + 15 s bounds it.
    out = subprocess.run([str(lg), *args, "-d", f"{duration:g}"], capture_output=True, text=True,
                         timeout=duration + 15, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"lg failed ({out.returncode}): {out.stderr.strip()}")
    return LgResult.from_json(out.stdout)
