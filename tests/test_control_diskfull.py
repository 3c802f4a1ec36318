"""Issue 12 item 7: a real filesystem fills up under a running Warden.

Warden runs in its own mount namespace (`unshare -m`) with its audit directory on a 256 KiB
tmpfs. The test fills the tmpfs through /proc/<pid>/root, sees Warden refuse traffic (503
audit_unavailable), frees the space, sees traffic flow again, and then checks the log the
shell inside the namespace copied out after Warden stopped: every request Warden answered is
recorded exactly once, the chain verifies (signatures included) and the failure shows as a
new segment (`chain_start` with reason `write_failure`).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from .control_helpers import alert_receiver, get_json, wait_until
from .harness import WARDEN, Origin, free_port, hosts_file, sha256_hex, wait_for_port

pytestmark = pytest.mark.e2e
TOKEN = "diskfull-token"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="needs root and unshare(1) for a private tmpfs mount")


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as f:
        chunk = b"\0" * 4096
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


@needs_root
def test_disk_full_mid_run_loses_and_duplicates_nothing(tmp_path: Path, plain_origin: Origin) -> None:
    with alert_receiver() as receiver:
        _disk_full(tmp_path, plain_origin, receiver)


def _disk_full(tmp_path: Path, plain_origin: Origin, receiver: ThreadingHTTPServer) -> None:
    keys = tmp_path / "keys"
    subprocess.run([WARDEN, "audit", "keygen", "--out-dir", str(keys)], check=True, capture_output=True, timeout=60)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    shutil.copy(keys / "AUDIT_SIGNING_KEY", secrets / "AUDIT_SIGNING_KEY")
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    rules = {"agents": [{"id": "a", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
             "policies": {"p": {"allow": [{"host": "allowed.test", "ports": [plain_origin.port]},
                                          {"cidr": "127.0.0.1/32", "ports": [plain_origin.port]}]}},
             "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts")), "secrets_dir": str(secrets),
                          "audit": {"signing_key": "${secret:AUDIT_SIGNING_KEY}", "checkpoint_records": 20},
                          "alerts": [{"id": "ops", "url": f"http://127.0.0.1:{receiver.server_address[1]}/",
                                      "events": ["audit_failure"]}]}}
    (rules_dir / "rules.yaml").write_text(json.dumps(rules))
    fs = tmp_path / "auditfs"
    fs.mkdir()
    out_copy = tmp_path / "final.jsonl"
    port, metrics_port = free_port(), free_port()
    warden = [WARDEN, "run", "--rules", str(rules_dir), "--listen", f"127.0.0.1:{port}",
              "--metrics-listen", f"127.0.0.1:{metrics_port}", "--audit-log", str(fs / "audit" / "audit.jsonl"),
              "--confdir", str(tmp_path / "certs")]
    script = (f"mount -t tmpfs -o size=256k,mode=0700 warden-audit {shlex.quote(str(fs))} && "
              f"{shlex.join(warden)}; cat {shlex.quote(str(fs / 'audit' / 'audit.jsonl'))} > "
              f"{shlex.quote(str(out_copy))}")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with (tmp_path / "stderr").open("wb") as err:
        shell = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                                 stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    warden_pid = None
    try:
        wait_for_port(port, proc=shell)
        # sh runs warden as its child; its /proc/<pid>/root shows the namespace's tmpfs
        children = Path(f"/proc/{shell.pid}/task/{shell.pid}/children").read_text().split()
        warden_pid = int(children[0])
        inside = Path(f"/proc/{warden_pid}/root") / str(fs).lstrip("/") / "audit"
        assert wait_until(lambda: (inside / "audit.jsonl").exists(), timeout=10)

        answered: dict[str, int] = {}
        with requests.Session() as s:
            s.trust_env = False
            proxies = {"http": f"http://a:{TOKEN}@127.0.0.1:{port}"}

            def request(i: int) -> int:
                path = f"/r/{i}"
                status = s.get(f"http://allowed.test:{plain_origin.port}{path}", proxies=proxies,
                               timeout=10).status_code
                answered[path] = status
                return status

            for i in range(10):
                assert request(i) == 200
            filler = _fill(inside)
            i = 10
            refused = False
            while i < 400 and not refused:  # bounded: each request adds records until a write fails
                refused = request(i) == 503
                i += 1
            assert refused, "Warden kept serving although its audit log could not be written"
            assert get_json(metrics_port, "/readyz")[0] == 503
            assert get_json(metrics_port, "/livez")[0] == 200  # refuse traffic, but do not get restarted
            filler.unlink()
            retry = iter(range(i + 1000, i + 1900))
            assert wait_until(lambda: request(next(retry)) == 200, timeout=15)
            for j in range(i + 2000, i + 2010):
                assert request(j) == 200
    finally:
        if warden_pid is not None and shell.poll() is None:
            os.kill(warden_pid, signal.SIGTERM)  # warden stops, then sh copies the log out of the namespace
        try:
            shell.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(5)
    assert out_copy.exists() and out_copy.stat().st_size > 0, (tmp_path / "stderr").read_text()
    result = subprocess.run([WARDEN, "audit", "verify", "--public-key", str(keys / "AUDIT_SIGNING_KEY.pub"),
                             str(out_copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
    records = [json.loads(line) for line in out_copy.read_text().splitlines()]
    seen: dict[str, list[int]] = {}
    for r in records:
        if r.get("event") == "request":
            seen.setdefault(r["path"], []).append(r["status"])
    for path, status in answered.items():
        assert seen.get(path) == [status], (path, status, seen.get(path))  # exactly once, as answered
    failures = [r for r in records if r["event"] == "chain_start" and r.get("reason") == "write_failure"]
    assert failures and "space" in failures[0]["error"].lower()
    assert "AUDIT FAILURE" in (tmp_path / "stderr").read_text()
    # item 9: the failure raised exactly one alert, on the event loop, and nothing recursed
    alerts = receiver.received  # type: ignore[attr-defined]
    assert [a["kind"] for a in alerts] == ["audit_failure"], alerts
    assert "No space left on device" in alerts[0]["text"]
    alert_records = [r for r in records if r.get("event") == "alert"]
    assert len(alert_records) == 1 and alert_records[0]["kind"] == "audit_failure"
