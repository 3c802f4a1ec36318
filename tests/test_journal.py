"""The audit journal on its own: what `verify` detects (the README table), file modes, seq."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
from egresswarden.record import fields
from egresswarden.record.journal import (
    AuditWriter,
    generate_key_pair,
    line_hash,
    load_public_key,
    load_signing_key,
    verify_chain,
    verify_sources,
)

KEY = generate_key_pair()
OTHER_KEY = generate_key_pair()


def _write(path: Path, n: int, signed: bool = True, every: int = 10) -> Path:
    signer = load_signing_key(KEY[0].decode()) if signed else None
    w = AuditWriter(str(path), signer=signer, checkpoint_records=every)
    w.start()
    for i in range(n):
        w.submit({"event": "request", "i": i})
    w.close()
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _pub() -> list:
    return [load_public_key(KEY[1])]


def test_seq_is_the_line_number_and_restarts_continue_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a" / "audit.jsonl", 25)
    _write(path, 5)
    records = [json.loads(line) for line in _lines(path)]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    starts = [r for r in records if r["event"] == "chain_start"]
    assert len(starts) == 2 and starts[1]["reason"] == "start"
    assert verify_chain([path], _pub()).ok


def test_files_are_0600_in_a_0700_directory(tmp_path: Path) -> None:
    path = _write(tmp_path / "new" / "dir" / "audit.jsonl", 3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_edit_is_reported_on_the_edited_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.jsonl", 80)
    lines = _lines(path)
    assert b'"i":44,' in lines[49]  # line 50
    lines[49] = lines[49].replace(b'"i":44,', b'"i":46,')
    path.write_bytes(b"".join(lines))
    result = verify_chain([path])
    assert not result.ok and result.line == 50, result


def test_deleted_middle_line_is_reported_where_it_is_missing(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.jsonl", 40)
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:20] + lines[21:]))
    result = verify_chain([path])
    assert not result.ok and result.line == 21 and "missing" in result.message, result


def test_truncated_tail_is_detected(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.jsonl", 55)
    lines = _lines(path)
    assert verify_chain([path], _pub()).ok
    for cut in (1, 3, 8):  # the shutdown checkpoint, records after a checkpoint, at a periodic checkpoint
        path.write_bytes(b"".join(lines[:-cut]))
        result = verify_chain([path], _pub())
        assert not result.ok, (cut, result)
        assert "truncated" in result.message
        assert not verify_chain([path]).ok  # structure alone already shows it


def test_rewrite_without_the_key_is_detected(tmp_path: Path) -> None:
    """Whoever can write the file rewrites a record and recomputes every hash after it."""
    path = _write(tmp_path / "audit.jsonl", 30)
    records = [json.loads(line) for line in _lines(path)]
    records[5]["i"] = 999
    out, prev = [], None
    for r in records:
        if prev is not None:
            r["prev_hash"] = line_hash(prev)
        line = json.dumps(r, separators=(",", ":")).encode()
        out.append(line + b"\n")
        prev = line
    path.write_bytes(b"".join(out))
    assert verify_chain([path]).ok  # the plain hash chain cannot tell...
    result = verify_chain([path], _pub())  # ...the signed checkpoint can
    assert not result.ok and "signature" in result.message and result.line == 12, result


def test_stripping_every_checkpoint_is_detected_with_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.jsonl", 30)
    records = [json.loads(line) for line in _lines(path) if b'"checkpoint"' not in line]
    out, prev = [], None
    for n, r in enumerate(records, 1):
        r.pop("key_id", None)
        r["seq"] = n
        if prev is not None:
            r["prev_hash"] = line_hash(prev)
        line = json.dumps(r, separators=(",", ":")).encode()
        out.append(line + b"\n")
        prev = line
    path.write_bytes(b"".join(out))
    result = verify_chain([path], _pub())
    assert not result.ok and "no checkpoints" in result.message


def test_wrong_public_key_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.jsonl", 5)
    result = verify_chain([path], [load_public_key(OTHER_KEY[1])])
    assert not result.ok and "not a given public key" in result.message


def test_rotated_files_chain_and_a_missing_middle_file_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    w = AuditWriter(str(path), signer=load_signing_key(KEY[0].decode()), max_file_bytes=2000)
    w.start()
    for i in range(100):
        w.submit({"event": "request", "i": i})
    w.close()
    files = [*sorted(tmp_path.glob("audit.jsonl.*")), path]
    assert len(files) >= 3
    assert verify_chain(files, _pub()).ok
    result = verify_chain([files[0], *files[2:]], _pub())
    assert not result.ok and result.line == 1 and "between files" in result.message


def test_captured_stream_with_restarts_verifies(tmp_path: Path) -> None:
    import io

    chunks = []
    for _ in range(2):  # two processes writing to the same log collector
        out = io.BytesIO()
        w = AuditWriter("-", stdout=out, signer=load_signing_key(KEY[0].decode()))
        w.start()
        for i in range(7):
            w.submit({"event": "request", "i": i})
        w.close()
        chunks.append(out.getvalue())
    stream = b"".join(chunks)
    assert stream.startswith(b'{"event":"chain_start"')
    result = verify_sources([("<stdin>", stream.splitlines(keepends=True), False)], _pub())
    assert result.ok and result.records == 14, result
    # the first process's tail cut off (its shutdown checkpoint lost) is visible
    first = chunks[0].splitlines(keepends=True)
    cut = b"".join(first[:-2]) + chunks[1]
    result = verify_sources([("<stdin>", cut.splitlines(keepends=True), False)], _pub())
    assert not result.ok and "truncated" in result.message and result.line == len(first) - 2, result


def test_interleaved_worker_streams_verify_chain_by_chain() -> None:
    """`--workers 2 --audit-log -`: two chains, line by line, on one stdout."""
    import io
    import itertools

    outputs = []
    for _ in range(2):
        out = io.BytesIO()
        w = AuditWriter("-", stdout=out, signer=load_signing_key(KEY[0].decode()), checkpoint_records=3)
        w.start()
        for i in range(10):
            w.submit({"event": "request", "i": i})
        w.close()
        outputs.append(out.getvalue().splitlines(keepends=True))
    mixed = [line for pair in itertools.zip_longest(*outputs) for line in pair if line]
    result = verify_sources([("<stdin>", mixed, False)], _pub())
    assert result.ok and result.records == 20 and "2 interleaved chains" in result.message, result
    cut = mixed[:7] + mixed[8:]
    result = verify_sources([("<stdin>", cut, False)], _pub())
    assert not result.ok and result.line == 9, result  # the line after the deleted one

@pytest.mark.parametrize("garbage", [b"\n", b"not json\n", b'{"no":"chain"}\n'])
def test_foreign_lines_are_rejected(tmp_path: Path, garbage: bytes) -> None:
    path = _write(tmp_path / "audit.jsonl", 5, signed=False)
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:2] + [garbage] + lines[2:]))
    result = verify_chain([path])
    assert not result.ok and result.line == 3


def test_torn_last_line_from_a_crash_is_cut_before_appending(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.jsonl", 5, signed=False)
    with path.open("ab") as f:
        f.write(b'{"event":"request","i":')  # a crash mid-write
    _write(path, 2, signed=False)
    assert verify_chain([path]).ok
    assert os.stat(path).st_size == len(b"".join(_lines(path)))


def test_failure_notice_never_reenters_submit(tmp_path: Path) -> None:
    """Queue full -> notify -> (an alert) -> submit -> queue full must not recurse."""
    notices: list[str] = []
    w = AuditWriter(str(tmp_path / "audit.jsonl"), queue_size=1)

    def notify(message: str) -> None:
        notices.append(message)
        assert w.submit({"event": "alert", "kind": "audit_failure"}) is False  # still full: no new notice

    w.notify = notify
    assert w.submit({"event": "request"}) is True  # writer not started: the queue stays full
    assert w.submit({"event": "request"}) is False
    assert w.submit({"event": "request"}) is False
    assert notices == ["audit queue full: the writer cannot keep up"] and not w.healthy


def test_a_record_submitted_as_text_is_written_byte_for_byte_as_its_dict(tmp_path: Path) -> None:
    """Audit hands the writer the JSON text it already made for the secret scan (one
    serialisation per record): the chained line must be the one the dict would give."""
    from egresswarden.record.journal import AuditWriter, record_json

    lines = []
    for kind in ("dict", "text"):
        path = tmp_path / f"{kind}.jsonl"
        writer = AuditWriter(str(path))
        writer.start()
        for i, rec in enumerate([{"event": "connect", "time": "t", "host": "a\u2028b\u0085c\u2029", "n": 1},
                                 {"event": "request", "time": "t", "path": "/é"}]):
            rec = dict(rec, i=i)
            writer.submit(record_json(rec) if kind == "text" else rec)
        writer.close()
        lines.append([ln for ln in path.read_bytes().splitlines() if b'"chain_start"' not in ln])
    import hashlib
    import re

    for got in lines:  # each chain links: a line's prev_hash is the hash of the line before it
        assert json.loads(got[1])["prev_hash"] == hashlib.sha256(got[0]).hexdigest()
    # the chain_start line before them differs (file name, time, pid), so does the first link
    unlinked = [[re.sub(rb'"prev_hash":"[0-9a-f]{64}"', b"", ln) for ln in got] for got in lines]
    assert unlinked[0] == unlinked[1] and len(lines[0]) == 2
    assert b"\\u2028" in lines[0][0] and "\u2028".encode() not in lines[0][0]


def test_every_audit_field_the_code_writes_is_in_the_readme() -> None:
    """record/fields.py names every key an audit record can carry; each is documented."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    names = [v for k, v in vars(fields).items() if k.isupper() and isinstance(v, str)]
    assert len(names) > 50
    missing = [n for n in names if not re.search(rf"`[^`\n]*\b{re.escape(n)}\b[^`\n]*`", readme)]
    assert missing == []
