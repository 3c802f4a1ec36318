"""Aggregation (medians over rounds) and the markdown report."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .loadgen import LgResult
from .scenarios import Scenario


@dataclass(frozen=True)
class RunRecord:
    scenario: Scenario
    proxy: str
    round: int
    result: LgResult
    cpu_s_per_1k: float     # proxy process tree CPU per 1,000 completed requests
    peak_rss_mib: float     # VmHWM summed over the proxy process tree
    startup_s: float


@dataclass(frozen=True)
class Summary:
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_s_per_1k: float
    peak_rss_mib: float
    errors: int
    runs: int


@dataclass
class Report:
    title: str
    notes: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)

    def render(self) -> str:
        out = [f"# {self.title}", ""]
        out += [f"- {n}" for n in self.notes]
        out.append("")
        out += self.sections
        return "\n".join(out) + "\n"


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(records: list[RunRecord]) -> dict[tuple[str, str], Summary]:
    groups: dict[tuple[str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.scenario.name, r.proxy), []).append(r)
    return {
        key: Summary(
            rps=med([r.result.rps for r in rs]),
            p50_ms=med([r.result.p50_ms for r in rs]),
            p99_ms=med([r.result.p99_ms for r in rs]),
            cpu_s_per_1k=med([r.cpu_s_per_1k for r in rs]),
            peak_rss_mib=med([r.peak_rss_mib for r in rs]),
            errors=sum(r.result.errors for r in rs),
            runs=len(rs),
        )
        for key, rs in groups.items()
    }


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def f(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"  # x != x: NaN


def ok(met: bool | None) -> str:
    return "n/a" if met is None else ("**met**" if met else "**NOT met**")
