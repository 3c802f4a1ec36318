"""Unit tests of the replay engine and the audit readers, on records written by the real
journal writer (record/journal.py) from real Outcomes (record/audit.py outcome_record)."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from egresswarden.cli import replay as replay_mod
from egresswarden.cli.auditread import Reader, chain_order, parse_line
from egresswarden.cli.replay import fast_key, replay_files, standard_layout
from egresswarden.core.decision import Decision, Interception, Reason, Verdict
from egresswarden.core.loader import load_ruleset
from egresswarden.core.ruleset import RuleSet
from egresswarden.record.audit import outcome_record
from egresswarden.record.journal import AuditWriter
from egresswarden.record.outcome import Outcome

from .harness import sha256_hex

OLD = {
    "agents": [{"id": "coder", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
    "policies": {"p": {"allow": [{"id": "api", "host": "api.test", "methods": ["GET", "POST"]},
                                 {"id": "web", "host": "web.test"}]}},
}
NEW = {
    "agents": [{"id": "coder", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
    "policies": {"p": {"allow": [{"id": "api-get", "host": "api.test", "methods": ["GET"]},
                                 {"id": "web", "host": "web.test"}, {"id": "new", "host": "new.test"}]}},
    "settings": {"hosts_file": "hosts"},
}


@pytest.fixture(scope="module")
def new_rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    d = tmp_path_factory.mktemp("new-rules")
    (d / "rules.yaml").write_text(yaml.safe_dump(NEW))
    (d / "hosts").write_text("93.184.216.34 new.test\n")
    return load_ruleset(d, secrets=False)


def _decision(verdict: Verdict, reason: Reason, rule: str | None) -> Decision:
    return Decision(verdict, reason, rule, "m", "old")


def write_log(path: Path, n: int) -> None:
    """n outcome records through the real writer: a repeating mix, some with unique paths."""
    writer = AuditWriter(str(path), max_file_bytes=20_000)
    writer.start()
    kinds = itertools.cycle(range(6))
    for i in range(n):
        k = next(kinds)
        common: dict[str, Any] = {"time": f"2026-12-01T00:00:{i % 60:02d}.000000Z", "request_id": f"{i:016x}",
                                  "agent": "coder", "identity": "token", "client_ip": "10.0.0.1",
                                  "client_port": 40000 + i, "port": 443, "scheme": "https",
                                  "upstream_address": "93.184.216.34"}
        if k == 0:
            o = Outcome(event="connect", method="CONNECT", host="api.test", interception=Interception.INTERCEPT,
                        decision=_decision(Verdict.ALLOW, Reason.ALLOWED, "api"), **common)
        elif k in (1, 2):
            method = "POST" if k == 1 else "GET"
            o = Outcome(event="request", method=method, host="api.test", path=f"/items/{i % 7 if k == 2 else i}",
                        interception=Interception.INTERCEPT, decision=_decision(Verdict.ALLOW, Reason.ALLOWED, "api"),
                        **common)
        elif k == 3:
            o = Outcome(event="connect", method="CONNECT", host="web.test", interception=Interception.PASSTHROUGH,
                        decision=_decision(Verdict.ALLOW, Reason.ALLOWED, "web"), **common)
        elif k == 4:
            o = Outcome(event="connect", method="CONNECT", host="new.test",
                        decision=_decision(Verdict.DENY, Reason.NO_MATCHING_RULE, None),
                        **{**common, "upstream_address": None})
        else:
            o = Outcome(event="tunnel_close", method="CONNECT", host="web.test", interception=Interception.PASSTHROUGH,
                        decision=_decision(Verdict.ALLOW, Reason.ALLOWED, "web"), carried_tls=i % 12 == 5, **common)
        writer.submit(outcome_record(o))
    writer.close()


def _comparable(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("seconds", "records_per_second", "cpu_seconds",
                                                         "records_per_cpu_second")}


def test_fast_path_and_full_parse_give_the_same_report(tmp_path: Path, new_rules: RuleSet,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_log(tmp_path / "audit.jsonl", 3000)
    files = [str(p) for p in tmp_path.iterdir()]
    assert len(files) > 1  # rotated
    fast = replay_files(new_rules, files, examples=5)
    monkeypatch.setattr(replay_mod, "fast_key", lambda raw: None)
    slow = replay_files(new_rules, files, examples=5)
    assert _comparable(fast) == _comparable(slow)
    denied = fast["changes"]["newly_denied"]
    assert denied["records"] == 500 and denied["groups"][0]["new"]["reason"] == "method_not_allowed"
    allowed = fast["changes"]["newly_allowed"]
    assert allowed["records"] == 500 and allowed["groups"][0]["new"]["rule_id"] == "new"
    assert fast["unchanged"] == 1500 and fast["skipped_events"]["tunnel_close"] == 250
    raw = fast["changes"]["raw_tcp_removed"]  # the tunnels that carried raw bytes: web's rule has no raw_tcp
    assert raw["records"] == fast["events"]["tunnel_close"] == 250 and raw["groups"][0]["new"]["decision"] == "tls only"
    monkeypatch.undo()
    # The fast path really is taken for the writer's records (its layout is the one fast_key knows).
    engine = replay_mod.Replay(new_rules)
    for file, number, raw in Reader(files).raw_lines():
        engine.feed(file, number, raw)
    assert 0 < len(engine.fast) < 1000  # repeated decisions share keys; unique POST paths add some


def test_fast_key_covers_the_outcome_layout_only(tmp_path: Path) -> None:
    write_log(tmp_path / "audit.jsonl", 6)
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines()
    start, outcome = json.loads(lines[0]), lines[1]
    assert start["event"] == "chain_start" and fast_key(lines[0]) is None
    record = json.loads(outcome)
    assert standard_layout(record) and fast_key(outcome) is not None
    # Two records differing only in time, ids, ports, sizes and the chain share a key ...
    other = dict(record, time="2027-01-01T00:00:00.000000Z", request_id="ff", client_port=1, seq=99,
                 prev_hash="0" * 64, duration_ms=5.0)
    assert fast_key(json.dumps(other, separators=(",", ":")).encode()) == fast_key(outcome)
    # ... and any decision input changes it.
    for field, value in (("agent", "x"), ("host", "h.test"), ("path", "/y"), ("decision", "deny"),
                         ("upstream_ip", "10.0.0.1"), ("method", "PUT"), ("rule_id", "z")):
        changed = json.dumps(dict(record, **{field: value}), separators=(",", ":")).encode()
        assert fast_key(changed) != fast_key(outcome), field
    reordered = {k: record[k] for k in sorted(record)}
    assert not standard_layout(reordered)


def test_readers_order_rotated_and_compressed_files_and_skip_noise(tmp_path: Path) -> None:
    assert chain_order(["a/audit.jsonl", "a/audit.jsonl.20261201T000001000000Z.gz",
                        "a/audit.jsonl.20261201T000000000000Z", "a/audit.w1.jsonl", "-"]) == [
        "-", "a/audit.jsonl.20261201T000000000000Z", "a/audit.jsonl.20261201T000001000000Z.gz", "a/audit.jsonl",
        "a/audit.w1.jsonl"]
    assert parse_line(b'2026-12-01T00:00:00Z {"event":"x","time":"t"}') is not None
    assert parse_line(b"plain text") is None and parse_line(b'{"no_event":1}') is None
    gz = tmp_path / "audit.jsonl.20261201T000000000000Z.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"event":"chain_start","time":"t"}\nnot json\n{"event":"connect","time":"t2"}\n')
    reader = Reader([str(gz)])
    assert [line.record["event"] for line in reader] == ["chain_start", "connect"]
    assert reader.unparsable == 1
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    reader = Reader([str(broken), str(tmp_path / "missing.jsonl")])
    assert list(reader) == [] and len(reader.errors) == 2
