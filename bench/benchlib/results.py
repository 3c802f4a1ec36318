"""Where every benchmark writes its markdown: bench/results/<kind>-<time>.md and <kind>-latest.md."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"


def write_results(kind: str, text: str) -> Path:
    """Write `text` as a timestamped result and as the latest one; print it; return the path."""
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{kind}-{stamp}.md"
    path.write_text(text)
    (RESULTS / f"{kind}-latest.md").write_text(text)
    print(text)
    return path
