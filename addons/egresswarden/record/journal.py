"""The audit log writer and verifier: hash-chained JSON Lines with signed checkpoints.

Format. One JSON object per line. Every record carries `seq` and `prev_hash`, the SHA-256
(hex) of the previous line's bytes. A *segment* starts with a `chain_start` record: at the
top of every file, at every start of Warden, and after a failed write. Its `prev_hash` is
the hash of the last line known to be written (the previous segment, the previous file
after rotation, or 64 zeros for a chain's very first line), so files, restarts and write
failures keep one chain. `seq` is the line number in the file (`-`: in this process's stdout
stream), so a verifier knows exactly which line is missing.

Checkpoints. With `settings.audit.signing_key` (an Ed25519 private key from the secrets
directory) the writer adds a `checkpoint` record every `checkpoint_records` records or
`checkpoint_seconds` seconds (whichever first, only if something was written since), before
rotating a file (`reason: rotate`) and at shutdown (`reason: shutdown`). It signs
`warden-audit-checkpoint-v1 \\0 prev_hash \\0 seq \\0 reason \\0 time`: since `prev_hash`
commits to every line before it, one signature covers the whole chain up to there. Whoever
can write the file but lacks the key can neither rewrite what a checkpoint covers nor forge
a new checkpoint, and a log that does not end with a shutdown (or rotate) checkpoint was
truncated, or Warden was killed before it could write one. `verify` says which.

Writing (thread model). `submit` may be called from any thread (the event loop, mostly);
it only does a non-blocking put on a bounded queue and never calls back into anything. One
writer thread drains the queue in batches and owns the file, the chain state and the
signer. Each batch is written with one `os.write` on an O_APPEND descriptor. If a write
fails (disk full, I/O error) the file is truncated back to where the batch began (so no torn
line and no record twice), the batch stays pending, health turns false, and once a retry
succeeds the batch follows a new `chain_start` (`reason: write_failure`) linked to the last
good hash. Health changes are reported through `notify(message)`, called on a transition
only and from whichever thread noticed it: the Audit addon forwards it to the event loop
with `call_soon_threadsafe`, so an alert about the audit log is raised there and never
re-enters `submit` from inside `submit`. Files are created 0600 and missing directories
0700. Files rotate by size and are never truncated beyond the failed batch.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from egresswarden.record import fields as F

logger = logging.getLogger("warden")
GENESIS = "0" * 64
RETRY_SECONDS = 0.5
BATCH_SECONDS = 0.005  # records reach the file at most this much later
CHECKPOINT_RECORDS = 1000
CHECKPOINT_SECONDS = 5.0
SIGNATURE_CONTEXT = b"warden-audit-checkpoint-v1"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


# Characters that some line readers (Python's str.splitlines, JavaScript, many log shippers)
# treat as line ends: escaped so one record is always one line for every reader.
# (json.dumps already escapes every control character below U+0020.)
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\u0085": "\\u0085"})


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)  # built once, not per record


def record_json(record: dict[str, Any]) -> str:
    """A record as the journal writes it (compact JSON, non-ASCII kept), before line-break escaping."""
    return _ENCODER.encode(record)


def _line_bytes(text: str) -> bytes:
    # str.translate costs ~12 us per record even when there is nothing to translate
    if "\u2028" in text or "\u2029" in text or "\u0085" in text:
        text = text.translate(_LINE_BREAKS)
    return text.encode("utf-8")


def _dumps(record: dict[str, Any]) -> bytes:
    return _line_bytes(record_json(record))


# -- keys ------------------------------------------------------------------------------------
class KeyError_(ValueError):
    """A signing or public key that cannot be used (never includes key material)."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def checkpoint_message(prev_hash: str, seq: int, reason: str, when: str) -> bytes:
    return b"\0".join([SIGNATURE_CONTEXT, prev_hash.encode(), str(seq).encode(), reason.encode(), when.encode()])


class Signer:
    """An Ed25519 private key; its repr never shows the key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.key_id = key_id(private.public_key())

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._private.sign(message)).decode()

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id})"


def load_signing_key(text: str) -> Signer:
    """A PEM (PKCS#8) Ed25519 private key, or the base64 of its 32-byte seed."""
    data = text.strip().encode()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(data, validate=True))
    except (ValueError, TypeError):
        raise KeyError_("not an Ed25519 private key (PEM PKCS#8 or base64 of 32 bytes)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_("the signing key is not an Ed25519 key")
    return Signer(key)


def load_public_key(data: bytes) -> Ed25519PublicKey:
    try:
        if data.strip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data.strip())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(data.strip(), validate=True))
    except (ValueError, TypeError):
        raise KeyError_("not an Ed25519 public key (PEM or base64 of 32 bytes)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyError_("the public key is not an Ed25519 key")
    return key


def generate_key_pair() -> tuple[bytes, bytes, str]:
    """(private PEM, public PEM, key id) for `warden audit keygen`."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem, key_id(private.public_key())


# -- stdout ----------------------------------------------------------------------------------
_claimed_stdout: BinaryIO | None = None


def claim_stdout() -> BinaryIO:
    """Make stdout the audit stream and nothing else.

    The original stdout descriptor is duplicated for the audit writer; descriptor 1 and
    `sys.stdout` then point at stderr, so a stray print, a library's log line or mitmproxy's
    terminal log can never land between two audit records.
    """
    global _claimed_stdout
    if _claimed_stdout is None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
        _claimed_stdout = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    return _claimed_stdout


def stdout_sink() -> BinaryIO:
    """Where audit records for stdout go: the claimed descriptor, else the process's stdout."""
    return _claimed_stdout if _claimed_stdout is not None else sys.stdout.buffer


# -- files -----------------------------------------------------------------------------------
def _tail(path: Path) -> tuple[bytes | None, int]:
    """(last complete line, offset just after it). Bytes after the last newline are a torn
    line from a crash mid-write; the offset lets the caller cut them off."""
    try:
        with path.open("rb") as f:
            end = f.seek(0, os.SEEK_END)
            pos, chunk = end, b""
            while pos > 0:
                step = min(65536, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step) + chunk
                last_nl = chunk.rfind(b"\n")
                if last_nl < 0:
                    continue
                good_end = pos + last_nl + 1
                body = chunk[:last_nl]
                prev_nl = body.rfind(b"\n")
                if prev_nl >= 0 or pos == 0:
                    return body[prev_nl + 1:], good_end
            return None, 0
    except OSError:
        return None, 0


def _secure_dir(directory: Path) -> None:
    if not directory.exists():
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        logger.warning(f"warden: audit directory {directory} is accessible to other users (mode {mode:o}); "
              f"audit records can hold MCP argument values: chmod 700 it")


Notify = Callable[[str], None]


@dataclass
class WriterStats:
    written: int = 0  # records (not counting chain_start/checkpoint lines)
    write_failures: int = 0
    checkpoints: int = 0
    segments: int = 0


@dataclass
class _Line:
    data: bytes
    is_record: bool


class AuditWriter:
    """Append-only, hash-chained JSONL writer. Thread-safe `submit`; one writer thread."""

    def __init__(self, path: str | None, *, max_file_bytes: int = 100 * 1024 * 1024, queue_size: int = 65536,
                 also_stdout: bool = False, stdout: BinaryIO | None = None, signer: Signer | None = None,
                 checkpoint_records: int = CHECKPOINT_RECORDS, checkpoint_seconds: float = CHECKPOINT_SECONDS,
                 notify: Notify | None = None, failure_level: int = logging.ERROR) -> None:
        self.path = Path(path) if path and path != "-" else None
        self.to_stdout = path == "-" or also_stdout
        self.stdout_only = self.path is None
        self.max_file_bytes = max_file_bytes
        # A deque, not a queue.Queue: append and popleft are atomic, so a record costs no lock on
        # either side (queue.Queue's two locks per record were ~2% of a new tunnel's CPU). The
        # bound is checked before the append, so producers on several threads may overshoot it
        # by one record each.
        self._queue: collections.deque[dict[str, Any] | str] = collections.deque()
        self.queue_size = queue_size
        self._wake = threading.Event()  # set by submit when the writer may be waiting
        self.stats = WriterStats()
        self.healthy = True
        self.last_error: str | None = None
        self.notify = notify
        # settings.audit.on_failure: continue makes a failed write a warning: traffic goes on by choice
        self.failure_level = failure_level
        self.signer = signer  # swapped by the Audit addon on reload; read by the writer thread
        self.checkpoint_records = checkpoint_records
        self.checkpoint_seconds = checkpoint_seconds
        self._stdout = stdout if stdout is not None else sys.stdout.buffer
        self._fd: int | None = None
        self._torn_at: int | None = None
        self._size = 0
        self._last_hash = GENESIS
        self._seq = 0  # seq of the last line in the current file (or stdout stream)
        self._segment_reason: str | None = "start"  # write a chain_start before the next line
        self._segment_error: str | None = None
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._thread: threading.Thread | None = None
        self._pending: list[dict[str, Any] | str] = []
        self._stopping = threading.Event()
        self._health_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        if self.path is not None:
            _secure_dir(self.path.parent.resolve())
            self._resume()
        self._thread = threading.Thread(target=self._run, name="warden-audit", daemon=True)
        self._thread.start()

    def _resume(self) -> None:
        """Continue the chain from the existing file (or the newest rotated one)."""
        assert self.path is not None
        if self.path.exists():
            last, good_end = _tail(self.path)
            if self.path.stat().st_size > good_end:
                # a torn line from a crash mid-write: it was never a whole record
                logger.warning(f"warden: audit log {self.path}: removing {self.path.stat().st_size - good_end} bytes of "
                      f"an incomplete last line")
                os.truncate(self.path, good_end)
            if last:
                self._last_hash = line_hash(last)
                with contextlib.suppress(ValueError, TypeError, KeyError):
                    self._seq = int(json.loads(last)["seq"])
            return
        rotated = sorted(self.path.parent.glob(self.path.name + ".*"))
        if rotated:
            last, _ = _tail(rotated[-1])
            if last:
                self._last_hash = line_hash(last)

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything queued, write the shutdown checkpoint, stop the writer thread."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error(f"warden: AUDIT FAILURE: {self.depth} records not written at shutdown ({self.last_error})")
            return  # the writer still owns the file
        self._thread = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
                os.close(self._fd)
            self._fd = None

    # -- producer side ---------------------------------------------------------------------
    def submit(self, record: dict[str, Any] | str) -> bool:
        """Queue a record (a dict, or the `record_json` text of one that has no `seq` or
        `prev_hash` yet: serialised once, by the caller that already needed the text); never
        blocks, never calls back. False if the queue is full (the record is lost and the
        writer marked unhealthy, which makes Warden refuse new work)."""
        if len(self._queue) >= self.queue_size:
            self._set_unhealthy("audit queue full: the writer cannot keep up")
            return False
        self._queue.append(record)
        if not self._wake.is_set():
            self._wake.set()
        return True

    @property
    def depth(self) -> int:
        return len(self._queue) + len(self._pending)

    # -- health ----------------------------------------------------------------------------
    def _set_unhealthy(self, message: str) -> None:
        with self._health_lock:
            changed = self.healthy or message != self.last_error
            self.healthy = False
            self.last_error = message
        if changed:
            with contextlib.suppress(OSError, ValueError):
                # The audit gate answers this with 503s: a runtime condition, not a start-up error.
                logger.log(self.failure_level, f"warden: AUDIT FAILURE: {message}",
                           extra={"warden_runtime_condition": True})
            if self.notify is not None:
                with contextlib.suppress(Exception):
                    self.notify(message)

    def _set_healthy(self) -> None:
        with self._health_lock:
            if self.healthy or len(self._queue) >= self.queue_size // 2:
                return
            self.healthy = True
            self.last_error = None
        with contextlib.suppress(OSError, ValueError):
            logger.warning("warden: audit log writable again")

    # -- writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            if not self._queue and not self._pending:
                if self._stopping.is_set():
                    if self._flush_pending(final=True):  # the shutdown checkpoint, fsync
                        return
                    time.sleep(RETRY_SECONDS)  # close() bounds the wait
                    continue
                self._wake.wait(timeout=min(RETRY_SECONDS, self.checkpoint_seconds))
                self._wake.clear()  # before the queue is read: a later submit sets it again
                if not self._queue:
                    self._periodic_checkpoint()
                    continue
                # Let a batch gather: one wake-up, write and flush per BATCH_SECONDS instead of per
                # record (a wake-up per record cost ~14% of Warden's CPU on new-connection load).
                time.sleep(BATCH_SECONDS)
            self._wake.clear()
            while self._queue and len(self._pending) < 4096:
                self._pending.append(self._queue.popleft())
            final = self._stopping.is_set() and not self._queue
            if self._flush_pending(final=final):
                if final:
                    return
            else:
                time.sleep(RETRY_SECONDS)  # the batch stays pending; also when stopping

    def _periodic_checkpoint(self) -> None:
        if (self.signer is not None and self._since_checkpoint
                and time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds):
            self._flush_pending(checkpoint_only=True)

    def _open(self) -> None:
        assert self.path is not None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self._fd, 0o600)  # also for a file an older version created 0644
        self._size = os.fstat(self._fd).st_size
        if self._size == 0:
            self._seq = 0
            self._segment_reason = self._segment_reason or "rotate"

    def _line(self, record: dict[str, Any] | str, is_record: bool = True) -> _Line:
        self._seq += 1
        if isinstance(record, str):  # `{...}` from record_json: the same bytes as the dict path gives
            link = f'"{F.SEQ}":{self._seq},"{F.PREV_HASH}":"{self._last_hash}"}}'
            data = _line_bytes(record[:-1] + ("," if len(record) > 2 else "") + link)
        else:
            record[F.SEQ] = self._seq
            record[F.PREV_HASH] = self._last_hash
            data = _dumps(record)
        self._last_hash = hashlib.sha256(data).hexdigest()
        self._size += len(data) + 1
        if is_record:
            self._since_checkpoint += 1
        return _Line(data + b"\n", is_record)

    def _chain_start(self) -> _Line:
        record: dict[str, Any] = {"event": "chain_start", "time": utc_now(),
                                  "file": self.path.name if self.path else "-", "reason": self._segment_reason,
                                  "pid": os.getpid()}
        if self._segment_error:
            record["error"] = self._segment_error
        if self.signer is not None:
            record["key_id"] = self.signer.key_id
        self._segment_reason = None
        self._segment_error = None
        self.stats.segments += 1
        return self._line(record, is_record=False)

    def _checkpoint(self, reason: str) -> _Line:
        assert self.signer is not None
        when = utc_now()
        seq = self._seq + 1
        signature = self.signer.sign(checkpoint_message(self._last_hash, seq, reason, when))
        record = {"event": "checkpoint", "time": when, "reason": reason, "key_id": self.signer.key_id,
                  "signature": signature}
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self.stats.checkpoints += 1
        return self._line(record, is_record=False)

    def _commit(self, lines: list[_Line]) -> None:
        """Write `lines` whole or not at all (the file is cut back on failure)."""
        data = b"".join(line.data for line in lines)
        if not data:
            return
        if self._fd is not None:
            start = os.lseek(self._fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
            except OSError:
                try:
                    os.ftruncate(self._fd, start)  # no torn line, nothing written twice
                except OSError:
                    self._torn_at = start  # cut before the next write instead
                raise
        if self.to_stdout:
            try:
                self._stdout.write(data)
                self._stdout.flush()
            except (OSError, ValueError):
                if self.stdout_only:
                    raise
                # a mirror: the file holds the records; say so once, keep going
                self._stdout_failed()

    def _stdout_failed(self) -> None:
        if self.to_stdout:
            self.to_stdout = False
            with contextlib.suppress(OSError, ValueError):
                logger.error("warden: audit mirror to stdout failed; records still go to the file")

    def _state(self) -> tuple[Any, ...]:
        return (self._last_hash, self._seq, self._size, self._since_checkpoint, self._segment_reason,
                self._segment_error, self._last_checkpoint, self.stats.checkpoints, self.stats.segments)

    def _restore(self, state: tuple[Any, ...]) -> None:
        (self._last_hash, self._seq, self._size, self._since_checkpoint, self._segment_reason,
         self._segment_error, self._last_checkpoint, self.stats.checkpoints, self.stats.segments) = state

    def _flush_pending(self, final: bool = False, checkpoint_only: bool = False) -> bool:
        """Write pending records (plus chain_start/checkpoints). On failure keep what was not
        written for a retry, restore the chain state and begin a new segment on the next success."""
        if not self._pending and not final and not checkpoint_only:
            return True
        saved = self._state()
        try:
            if self._torn_at is not None and self._fd is not None:
                os.ftruncate(self._fd, self._torn_at)  # a failed write we could not cut back before
                self._torn_at = None
            if self.path is not None and self._fd is None:
                self._open()
            lines: list[_Line] = []
            if self._segment_reason is not None:
                lines.append(self._chain_start())
            records = list(self._pending)
            done = 0
            for index, record in enumerate(records):
                if self.path is not None and self._size >= self.max_file_bytes:
                    if self.signer is not None:
                        lines.append(self._checkpoint("rotate"))
                    self._commit(lines)
                    lines = []
                    del self._pending[:index - done]
                    self.stats.written += index - done
                    done = index
                    self._rotate()
                    saved = self._state()  # the rotated file is complete; retries start in the new one
                    lines.append(self._chain_start())
                lines.append(self._line(record))
                if self.signer is not None and self._since_checkpoint >= self.checkpoint_records:
                    lines.append(self._checkpoint("interval"))
            if self.signer is not None:
                if final:
                    lines.append(self._checkpoint("shutdown"))
                elif self._since_checkpoint and (
                        checkpoint_only or time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds):
                    lines.append(self._checkpoint("interval"))
            self._commit(lines)
            if final and self._fd is not None:
                os.fsync(self._fd)
        except (OSError, ValueError) as e:
            self._restore(saved)
            self.stats.write_failures += 1
            reason = getattr(e, "strerror", None) or e.__class__.__name__
            self._segment_reason = "write_failure"
            self._segment_error = str(reason)[:200]
            self._set_unhealthy(f"cannot write audit log {self.path or 'stdout'}: {reason}")
            return False
        self.stats.written += len(self._pending)
        self._pending.clear()
        if not self.healthy:
            self._set_healthy()
        return True

    def _rotate(self) -> None:
        assert self.path is not None and self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.name}.{stamp}")
        os.rename(self.path, target)  # never truncate: the old file keeps every record
        self._segment_reason = "rotate"
        self._open()


# -- verification ----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    records: int
    message: str
    file: str | None = None
    line: int | None = None
    checkpoints: int = 0
    signed: bool = False  # signatures were checked against a public key
    notes: tuple[str, ...] = field(default=())


@dataclass
class _Entry:
    source: str
    lineno: int
    raw: bytes
    record: dict[str, Any] | None
    is_file: bool


def _entries(sources: Iterable[tuple[str, Iterable[bytes], bool]]) -> Iterator[_Entry]:
    for name, lines, is_file in sources:
        for lineno, raw in enumerate(lines, 1):
            line = raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
            record: dict[str, Any] | None
            try:
                parsed = json.loads(line)
                record = parsed if isinstance(parsed, dict) and "prev_hash" in parsed and "seq" in parsed else None
            except ValueError:
                record = None
            yield _Entry(name, lineno, line, record, is_file)


def verify_sources(sources: Iterable[tuple[str, Iterable[bytes], bool]],
                   public_keys: Iterable[Ed25519PublicKey] = (), live: bool = False) -> VerifyResult:
    """Check the chain across `sources` in chain order: (name, lines, is_file) each.

    Finds the first line that does not fit (see the README table for what that catches),
    checks every checkpoint signature when public keys are given, and requires the input to
    end with a shutdown or rotate checkpoint once the log has checkpoints (`live`: the last
    source may end with records written after its last checkpoint, e.g. a running Warden).

    A captured stream may interleave several chains (`--workers N --audit-log -`: each
    worker writes its own, line by line). Such a stream is split by following the hash
    links (each line names the hash of its predecessor; a chain begins at a `chain_start`
    from 64 zeros) and each chain is checked on its own; a line that continues no chain
    is reported where it is.
    """
    keys = {key_id(k): k for k in public_keys}
    entries = list(_entries(sources))
    if not entries:
        return VerifyResult(False, 0, "no records", None, None)
    groups = _split_chains(entries)
    total = checkpoints = 0
    notes: list[str] = []
    for group in groups:
        result = _verify_entries(group, keys, live, must_start=len(groups) > 1)
        if not result.ok:
            return result
        total += result.records
        checkpoints += result.checkpoints
        notes.extend(result.notes)
    if len(groups) == 1:
        return _verify_entries(entries, keys, live)
    what = f"ok: {total} records in {len(groups)} interleaved chains, each intact"
    if checkpoints:
        what += f", {checkpoints} checkpoints" + (" (signatures valid)" if keys else " (signatures NOT checked: "
                                                                                     "no --public-key)")
    return VerifyResult(True, total, what, checkpoints=checkpoints, signed=bool(keys), notes=tuple(notes))


def _split_chains(entries: list[_Entry]) -> list[list[_Entry]]:
    """Interleaved chains of a stream, by hash links (files and single chains: one group)."""
    starts = sum(1 for e in entries if not e.is_file and e.record is not None
                 and e.record.get("event") == "chain_start" and e.record.get("prev_hash") == GENESIS)
    if starts < 2 or any(e.is_file or e.record is None for e in entries):
        return [entries]
    chains: list[list[_Entry]] = []
    heads: dict[str, int] = {}  # hash of a chain's last line -> the chain
    for e in entries:
        rec = e.record
        assert rec is not None
        prev = rec.get("prev_hash")
        if rec.get("event") == "chain_start" and prev == GENESIS:
            index = len(chains)
            chains.append([e])
        elif isinstance(prev, str) and prev in heads:
            index = heads.pop(prev)
            chains[index].append(e)
        else:  # continues no chain (its predecessor was edited or deleted): an orphan group
            index = len(chains)
            chains.append([e])
        heads[hashlib.sha256(e.raw).hexdigest()] = index
    # orphans first: the line that continues nothing is the precise finding
    return sorted(chains, key=lambda c: c[0].record is not None and c[0].record.get("event") == "chain_start")


def _verify_entries(entries: list[_Entry], keys: dict[str, Ed25519PublicKey], live: bool,
                    must_start: bool = False) -> VerifyResult:
    signed = bool(keys)
    count = checkpoints = 0
    notes: list[str] = []
    last_checkpoint: _Entry | None = None
    since_checkpoint = 0
    seen_signed_start = False

    def fail(entry: _Entry, message: str) -> VerifyResult:
        return VerifyResult(False, count, message, entry.source, entry.lineno, checkpoints, signed, tuple(notes))

    if must_start and entries[0].record is not None and entries[0].record.get("event") != "chain_start":
        return fail(entries[0], "this line continues no chain in the stream: the line before it in its chain "
                                "was edited or deleted")
    for i, entry in enumerate(entries):
        rec = entry.record
        if rec is None:
            return fail(entry, "empty line" if not entry.raw else "not a Warden audit record")
        prev = entries[i - 1] if i else None
        new_source = prev is None or prev.source != entry.source
        event = rec.get("event")
        seq = rec.get("seq")
        if entry.is_file and seq != entry.lineno:
            if entry.lineno == 1 or not isinstance(seq, int) or not isinstance(prev and prev.record, dict):
                return fail(entry, f"seq {seq!r} on line {entry.lineno}: lines missing or inserted before it")
            assert prev is not None and prev.record is not None
            if seq > entry.lineno:
                return fail(entry, f"records missing before this line (seq jumps from {prev.record.get('seq')} "
                                   f"to {seq})")
            return fail(entry, f"line inserted or duplicated (seq {seq} on line {entry.lineno})")
        if new_source and entry.is_file and event != "chain_start":
            return fail(entry, "file does not start with a chain_start record")
        if prev is not None and prev.record is not None and not (event == "chain_start" and seq == 1):
            prev_seq = prev.record.get("seq")
            if isinstance(prev_seq, int) and seq != prev_seq + 1:
                return fail(entry, f"records missing or inserted here (seq {prev_seq} then {seq})")
        genesis_restart = event == "chain_start" and rec.get("prev_hash") == GENESIS and prev is not None
        if prev is not None and not genesis_restart:
            expected = hashlib.sha256(prev.raw).hexdigest()
            if rec.get("prev_hash") != expected:
                # Which line is bad? If this line is itself intact (the next line links to it),
                # the previous one was edited; otherwise this one was.
                nxt = entries[i + 1] if i + 1 < len(entries) else None
                this_intact = nxt is not None and nxt.record is not None and \
                    nxt.record.get("prev_hash") == hashlib.sha256(entry.raw).hexdigest()
                if this_intact and not new_source:
                    return fail(prev, "edited line: its hash does not match what the next line recorded")
                if new_source:
                    return fail(entry, "chain broken between files: this file does not continue the one before "
                                       "it (missing, reordered or edited file)")
                return fail(entry, "edited line: its prev_hash does not match the line before it")
        if genesis_restart:
            if since_checkpoint and (checkpoints or signed):
                assert prev is not None
                return fail(prev, "chain ends without a checkpoint before a new chain starts: "
                                  "truncated, or Warden was killed before it could sign")
            notes.append(f"{entry.source}:{entry.lineno}: a new chain starts (a new process writing to a stream)")
        if event == "chain_start" and rec.get("key_id"):
            seen_signed_start = True
        if event == "checkpoint":
            checkpoints += 1
            if signed:
                key = keys.get(str(rec.get("key_id")))
                if key is None:
                    return fail(entry, f"checkpoint signed with key {rec.get('key_id')!r}, not a given public key")
                try:
                    sig = base64.b64decode(str(rec.get("signature", "")), validate=True)
                    key.verify(sig, checkpoint_message(str(rec["prev_hash"]), int(rec["seq"]),
                                                       str(rec.get("reason")), str(rec.get("time"))))
                except (InvalidSignature, ValueError, TypeError, KeyError):
                    lo = f"{last_checkpoint.source}:{last_checkpoint.lineno}" if last_checkpoint else "the start"
                    return fail(entry, f"bad checkpoint signature: the records between {lo} and this line were "
                                       f"rewritten (hash chain recomputed by someone without the key)")
            last_checkpoint = entry
            since_checkpoint = 0
        else:
            since_checkpoint += 1
            if event not in ("chain_start",):
                count += 1
    last = entries[-1]
    expect_checkpoints = signed or checkpoints > 0 or seen_signed_start
    if expect_checkpoints:
        if checkpoints == 0:
            return fail(last, "no checkpoints: signing was expected (public key given or chain_start names a key) "
                              "but the log has none; it was rewritten or truncated")
        ends = last.record.get("reason") if last.record and last.record.get("event") == "checkpoint" else None
        if since_checkpoint and not live:
            assert last_checkpoint is not None
            return fail(last, f"{since_checkpoint} records after the last checkpoint "
                              f"({last_checkpoint.source}:{last_checkpoint.lineno}) are not signed: the log was "
                              f"truncated, or Warden was killed before its shutdown checkpoint (use --live for the "
                              f"file of a running Warden)")
        if since_checkpoint:
            notes.append(f"{since_checkpoint} records after the last checkpoint are not signed yet (--live)")
        elif ends == "interval" and not live:
            return fail(last, "the log ends at a periodic checkpoint, not at shutdown: truncated, or Warden was "
                              "killed (use --live for the file of a running Warden)")
        elif ends == "rotate":
            notes.append("the chain continues in a newer file (rotated) that was not given")
    what = f"ok: {count} records, chain intact"
    if checkpoints:
        what += f", {checkpoints} checkpoints" + (" (signatures valid)" if signed else " (signatures NOT checked: "
                                                                                        "no --public-key)")
    return VerifyResult(True, count, what, checkpoints=checkpoints, signed=signed, notes=tuple(notes))


def _file_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from f


def verify_chain(paths: Iterable[str | Path], public_keys: Iterable[Ed25519PublicKey] = (),
                 live: bool = False) -> VerifyResult:
    """Check the chain across files given in chain order (oldest first)."""
    sources = []
    for p in paths:
        path = Path(p)
        try:
            path.stat()
            with path.open("rb"):
                pass
        except OSError as e:
            return VerifyResult(False, 0, f"cannot read: {e.strerror}", str(path), 0)
        sources.append((str(path), _file_lines(path), True))
    return verify_sources(sources, public_keys, live)
