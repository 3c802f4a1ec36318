"""How long does a 100,000-rule reload block the event loop? (issue 3 target: <= 50 ms)

RuleStore compiles in a worker thread (asyncio.to_thread) and swaps one reference; the
event loop only loses the GIL for switch intervals. This measures the largest gap between
1 ms ticks of a running loop while such a reload happens, against the same loop idle.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import engine_bench as eb
from egresswarden.core.loader import load_ruleset

TARGET_MS = 50.0


async def max_gap_ms(work: asyncio.Future | None, seconds: float) -> float:
    gap, last = 0.0, time.perf_counter()
    deadline = last + seconds
    while (work is not None and not work.done()) or (work is None and time.perf_counter() < deadline):
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    return gap * 1000


async def main() -> int:
    lines, _ = eb.rule_lines(100_000, random.Random(1))
    rules_dir = Path(tempfile.mkdtemp(prefix="loop-block-"))
    eb.write_rules(rules_dir, lines)
    idle = await max_gap_ms(None, 2.0)
    started = time.perf_counter()
    work = asyncio.ensure_future(asyncio.to_thread(load_ruleset, rules_dir))
    busy = await max_gap_ms(work, 0)
    await work
    took = time.perf_counter() - started
    verdict = "**met**" if busy <= TARGET_MS else "**NOT met**"
    print(f"| reload of 100,000 rules | {took:.2f} s | max loop gap {busy:.1f} ms (idle {idle:.1f} ms) | {verdict} |")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
