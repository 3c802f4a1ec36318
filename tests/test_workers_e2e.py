"""`warden run --workers 2`: one port, two processes, merged metrics, one audit chain per worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import requests
from egresswarden.record.journal import verify_chain
from prometheus_client.parser import text_string_to_metric_families

from .bypass_helpers import wait_until
from .harness import Origin, Warden, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKEN = "workers-token"


def _requests_total(text: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "warden_requests":
            total += sum(s.value for s in family.samples if s.name == "warden_requests_total")
    return total


def _sample(text: str, name: str) -> float:
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


def _health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:  # 503 while a worker starts: the body still reports
        with e:
            return json.loads(e.read())


def _start_two_workers(tmp_path: Path, plain_origin: Origin) -> Warden:
    hosts = hosts_file(tmp_path / "hosts")
    rules = {"agents": [{"id": "w", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
             "policies": {"p": {"allow": [{"host": "allowed.test", "ports": [plain_origin.port]},
                                          {"cidr": "127.0.0.1/32", "ports": [plain_origin.port]}]}},
             "settings": {"hosts_file": str(hosts)}}
    return start_warden(tmp_path, rules, extra_args=["--workers", "2"], agents={"w": TOKEN})


def test_two_workers_share_a_port(tmp_path: Path, plain_origin: Origin) -> None:
    w = _start_two_workers(tmp_path, plain_origin)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _health(w.metrics_port).get("status") != "ok":
            time.sleep(0.2)
        health = _health(w.metrics_port)
        assert health["status"] == "ok" and len(health["workers"]) == 2
        n = 40
        for i in range(n):  # a new connection each time, so SO_REUSEPORT spreads them
            with requests.Session() as s:
                s.trust_env = False
                r = s.get(f"http://allowed.test:{plain_origin.port}/{i}", proxies={"http": w.proxy_url("w")},
                          headers={"Connection": "close"}, timeout=10)
                assert r.status_code == 200
        assert _requests_total(w.metrics_text()) == n
        assert [wk["worker"] for wk in health["workers"]] == [0, 1]
        # Gauges sampled per worker reach the merged page too (red team 18: they read 0): two
        # connections held open, each worker's share of the limit summed.
        with socket.create_connection(("127.0.0.1", w.port)), socket.create_connection(("127.0.0.1", w.port)):
            assert wait_until(lambda: _sample(w.metrics_text(), "warden_client_connections") == 2, 10)
            assert _sample(w.metrics_text(), "warden_max_connections") > 2 * 64
    finally:
        w.stop()
    files = [tmp_path / "audit.w0.jsonl", tmp_path / "audit.w1.jsonl"]
    counts = []
    for f in files:
        assert verify_chain([f]).ok
        counts.append(sum(1 for line in f.read_text().splitlines() if json.loads(line)["event"] == "request"))
    assert sum(counts) == n and all(c > 0 for c in counts), counts


def test_worker_crash_is_restarted(tmp_path: Path, plain_origin: Origin) -> None:
    w = _start_two_workers(tmp_path, plain_origin)
    try:
        children = [int(p) for p in Path(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children").read_text().split()]
        assert len(children) == 2
        os.kill(children[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        restarted = False
        while time.monotonic() < deadline:
            now = [int(p) for p in Path(f"/proc/{w.proc.pid}/task/{w.proc.pid}/children").read_text().split()]
            if len(now) == 2 and children[0] not in now and _health(w.metrics_port).get("status") == "ok":
                restarted = True
                break
            time.sleep(0.2)
        assert restarted
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(f"http://allowed.test:{plain_origin.port}/after", proxies={"http": w.proxy_url("w")}, timeout=10)
            assert r.status_code == 200
    finally:
        w.stop()
