"""Issue 12 items 3, 4 and 9 against a real `warden run`: alert sinks that never die, one alert
per event, dedup by destination, readable text, and no re-entrancy when the audit log fails."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from .control_helpers import proxied_get, wait_until
from .harness import Origin, hosts_file, run_origin, sha256_hex, start_warden
from .mcp_server_fixture import batch_handler

pytestmark = pytest.mark.e2e
TOKEN = "alerts-token-77"
URL_SECRET = "url-secret-q9"
HEADER_SECRET = "header-secret-z8"


class _Receiver(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.received.append(json.loads(body))
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


class _BrokenSink:
    """Accepts a connection, reads the request, answers with a malformed status line."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(65536)
                    conn.sendall(b"BOGUS\r\n\r\n")
                except OSError:
                    pass
            self.connections += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def _rules(plain: Origin, tmp_path: Path, alerts: list[dict], extra_allow: list[dict] | None = None) -> dict:
    return {"agents": [{"id": "a", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
            "policies": {"p": {"allow": [{"host": "allowed.test", "ports": [plain.port]},
                                         {"cidr": "127.0.0.1/32", "ports": [plain.port]}, *(extra_allow or [])]}},
            "deny": [{"id": "no-denied", "host": "denied.test"}, {"id": "no-other", "host": "other.test"},
                     {"id": "no-front", "host": "front.test"}],
            "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts")), "alerts": alerts}}


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_malformed_sink_reply_never_kills_the_sink(tmp_path: Path, plain_origin: Origin,
                                                   receiver: ThreadingHTTPServer) -> None:
    broken = _BrokenSink()
    good_url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    alerts = [{"id": "broken", "url": f"http://127.0.0.1:{broken.port}/hook?token={URL_SECRET}",
               "headers": {"Authorization": "Bearer ${secret:HOOK}"}, "events": ["deny"], "max_retries": 0,
               "timeout_seconds": 2},
              {"id": "good", "url": good_url, "events": ["deny"]}]
    w = start_warden(tmp_path, _rules(plain_origin, tmp_path, alerts), env={"HOOK": HEADER_SECRET},
                     agents={"a": TOKEN})
    try:
        for host in ("denied.test", "other.test", "front.test"):  # three distinct events
            assert proxied_get(w, "a", f"http://{host}:{plain_origin.port}/").status_code == 403
            time.sleep(0)  # (ordering only)
        assert wait_until(lambda: len(receiver.received) >= 3)  # type: ignore[attr-defined]
        assert wait_until(lambda: _metric(w.metrics_text(), 'warden_alerts_failed_total{sink="broken"}') >= 3)
        assert broken.connections >= 3, "the sink thread died after the first malformed reply"
        records = w.audit_records(lambda rs: sum(r.get("event") == "alert_failed" for r in rs) >= 3)
        failed = [r for r in records if r.get("event") == "alert_failed"]
        assert len(failed) == 3 and all(r["sink"] == "broken" and r["error"] for r in failed), failed
        assert "broken" in w.stderr_path.read_text() and "BadStatusLine" in w.stderr_path.read_text()
    finally:
        w.stop()
        broken.close()
    everything = w.audit_path.read_text() + w.output()
    assert URL_SECRET not in everything and HEADER_SECRET not in everything


def test_one_alert_per_event_dedup_by_destination_and_readable_text(
        tmp_path: Path, plain_origin: Origin, origin_ca, origin_ca_file: Path, shared_confdir: Path,
        receiver: ThreadingHTTPServer) -> None:
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    with run_origin(batch_handler, ca=origin_ca) as mcp:
        alerts = [{"id": "hook", "url": url, "events": ["deny", "mcp_deny", "reload_failed"]}]
        rules = _rules(plain_origin, tmp_path, alerts, extra_allow=[{"host": "mcp.test", "ports": [mcp.port]},
                                                                     {"cidr": "127.0.0.1/32", "ports": [mcp.port]}])
        rules["policies"]["p"]["mcp"] = [{"server": "rpc", "tools": ["get_weather"]}]
        rules["mcp_servers"] = [{"id": "rpc", "url": f"https://mcp.test:{mcp.port}/rpc"}]
        w = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents={"a": TOKEN})
        received = receiver.received  # type: ignore[attr-defined]
        try:
            for host in ("denied.test", "other.test", "denied.test", "other.test"):
                assert proxied_get(w, "a", f"http://{host}:{plain_origin.port}/").status_code == 403
            assert wait_until(lambda: len(received) >= 2)
            # one MCP denial: exactly one alert, of kind mcp_deny, naming server and tool
            call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_all", "arguments": {}}}
            with requests.Session() as s:
                s.trust_env = False
                r = s.post(f"https://mcp.test:{mcp.port}/rpc", json=call, verify=str(w.ca_cert),
                           proxies={"https": w.proxy_url("a")}, timeout=15,
                           headers={"Accept": "application/json, text/event-stream"})
            assert r.status_code == 200 and r.json()["result"]["isError"] is True
            assert wait_until(lambda: any(a["kind"] == "mcp_deny" for a in received))
            # item 8: the MCP stage's engine time is recorded (it was documented but never observed)
            assert _metric(w.metrics_text(), 'warden_decision_duration_seconds_count{stage="mcp"}') >= 1
            # a broken rule change: reload_failed says what failed and where
            (w.rules_dir / "broken.yaml").write_text("policies:\n  q:\n    allow:\n      - host: '*.com'\n")
            assert wait_until(lambda: any(a["kind"] == "reload_failed" for a in received), timeout=10)
            w.audit_records(lambda rs: sum(x.get("event") == "alert" for x in rs) >= 4)
        finally:
            w.stop()
    kinds = [a["kind"] for a in received]
    assert kinds.count("deny") == 2, kinds  # two destinations, each once (the repeats deduplicated)
    assert {a["record"]["host"] for a in received if a["kind"] == "deny"} == {"denied.test", "other.test"}
    assert kinds.count("mcp_deny") == 1 and "deny" not in kinds[2:3], kinds
    mcp_alert = next(a for a in received if a["kind"] == "mcp_deny")
    assert "MCP rpc tools/call delete_all" in mcp_alert["text"], mcp_alert["text"]
    reload_alert = next(a for a in received if a["kind"] == "reload_failed")
    assert "broken.yaml:4" in reload_alert["text"] and "unauthenticated" not in reload_alert["text"], \
        reload_alert["text"]
