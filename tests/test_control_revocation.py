"""Issue 12 item 10: a reload re-decides open passthrough tunnels and cuts the denied ones."""

from __future__ import annotations

import base64
import contextlib
import copy
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from .bypass_helpers import WsClient, open_tunnel, run_ws_origin
from .control_helpers import reload_rules, wait_until
from .harness import Origin, Warden, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKENS = {"gone": "gone-token-1", "stays": "stays-token-2", "icpt": "icpt-token-3"}


class Tunnel:
    """A CONNECT tunnel through Warden with TLS to the origin inside (passthrough)."""

    def __init__(self, w: Warden, agent: str, host: str, port: int, ca_file: Path) -> None:
        raw = socket.create_connection(("127.0.0.1", w.port), timeout=10)
        auth = base64.b64encode(f"{agent}:{TOKENS[agent]}".encode()).decode()
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            assert chunk, "proxy closed the CONNECT"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(ca_file))
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.host, self.port = host, port

    def get(self) -> int:
        self.sock.sendall(f"GET /x HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += self.sock.recv(65536)
        return int(head.split()[1])

    def closed(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except (OSError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def test_reload_cuts_the_tunnels_it_denies(tmp_path: Path, tls_origin: Origin, origin_ca_file: Path,
                                           shared_confdir: Path) -> None:
    port = tls_origin.port
    allow = [{"host": "allowed.test", "ports": [port]}, {"cidr": "127.0.0.1/32", "ports": [port]}]
    rules = {"agents": [{"id": a, "token_sha256": [sha256_hex(t)], "policies": [a]} for a, t in TOKENS.items()],
             "policies": {"gone": {"allow": allow}, "stays": {"allow": allow},
                          "icpt": {"allow": [{"host": "api.test", "ports": [port], "paths": ["/**"]},
                                             {"cidr": "127.0.0.1/32", "ports": [port]}]}},
             "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))}}
    w = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents=TOKENS)
    doomed = Tunnel(w, "gone", "allowed.test", port, origin_ca_file)
    kept = Tunnel(w, "stays", "allowed.test", port, origin_ca_file)
    session = requests.Session()
    session.trust_env = False
    try:
        assert doomed.get() == 200 and kept.get() == 200
        intercepted = session.get(f"https://api.test:{port}/x", proxies={"https": w.proxy_url("icpt")},
                                  verify=str(w.ca_cert), timeout=10)
        assert intercepted.status_code == 200
        rules["agents"] = [a for a in rules["agents"] if a["id"] == "stays"]
        del rules["policies"]["gone"], rules["policies"]["icpt"]
        started = time.monotonic()
        w.write_rules(rules)
        assert wait_until(doomed.closed, timeout=10), "the revoked agent's tunnel stayed open"
        took = time.monotonic() - started
        assert took < 3.0, took
        assert kept.get() == 200  # still allowed: untouched
        refused = session.get(f"https://api.test:{port}/x", proxies={"https": w.proxy_url("icpt")},
                              verify=str(w.ca_cert), timeout=10)
        assert refused.status_code in (403, 407)  # the intercepted tunnel refuses its next request
        records = w.audit_records(lambda rs: any(r.get("event") == "tunnel_revoked" for r in rs)
                                  and any(r.get("event") == "tunnel_close" and r.get("agent") == "gone" for r in rs))
        revoked = [r for r in records if r.get("event") == "tunnel_revoked"]
        assert len(revoked) == 1, revoked
        assert revoked[0]["agent"] == "gone" and revoked[0]["host"] == "allowed.test"
        assert revoked[0]["decision"] == "deny" and revoked[0]["reason"] == "auth_failed"
        assert revoked[0]["revocation"] == "denied" and revoked[0]["policy_version"] != records[0].get("policy_version")
        reload_seq = next(r["seq"] for r in records if r.get("event") == "reload")
        assert revoked[0]["seq"] > reload_seq
        assert 'warden_tunnels_revoked_total{agent="gone",reason="auth_failed"} 1.0' in w.metrics_text()
    finally:
        doomed.close()
        kept.close()
        session.close()
        w.stop()


# -- live flows: open WebSockets and streaming uploads ----------------------------------------
LIVE_TOKEN = "live-token-0123456789"


class _CountingOrigin:
    """A plain-HTTP origin that reads a request and counts the bytes that reach it (60 s bound)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.received = b""
        self.closed = threading.Event()
        self.stopping = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(0.2)
            with conn:
                while not self.stopping.is_set() and time.monotonic() < deadline:
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        break
                    if not chunk:
                        break
                    self.received += chunk
            self.closed.set()

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()


def _live_rules(work: Path, ws_port: int, up_port: int) -> dict[str, Any]:
    loopback = ["127.0.0.1/32"]
    return {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex(LIVE_TOKEN)], "policies": ["p"]}],
        "policies": {"p": {"allow": [
            {"id": "ws-ok", "host": "api.test", "ports": [ws_port], "paths": ["/ok/**"], "addresses": loopback,
             "websocket": True},
            {"id": "up", "host": "upload.test", "ports": [up_port], "addresses": loopback},
            {"id": "unrelated", "host": "other.test", "ports": [443], "addresses": loopback},
        ]}},
        "settings": {"hosts_file": str(hosts_file(work / "hosts", ["api.test", "upload.test", "other.test"]))},
    }


@pytest.fixture
def live(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ca = trustme.CA()
    ca_file = tmp_path / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    upload = _CountingOrigin()
    try:
        with run_ws_origin(ca, "not-a-secret-0000") as ws:
            rules = _live_rules(tmp_path, ws.port, upload.port)
            warden = start_warden(tmp_path, rules, upstream_ca=ca_file, agents={"coder": LIVE_TOKEN})
            try:
                yield {"warden": warden, "ws": ws, "upload": upload, "rules": rules}
            finally:
                warden.stop()
    finally:
        upload.stop()


def _open_ws(warden: Warden, ws: Any) -> WsClient:
    from wsproto.events import AcceptConnection, TextMessage

    client = WsClient(open_tunnel(warden, "coder", "api.test", ws.port), f"api.test:{ws.port}", target="/ok/ws")
    assert any(isinstance(e, AcceptConnection)
               for e in client.events(lambda p: any(isinstance(e, AcceptConnection) for e in p)))
    client.send(TextMessage(data="before-reload"))
    assert wait_until(lambda: "before-reload" in ws.messages)
    return client


def _ws_closed(client: WsClient) -> bool:
    client.sock.settimeout(0.05)
    try:
        return client.sock.recv(65536) == b""
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


def _assert_ws_cut(warden: Warden, ws: Any, client: WsClient, reason: str) -> None:
    from wsproto.events import TextMessage

    assert wait_until(lambda: _ws_closed(client), timeout=10), "the WebSocket stayed open after the reload"
    with contextlib.suppress(OSError):
        client.send(TextMessage(data="after-the-cut"))
    client.sock.close()
    assert wait_until(lambda: any(r.get("event") == "websocket_close" for r in warden.audit_records()), timeout=10)
    records = warden.audit_records()
    assert "after-the-cut" not in ws.messages
    revoked = [r for r in records if r.get("event") == "tunnel_revoked"]
    assert len(revoked) == 1, revoked
    assert revoked[0]["decision"] == "deny" and revoked[0]["reason"] == reason
    assert revoked[0]["revocation"] == "denied" and revoked[0]["host"] == "api.test"
    assert revoked[0]["revoke_ms"] < 1000, revoked[0]
    closed = next(r for r in records if r.get("event") == "websocket_close")
    assert closed["decision"] == "deny" and closed["reason"] == reason and closed["revocation"] == "denied", closed
    assert 'warden_tunnels_revoked_total{agent="coder",reason="' + reason + '"} 1.0' in warden.metrics_text()


def test_open_websocket_is_cut_when_a_reload_refuses_its_host(live: dict[str, Any]) -> None:
    warden, ws, rules = live["warden"], live["ws"], live["rules"]
    client = _open_ws(warden, ws)
    refused = copy.deepcopy(rules)
    refused["policies"]["p"]["allow"] = [a for a in refused["policies"]["p"]["allow"] if a["id"] != "ws-ok"]
    reload_rules(warden, refused)
    _assert_ws_cut(warden, ws, client, "no_matching_rule")


def test_open_websocket_is_cut_when_a_reload_removes_its_agent(live: dict[str, Any]) -> None:
    warden, ws, rules = live["warden"], live["ws"], live["rules"]
    client = _open_ws(warden, ws)
    gone = copy.deepcopy(rules)
    gone["agents"] = [{"id": "someone-else", "token_sha256": [sha256_hex("x" * 20)], "policies": ["p"]}]
    reload_rules(warden, gone)
    _assert_ws_cut(warden, ws, client, "auth_failed")


def test_open_websocket_survives_an_unrelated_reload(live: dict[str, Any]) -> None:
    from wsproto.events import TextMessage

    warden, ws, rules = live["warden"], live["ws"], live["rules"]
    client = _open_ws(warden, ws)
    unrelated = copy.deepcopy(rules)
    unrelated["policies"]["p"]["allow"] = [a for a in unrelated["policies"]["p"]["allow"] if a["id"] != "unrelated"]
    reload_rules(warden, unrelated)
    client.send(TextMessage(data="after-unrelated-reload"))
    assert wait_until(lambda: "after-unrelated-reload" in ws.messages), "an allowed WebSocket was disturbed"
    client.sock.close()
    assert wait_until(lambda: any(r.get("event") == "websocket_close" for r in warden.audit_records()), timeout=10)
    records = warden.audit_records()
    assert not any(r.get("event") == "tunnel_revoked" for r in records)
    closed = next(r for r in records if r.get("event") == "websocket_close")
    assert closed["decision"] == "allow" and "revocation" not in closed


def test_streaming_upload_is_cut_when_a_reload_refuses_its_host(live: dict[str, Any]) -> None:
    warden, upload, rules = live["warden"], live["upload"], live["rules"]
    sock = socket.create_connection(("127.0.0.1", warden.port), timeout=10)
    auth = base64.b64encode(f"coder:{LIVE_TOKEN}".encode()).decode()
    sock.sendall(f"POST http://upload.test:{upload.port}/up HTTP/1.1\r\nHost: upload.test:{upload.port}\r\n"
                 f"Proxy-Authorization: Basic {auth}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    sock.sendall(b"5\r\nfirst\r\n")
    assert wait_until(lambda: b"first" in upload.received), "the upload did not start streaming"
    refused = copy.deepcopy(rules)
    refused["policies"]["p"]["allow"] = [a for a in refused["policies"]["p"]["allow"] if a["id"] != "up"]
    reload_rules(warden, refused)
    assert wait_until(lambda: any(r.get("event") == "tunnel_revoked" for r in warden.audit_records()), timeout=10)
    with contextlib.suppress(OSError):
        sock.sendall(b"5\r\nlater\r\n0\r\n\r\n")
    assert upload.closed.wait(10), "the origin's connection stayed open after the cut"
    sock.close()
    assert b"later" not in upload.received
    assert wait_until(lambda: any(r.get("event") == "request" for r in warden.audit_records()), timeout=10)
    records = warden.audit_records()
    revoked = [r for r in records if r.get("event") == "tunnel_revoked"]
    assert len(revoked) == 1 and revoked[0]["reason"] == "no_matching_rule" and revoked[0]["method"] == "POST"
    request = next(r for r in records if r.get("event") == "request")
    assert request["decision"] == "deny" and request["revocation"] == "denied", request
