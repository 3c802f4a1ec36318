"""The audit log writer: hash-chained JSON Lines through a bounded queue and one writer thread.

Tamper evidence: every record carries `prev_hash`, the SHA-256 (hex) of the previous line's
bytes. Each file starts with a `chain_start` record whose `prev_hash` is the hash of the last
line of the file before it (rotation and restarts keep one chain; the very first file starts
from 64 zeros). `verify_chain` recomputes it and names the first line that does not fit, so
an edited, inserted or deleted line is found.

Nothing lost, nothing blocked: `submit` never blocks the event loop (a put on a bounded
queue); the writer thread appends and flushes. If the file cannot be written (disk full,
permissions), records stay queued and are retried, `healthy` turns False (the Audit addon
then refuses new connections with 503 unless `settings.audit.on_failure: continue`), and
the failure is counted and printed on stderr. Files rotate by size and are never truncated:
`audit.jsonl` is renamed to `audit.jsonl.<UTC time>` and a new file continues the chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

GENESIS = "0" * 64
RETRY_SECONDS = 0.5
BATCH_SECONDS = 0.005  # records reach the file at most this much later


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _last_line(path: Path) -> bytes | None:
    """The last non-empty line of a file, read from the end (files can be large)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            chunk = b""
            pos = end
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step) + chunk
                stripped = chunk.rstrip(b"\n")
                if b"\n" in stripped:
                    return stripped.rsplit(b"\n", 1)[1]
            return chunk.rstrip(b"\n") or None
    except OSError:
        return None


FailureListener = Callable[[str], None]


@dataclass
class WriterStats:
    written: int = 0
    write_failures: int = 0
    dropped: int = 0


class AuditWriter:
    """Append-only, hash-chained JSONL writer. Thread-safe `submit`; one writer thread."""

    def __init__(self, path: str | None, *, max_file_bytes: int = 100 * 1024 * 1024, queue_size: int = 65536,
                 also_stdout: bool = False, stdout: TextIO | None = None) -> None:
        self.path = Path(path) if path and path != "-" else None
        self.to_stdout = path == "-" or also_stdout
        self.max_file_bytes = max_file_bytes
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=queue_size)
        self.stats = WriterStats()
        self.healthy = True
        self.last_error: str | None = None
        self.failure_listeners: list[FailureListener] = []
        self._stdout = stdout or sys.stdout
        self._file: Any = None
        self._size = 0
        self._last_hash = GENESIS
        self._thread: threading.Thread | None = None
        self._pending: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._seq = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            last = _last_line(self.path) if self.path.exists() else None
            self._last_hash = line_hash(last) if last else self._last_rotated_hash()
        self._thread = threading.Thread(target=self._run, name="warden-audit", daemon=True)
        self._thread.start()

    def _last_rotated_hash(self) -> str:
        assert self.path is not None
        rotated = sorted(self.path.parent.glob(self.path.name + ".*"))
        last = _last_line(rotated[-1]) if rotated else None
        return line_hash(last) if last else GENESIS

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything queued, then stop the writer thread."""
        if self._thread is None:
            return
        self._stopping.set()
        self.queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    # -- producer side ---------------------------------------------------------------------
    def submit(self, record: dict[str, Any]) -> bool:
        """Queue a record; never blocks. False if the queue is full (the record is lost and
        the writer marked unhealthy, which makes Warden refuse new connections)."""
        try:
            self.queue.put_nowait(record)
            return True
        except queue.Full:
            self.stats.dropped += 1
            self._fail("audit queue full: the writer cannot keep up")
            return False

    @property
    def depth(self) -> int:
        return self.queue.qsize() + len(self._pending)

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if self._pending and not self._flush_pending():
                if self._stopping.is_set():
                    return
                time.sleep(RETRY_SECONDS)
                continue
            try:
                item = self.queue.get(timeout=RETRY_SECONDS)
            except queue.Empty:
                continue
            # Let a batch gather: one wake-up, write and flush per BATCH_SECONDS instead of per
            # record (a wake-up per record cost ~14% of Warden's CPU on new-connection load).
            time.sleep(BATCH_SECONDS)
            batch = [item]
            while len(batch) < 4096:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            self._pending.extend(r for r in batch if r is not None)
            if not self._flush_pending() and not stop:
                time.sleep(RETRY_SECONDS)
            if stop and not self._pending:
                return
            if stop:
                # one last try, then give up: close() has a deadline
                self._flush_pending()
                return

    def _open(self) -> None:
        assert self.path is not None
        self._file = self.path.open("ab", buffering=1024 * 1024)
        self._size = self._file.tell()
        if self._size == 0:
            self._write_line(self._chain_start())

    def _chain_start(self) -> dict[str, Any]:
        return {"event": "chain_start", "time": utc_now(), "file": self.path.name if self.path else "-"}

    def _write_line(self, record: dict[str, Any]) -> None:
        self._seq += 1
        record["seq"] = self._seq
        record["prev_hash"] = self._last_hash
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")
        if self._file is not None:
            self._file.write(line + b"\n")
            self._size += len(line) + 1
        if self.to_stdout:
            self._stdout.write(line.decode("utf-8") + "\n")
        self._last_hash = hashlib.sha256(line).hexdigest()

    def _rotate(self) -> None:
        assert self.path is not None and self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        os.rename(self.path, target)  # never truncate: the old file keeps every record
        self._open()

    def _flush_pending(self) -> bool:
        """Write all pending records. On failure keep them (and the chain state) for a retry."""
        if not self._pending:
            return True
        saved_hash, saved_seq = self._last_hash, self._seq
        try:
            if self.path is not None and self._file is None:
                self._open()
            for record in self._pending:
                if self.path is not None and self._size >= self.max_file_bytes:
                    self._rotate()
                self._write_line(record)
            if self._file is not None:
                self._file.flush()
            if self.to_stdout:
                self._stdout.flush()
        except (OSError, ValueError) as e:
            self._last_hash, self._seq = saved_hash, saved_seq
            self._drop_file()
            self.stats.write_failures += 1
            self._fail(f"cannot write audit log {self.path}: {getattr(e, 'strerror', None) or e.__class__.__name__}")
            return False
        self.stats.written += len(self._pending)
        self._pending.clear()
        if not self.healthy and self.queue.qsize() < self.queue.maxsize // 2:
            self.healthy = True
            self.last_error = None
            print("warden: audit log writable again", file=sys.stderr, flush=True)
        return True

    def _drop_file(self) -> None:
        # After a failed write the buffered tail of the file is unknown: reopen on retry and
        # start a new chain segment that names the last hash we know was written.
        if self._file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._file.close()
        self._file = None
        if self.path is not None:
            last = _last_line(self.path) if self.path.exists() else None
            self._last_hash = line_hash(last) if last else self._last_hash

    def _fail(self, message: str) -> None:
        if self.healthy or message != self.last_error:
            print(f"warden: AUDIT FAILURE: {message}", file=sys.stderr, flush=True)
        self.healthy = False
        self.last_error = message
        for listener in self.failure_listeners:
            with contextlib.suppress(Exception):
                listener(message)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    records: int
    message: str
    file: str | None = None
    line: int | None = None


def verify_chain(paths: Iterable[str | Path]) -> VerifyResult:
    """Check the hash chain across files given in chain order (oldest first)."""
    previous: str | None = None
    count = 0
    for p in paths:
        path = Path(p)
        try:
            f = path.open("rb")
        except OSError as e:
            return VerifyResult(False, count, f"cannot read: {e.strerror}", str(path), 0)
        with f:
            for lineno, raw in enumerate(f, 1):
                line = raw.rstrip(b"\n")
                if not line:
                    return VerifyResult(False, count, "empty line", str(path), lineno)
                try:
                    record = json.loads(line)
                    claimed = record["prev_hash"]
                except (ValueError, KeyError, TypeError):
                    return VerifyResult(False, count, "not a Warden audit record", str(path), lineno)
                if previous is not None and claimed != previous:
                    what = "chain broken: prev_hash does not match the previous line (edited, inserted or deleted line)"
                    return VerifyResult(False, count, what, str(path), lineno)
                if previous is None and lineno == 1 and record.get("event") != "chain_start":
                    return VerifyResult(False, count, "file does not start with a chain_start record", str(path), 1)
                previous = hashlib.sha256(line).hexdigest()
                count += 1
    return VerifyResult(True, count, f"ok: {count} records, chain intact")
