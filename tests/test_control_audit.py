"""Issue 12 items 5 and 6 against a real `warden run`: stdout as a pure audit stream,
JSON operational logs, signed checkpoints, exact tamper lines, private files."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from .control_helpers import proxied_get, wait_until
from .harness import WARDEN, Origin, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKEN = "audit-token-42"


def _rules(plain: Origin, tmp_path: Path, **audit: object) -> dict:
    return {"agents": [{"id": "a", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
            "policies": {"p": {"allow": [{"host": "allowed.test", "ports": [plain.port]},
                                         {"cidr": "127.0.0.1/32", "ports": [plain.port]}]}},
            "deny": [{"id": "no-denied", "host": "denied.test"}],
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts")), "secrets_dir": str(tmp_path / "secrets"),
                         **({"audit": audit} if audit else {})}}


def _verify(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WARDEN, "audit", "verify", *args], input=stdin.decode() if stdin else None,
                          capture_output=True, text=True, timeout=60)


def test_stdout_is_only_audit_records_and_verifies(tmp_path: Path, plain_origin: Origin) -> None:
    (tmp_path / "secrets").mkdir()
    rules = _rules(plain_origin, tmp_path)
    w = start_warden(tmp_path, rules, audit_log="-", extra_args=["--log-format", "json", "-v"], agents={"a": TOKEN})
    try:
        assert proxied_get(w, "a", f"http://allowed.test:{plain_origin.port}/").status_code == 200
        assert proxied_get(w, "a", f"http://denied.test:{plain_origin.port}/").status_code == 403
        rules["deny"].append({"id": "also", "host": "other.test"})
        w.write_rules(rules)  # a reload: logged on stderr, audited on stdout
        assert wait_until(lambda: '"event":"reload"' in w.stdout_path.read_text(), timeout=10)
    finally:
        w.stop()
    out = w.stdout_path.read_bytes()
    lines = out.splitlines()
    records = [json.loads(line) for line in lines]  # every stdout line is JSON...
    assert records[0]["event"] == "chain_start"
    assert all("prev_hash" in r and "seq" in r for r in records)  # ...and an audit record
    assert {"startup", "request", "reload", "shutdown"} <= {r["event"] for r in records}
    err_lines = [line for line in w.stderr_path.read_text().splitlines() if line.strip()]
    assert err_lines, "expected operational logs on stderr"
    for line in err_lines:
        entry = json.loads(line)  # --log-format json: every stderr line is a JSON object
        assert {"time", "level", "message"} <= set(entry)
    assert any("reloaded" in json.loads(line)["message"] for line in err_lines)
    captured = tmp_path / "captured.jsonl"
    captured.write_bytes(out)
    result = _verify("-", stdin=out)
    assert result.returncode == 0, result.stdout
    assert _verify(str(captured)).returncode == 0  # a saved capture of one process verifies as a file too
    # a stream cut in the middle does not verify
    cut = b"\n".join(lines[:2] + lines[3:]) + b"\n"
    assert _verify("-", stdin=cut).returncode == 1


def test_signed_checkpoints_detect_truncation_and_rewrites(tmp_path: Path, plain_origin: Origin) -> None:
    keys = tmp_path / "keys"
    secrets = tmp_path / "secrets"
    r = subprocess.run([WARDEN, "audit", "keygen", "--out-dir", str(keys)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    secrets.mkdir()
    (secrets / "AUDIT_SIGNING_KEY").write_bytes((keys / "AUDIT_SIGNING_KEY").read_bytes())
    assert stat.S_IMODE((keys / "AUDIT_SIGNING_KEY").stat().st_mode) == 0o600
    public = str(keys / "AUDIT_SIGNING_KEY.pub")
    audit_path = tmp_path / "audit-dir" / "audit.jsonl"
    rules = _rules(plain_origin, tmp_path, signing_key="${secret:AUDIT_SIGNING_KEY}", checkpoint_records=5)
    w = start_warden(tmp_path, rules, audit_log=str(audit_path), agents={"a": TOKEN})
    try:
        for _ in range(12):
            assert proxied_get(w, "a", f"http://allowed.test:{plain_origin.port}/").status_code == 200
        assert wait_until(lambda: audit_path.exists() and '"checkpoint"' in audit_path.read_text(), timeout=10)
        live = _verify("--public-key", public, "--live", str(audit_path))
        assert live.returncode == 0, live.stdout
    finally:
        w.stop()
    assert stat.S_IMODE(audit_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit_path.parent.stat().st_mode) == 0o700
    ok = _verify("--public-key", public, str(audit_path))
    assert ok.returncode == 0 and "signatures valid" in ok.stdout, ok.stdout
    lines = audit_path.read_bytes().splitlines(keepends=True)
    assert json.loads(lines[-1])["event"] == "checkpoint" and json.loads(lines[-1])["reason"] == "shutdown"
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(b"".join(lines[:-3]))  # the last lines deleted
    r = _verify("--public-key", public, str(copy))
    assert r.returncode == 1 and "truncated" in r.stdout, r.stdout
    # an edit on line 10 is reported on line 10
    edited = list(lines)
    record = json.loads(edited[9])
    record["x_edit"] = True
    edited[9] = json.dumps(record, separators=(",", ":")).encode() + b"\n"
    copy.write_bytes(b"".join(edited))
    r = _verify(str(copy))
    assert r.returncode == 1 and f"{copy}:10:" in r.stdout, r.stdout
    # the key is not in the log, the output, or the records
    key_text = (keys / "AUDIT_SIGNING_KEY").read_text()
    body = "".join(key_text.splitlines()[1:-1])
    assert body not in audit_path.read_text() + w.output()
    assert yaml.safe_dump(rules)  # rules stay plain YAML (no key material in them)
