"""Issue 12 item 2: the `--workers` supervisor survives operator signals, SIGHUP reloads every
worker, and no worker outlives its supervisor."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from .control_helpers import get_json, proxied_get, wait_until
from .harness import Origin, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKEN = "workers-signal-token"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_supervisor_survives_signals_reloads_workers_and_takes_them_down(tmp_path: Path,
                                                                         plain_origin: Origin) -> None:
    rules = {"agents": [{"id": "w", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
             "policies": {"p": {"allow": [{"host": "allowed.test", "ports": [plain_origin.port]},
                                          {"cidr": "127.0.0.1/32", "ports": [plain_origin.port]}]}},
             "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))}}
    w = start_warden(tmp_path, rules, extra_args=["--workers", "2"], agents={"w": TOKEN})
    worker_pids: list[int] = []
    try:
        ready = wait_until(lambda: get_json(w.metrics_port, "/readyz")[0] == 200, timeout=40)
        assert ready, get_json(w.metrics_port, "/readyz")
        status, report = get_json(w.metrics_port, "/readyz")
        worker_pids = [r["pid"] for r in report["workers"]]
        assert len(worker_pids) == 2 and report["policy_version"], report  # workers agree on the version
        assert get_json(w.metrics_port, "/livez")[0] == 200

        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE, signal.SIGHUP):
            w.proc.send_signal(sig)
        audits = [tmp_path / "audit.w0.jsonl", tmp_path / "audit.w1.jsonl"]

        def every_worker_reloaded() -> bool:
            return all(any(r.get("event") == "reload" and r.get("trigger") == "signal" for r in _records(a))
                       for a in audits)

        assert wait_until(every_worker_reloaded, timeout=15), [_records(a)[-3:] for a in audits]
        assert w.proc.poll() is None, w.output()
        assert all(_alive(pid) for pid in worker_pids)
        url = f"http://allowed.test:{plain_origin.port}/"
        assert proxied_get(w, "w", url).status_code == 200
        assert get_json(w.metrics_port, "/readyz")[1]["workers"][0]["pid"] == worker_pids[0]  # no restarts

        # the supervisor dies hard: its workers must not keep serving
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait(10)
        assert wait_until(lambda: not any(_alive(pid) for pid in worker_pids), timeout=20), \
            "workers outlived their supervisor"
    finally:
        w.stop()
        for pid in worker_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_workers_share_stdout_as_whole_audit_lines(tmp_path: Path, plain_origin: Origin) -> None:
    import subprocess

    import requests

    from .harness import WARDEN

    rules = {"agents": [{"id": "w", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
             "policies": {"p": {"allow": [{"host": "allowed.test", "ports": [plain_origin.port]},
                                          {"cidr": "127.0.0.1/32", "ports": [plain_origin.port]}]}},
             "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))}}
    w = start_warden(tmp_path, rules, extra_args=["--workers", "2"], audit_log="-", agents={"w": TOKEN})
    try:
        assert wait_until(lambda: get_json(w.metrics_port, "/readyz")[0] == 200, timeout=40)
        for _ in range(30):  # new connections: both workers serve some
            with requests.Session() as s:
                s.trust_env = False
                assert s.get(f"http://allowed.test:{plain_origin.port}/", timeout=10,
                             proxies={"http": w.proxy_url("w")}).status_code == 200
    finally:
        w.stop()
    out = w.stdout_path.read_bytes()
    records = [json.loads(line) for line in out.splitlines()]  # whole JSON lines only
    assert sum(r["event"] == "chain_start" for r in records) == 2
    assert sum(r["event"] == "request" for r in records) == 30
    result = subprocess.run([WARDEN, "audit", "verify", "-"], input=out, capture_output=True, timeout=60)
    assert result.returncode == 0 and b"2 interleaved chains" in result.stdout, result.stdout
