"""Reading audit logs for `warden replay` and `warden log`: files, rotation, compression, streams.

Audit logs are JSON Lines written by `record/journal.py`: `audit.jsonl`, rotated to
`audit.jsonl.<UTC time>` (possibly gzip-compressed by log rotation: `.gz`), one chain per
worker with `--workers` (`audit.w<i>.jsonl`), or a captured stdout stream (`--audit-log -`,
`settings.audit.stdout`) where each record may carry a prefix (`docker compose logs` puts
`warden-1  | ` before it, `kubectl logs --timestamps` a time) and other lines are mixed in.

The readers are lenient in what they skip and strict in what they use: a line that is not a
JSON object with an `event` is counted as unparsable, never fatal; record types a reader does
not know (`chain_start`, `checkpoint`, whatever a newer Warden writes) are passed on for the
caller to skip. Everything streams: one line in memory at a time.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

ROTATED = re.compile(r"^(?P<base>.+)\.(?P<stamp>\d{8}T\d{6,12}Z)(?:\.gz)?$")


@dataclass(frozen=True, slots=True)
class Line:
    file: str
    number: int
    raw: bytes  # without the prefix and the newline
    record: dict[str, Any]


def chain_order(paths: Iterable[str]) -> list[str]:
    """Order files so that each chain reads oldest first: `audit.jsonl.<time>[.gz]` files of a
    base name (by time) before the live `audit.jsonl`. `-` (stdin) stays where it was given."""
    def key(item: tuple[int, str]) -> tuple[str, int, str, int]:
        index, path = item
        if path == "-":
            return ("", 0, "", index)
        name = Path(path)
        m = ROTATED.match(name.name)
        if m:
            return (str(name.with_name(m["base"])), 0, m["stamp"], index)
        return (str(name), 1, "", index)
    return [p for _, p in sorted(enumerate(paths), key=key)]


def open_binary(path: str) -> IO[bytes]:
    """stdin for '-', a gzip reader for *.gz, else the file."""
    if path == "-":
        return sys.stdin.buffer
    if path.endswith(".gz"):
        # GzipFile reads bytes like any binary file; typeshed does not declare it an IO[bytes].
        return cast(IO[bytes], gzip.GzipFile(path, "rb"))
    return open(path, "rb")


def parse_line(raw: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """(the JSON part, the record) for a line holding an audit record, else None."""
    line = raw.strip()
    if not line:
        return None
    if line[:1] != b"{":
        start = line.find(b"{")  # a log shipper's prefix
        if start < 0:
            return None
        line = line[start:]
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        return None
    return line, record


class Reader:
    """Iterates the records of several files in order, counting what it had to skip."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = chain_order(paths)
        self.unparsable = 0
        self.lines = 0
        self.errors: list[str] = []

    def raw_lines_of(self, path: str, stream: IO[bytes] | None = None) -> Iterator[tuple[str, int, bytes]]:
        """(file, line number, the line from its first '{', without the newline) for non-blank
        lines that may hold a record; lines without a '{' are counted as unparsable here."""
        try:
            f = stream or open_binary(path)
        except OSError as e:
            self.errors.append(f"{path}: cannot read: {e.strerror or e}")
            return
        name = "<stdin>" if path == "-" else path
        try:
            for number, raw in enumerate(f, 1):
                self.lines += 1
                if raw[:1] == b"{":
                    yield name, number, raw.rstrip(b"\r\n")
                    continue
                line = raw.strip()
                start = line.find(b"{")
                if start >= 0:
                    yield name, number, line[start:]
                elif line:
                    self.unparsable += 1
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            self.errors.append(f"{name}: read failed after {self.lines} lines: {e}")
        finally:
            if f is not sys.stdin.buffer:
                f.close()

    def raw_lines(self) -> Iterator[tuple[str, int, bytes]]:
        for path in self.paths:
            yield from self.raw_lines_of(path)

    def records_of(self, path: str, stream: IO[bytes] | None = None) -> Iterator[Line]:
        """Parsed records of one file (unparsable lines counted and skipped)."""
        for name, number, raw in self.raw_lines_of(path, stream):
            parsed = parse_line(raw)
            if parsed is None:
                self.unparsable += 1
                continue
            yield Line(name, number, parsed[0], parsed[1])

    def __iter__(self) -> Iterator[Line]:
        for path in self.paths:
            yield from self.records_of(path)


@contextlib.contextmanager
def quiet_broken_pipe() -> Iterator[None]:
    """`warden log | head` closes the pipe early: stop writing quietly, as cat and grep do
    (Python's recipe: point stdout at devnull so the interpreter's final flush cannot fail)."""
    try:
        yield
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
