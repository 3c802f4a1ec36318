"""Audit, metrics and alerts against a real `warden run`: nothing lost, nothing blocked, nothing leaked."""

from __future__ import annotations

import json
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from egresswarden.record.journal import verify_chain

from .bypass_helpers import proxy_auth
from .harness import Origin, Warden, free_port, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKEN = "obs-token-0123456789"


class _Receiver(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append({"headers": dict(self.headers.items()), "body": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def base_rules(plain: Origin, hosts: Path, **settings: Any) -> dict:
    return {
        "agents": [{"id": "obs", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
        "policies": {"p": {"allow": [{"id": "plain", "host": "allowed.test", "ports": [plain.port]},
                                     {"id": "lo", "cidr": "127.0.0.1/32", "ports": [plain.port]}]}},
        "deny": [{"id": "no-denied", "host": "denied.test"}],
        "settings": {"hosts_file": str(hosts), "explain_denials": "status", **settings},
    }


def get(w: Warden, url: str, token: str = TOKEN, session: requests.Session | None = None) -> requests.Response:
    if session is None:
        with requests.Session() as s:
            s.trust_env = False
            return s.get(url, proxies={"http": w.proxy_url("obs", token)}, timeout=15)
    return session.get(url, proxies={"http": w.proxy_url("obs", token)}, timeout=15)


def wait_until(predicate, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def sample(metrics: str, series: str) -> float:
    """The value of one series on a /metrics page (0 if absent)."""
    m = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_alert_reaches_webhook_and_duplicates_are_suppressed(tmp_path: Path, plain_origin: Origin,
                                                             receiver: ThreadingHTTPServer) -> None:
    hosts = hosts_file(tmp_path / "hosts")
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    rules = base_rules(plain_origin, hosts, alerts=[{"id": "hook", "url": url, "events": ["deny", "auth_failure"],
                                                     "headers": {"Authorization": "Bearer ${secret:HOOK_TOKEN}"}}])
    w = start_warden(tmp_path, rules, env={"HOOK_TOKEN": "hook-secret-value-42"})
    try:
        with requests.Session() as s:
            s.trust_env = False
            for _ in range(5):
                assert get(w, f"http://denied.test:{plain_origin.port}/x", session=s).status_code == 403
        sent, suppressed = 'warden_alerts_sent_total{sink="hook"}', 'warden_alerts_suppressed_total{cause="dedup"}'

        def all_five_accounted_for() -> bool:  # each denial is either sent (after delivery) or suppressed
            metrics = w.metrics_text()
            return sample(metrics, sent) + sample(metrics, suppressed) >= 5

        assert wait_until(all_five_accounted_for), w.metrics_text()
        received = receiver.received  # type: ignore[attr-defined]
        assert len(received) == 1, "five identical denials within the window must give one alert"
        alert = received[0]
        assert alert["headers"]["Authorization"] == "Bearer hook-secret-value-42"
        assert alert["body"]["kind"] == "deny" and alert["body"]["record"]["rule_id"] == "no-denied"
        assert "obs" in alert["body"]["text"] and "deny_listed" in alert["body"]["text"]
        metrics = w.metrics_text()
        assert (sample(metrics, sent), sample(metrics, suppressed)) == (1, 4)
        records = w.audit_records(lambda rs: any(r.get("event") == "alert" for r in rs))
        assert any(r.get("event") == "alert" and r["kind"] == "deny" for r in records)
    finally:
        w.stop()
    assert "hook-secret-value-42" not in w.audit_path.read_text() + w.output()
    assert TOKEN not in w.audit_path.read_text() + w.output()


def _latencies(w: Warden, url: str, n: int) -> list[float]:
    out = []
    with requests.Session() as s:
        s.trust_env = False
        for _ in range(n):
            started = time.perf_counter()
            assert get(w, url, session=s).status_code == 403
            out.append(time.perf_counter() - started)
    return out


def test_dead_webhook_slows_nothing(tmp_path: Path, plain_origin: Origin) -> None:
    """Two Wardens side by side, one alerting into a black hole (accepts, never answers)."""
    import socket

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(100)
    hosts = hosts_file(tmp_path / "hosts")
    dead = [{"id": "dead", "url": f"http://127.0.0.1:{hole.getsockname()[1]}/", "timeout_seconds": 5,
             "dedup_window_seconds": 0, "max_per_minute": 10000}]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with_dead = start_warden(tmp_path / "a", base_rules(plain_origin, hosts, alerts=dead))
    without = start_warden(tmp_path / "b", base_rules(plain_origin, hosts))
    try:
        url = f"http://denied.test:{plain_origin.port}/x"
        a, b = [], []
        for _ in range(3):  # alternate, so machine noise hits both
            a += _latencies(with_dead, url, 10)
            b += _latencies(without, url, 10)
        med_a, med_b = statistics.median(a), statistics.median(b)
        # A blocking alert would add the 5 s sink timeout; allow generous noise on top of the baseline.
        assert med_a < max(3 * med_b, med_b + 0.05), (med_a, med_b)
        assert max(a) < 2.0
    finally:
        with_dead.stop()
        without.stop()
        hole.close()


def test_audit_write_failure_fails_closed(tmp_path: Path, plain_origin: Origin) -> None:
    hosts = hosts_file(tmp_path / "hosts")
    w = start_warden(tmp_path, base_rules(plain_origin, hosts), audit_log="/dev/full")  # every write: ENOSPC
    try:
        assert wait_until(lambda: "AUDIT FAILURE" in w.output())
        r = get(w, f"http://allowed.test:{plain_origin.port}/x")
        assert r.status_code == 503 and "audit_unavailable" in r.text
        assert not plain_origin.seen, "traffic must not pass while it cannot be recorded"
        assert "warden_audit_healthy 0.0" in w.metrics_text()
        import urllib.error
        import urllib.request
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/healthz", timeout=5)
        assert health.value.code == 503
        assert json.loads(health.value.read())["audit_writable"] is False
        health.value.close()
    finally:
        w.stop()


def test_audit_failure_can_opt_out(tmp_path: Path, plain_origin: Origin) -> None:
    hosts = hosts_file(tmp_path / "hosts")
    w = start_warden(tmp_path, base_rules(plain_origin, hosts, audit={"on_failure": "continue"}),
                     audit_log="/dev/full")
    try:
        assert wait_until(lambda: "AUDIT FAILURE" in w.output())
        assert get(w, f"http://allowed.test:{plain_origin.port}/x").status_code == 200
    finally:
        w.stop()


def test_rotation_loses_no_record_under_10000_requests(tmp_path: Path, plain_origin: Origin) -> None:
    hosts = hosts_file(tmp_path / "hosts")
    w = start_warden(tmp_path, base_rules(plain_origin, hosts, audit={"max_file_bytes": 256 * 1024}))
    total, workers = 10000, 8
    errors: list[str] = []

    def drive(n: int) -> None:
        with requests.Session() as s:
            s.trust_env = False
            for _ in range(n):
                try:
                    if get(w, f"http://allowed.test:{plain_origin.port}/r", session=s).status_code != 200:
                        errors.append("status")
                except requests.RequestException as e:
                    errors.append(e.__class__.__name__)

    try:
        threads = [threading.Thread(target=drive, args=(total // workers,)) for _ in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    finally:
        w.stop()  # flushes the queue
    assert not errors
    rotated = sorted(tmp_path.glob("audit.jsonl.*"))
    assert len(rotated) >= 2, "expected several rotations"
    files = [*rotated, w.audit_path]
    result = verify_chain(files)
    assert result.ok, result
    requests_logged = sum(1 for f in files for line in f.read_text().splitlines()
                          if json.loads(line).get("event") == "request")
    assert requests_logged == total
    assert sum(1 for line in w.audit_path.read_text().splitlines() if '"event":"shutdown"' in line) == 1


def test_metrics_registered_once_across_addon_instances() -> None:
    """A second chain in the same process (mitmproxy script reload) must not raise duplicate timeseries."""
    from egresswarden.record.metrics import Metrics
    from egresswarden.runtime.chain import build_chain

    (first, _), (second, _) = build_chain(), build_chain()  # would raise "Duplicated timeseries" if re-registered
    m1 = next(a for a in first if isinstance(a, Metrics))
    m2 = next(a for a in second if isinstance(a, Metrics))
    assert m1 is not m2 and m1.metrics is m2.metrics


def test_healthz_reports_rules_and_audit(tmp_path: Path, plain_origin: Origin) -> None:
    import urllib.request

    hosts = hosts_file(tmp_path / "hosts")
    w = start_warden(tmp_path, base_rules(plain_origin, hosts))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{w.metrics_port}/healthz", timeout=5) as r:
            report = json.loads(r.read())
        assert report == {"status": "ok", "rules_loaded": 3, "policy_version": report["policy_version"],
                          "audit_writable": True}
    finally:
        w.stop()




def test_an_allowed_connect_whose_upstream_is_down_records_why(tmp_path: Path, plain_origin: Origin) -> None:
    """CONNECT allowed, nothing listening: mitmproxy answers 502 itself; the connect record
    still says why, like the request record of a plain-HTTP request to the same place."""
    dead = free_port()  # nothing listens here
    rules = base_rules(plain_origin, hosts_file(tmp_path / "hosts"))
    rules["policies"]["p"]["allow"].append({"id": "dead", "cidr": "127.0.0.1/32", "ports": [dead]})
    w = start_warden(tmp_path, rules, agents={"obs": TOKEN})
    try:
        with socket.create_connection(("127.0.0.1", w.port), timeout=10) as sock:
            sock.sendall(f"CONNECT 127.0.0.1:{dead} HTTP/1.1\r\nHost: 127.0.0.1:{dead}\r\n"
                         f"Proxy-Authorization: {proxy_auth('obs', TOKEN)}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 502")
        assert get(w, f"http://127.0.0.1:{dead}/x").status_code == 502
        records = w.audit_records(lambda rs: sum(r.get("port") == dead for r in rs) >= 2)
    finally:
        w.stop()
    by_event = {r["event"]: r for r in records if r.get("port") == dead}
    assert by_event["connect"]["status"] == 502 and by_event["connect"]["decision"] == "allow"
    for event in ("connect", "request"):
        assert "Connect call failed" in by_event[event]["error"], by_event[event]
