"""Issue 12 item 8 against a real `warden run`: separate liveness and readiness, and a metrics
listener that idle connections cannot exhaust."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from .control_helpers import get_json, wait_until
from .harness import Origin, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_idle_connections_cannot_exhaust_the_metrics_listener(tmp_path: Path, plain_origin: Origin) -> None:
    rules = {"agents": [{"id": "a", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
             "policies": {"p": {"allow": [{"host": "allowed.test", "ports": [plain_origin.port]}]}},
             "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))}}
    w = start_warden(tmp_path, rules)
    idle: list[socket.socket] = []
    try:
        status, live = get_json(w.metrics_port, "/livez")
        assert status == 200 and live["status"] == "ok"
        status, ready = get_json(w.metrics_port, "/readyz")
        assert status == 200 and ready["audit_writable"] is True
        assert get_json(w.metrics_port, "/healthz") == (status, ready)  # kept for existing probes
        before = _threads(w.proc.pid)
        for _ in range(50):  # connect, send nothing
            idle.append(socket.create_connection(("127.0.0.1", w.metrics_port), timeout=5))
        wait_until(lambda: _threads(w.proc.pid) >= before + 16, timeout=3)
        assert _threads(w.proc.pid) <= before + 16 + 2, "one thread per idle connection again"
        # the idle ones time out (3 s); then scrapes are served again
        assert wait_until(lambda: _scrape_ok(w.metrics_port), timeout=10)
        text = w.metrics_text()
        refused = next(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("warden_probe_connections_refused_total"))
        assert refused >= 30
        assert wait_until(lambda: _threads(w.proc.pid) <= before + 1, timeout=10)
    finally:
        for s in idle:
            s.close()
        w.stop()


def _scrape_ok(port: int) -> bool:
    try:
        return get_json(port, "/livez", timeout=2)[0] == 200
    except OSError:
        return False
