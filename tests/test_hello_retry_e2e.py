"""Red team 9: a second ClientHello after a HelloRetryRequest must name the CONNECT host too.

A TLS 1.3 server that supports none of the client's key shares answers the first ClientHello
with a HelloRetryRequest; the client sends a second one, and OpenSSL reads its server_name
again (the SNI callback runs twice: that is where a server picks its virtual host). Warden
checked only the first, so an agent could name an allowed host first and another second.

The origin here is a real OpenSSL server (Python ssl) that supports only P-256, so every
client offering an X25519 key share (OpenSSL's default) gets a HelloRetryRequest, and it
logs every server_name it reads. Both paths: Warden's fast listener and mitmproxy's relay.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from .bypass_helpers import connect_raw, events_after, read_until_closed
from .harness import Warden, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKEN = "tok-retry"


class RetryOrigin:
    """TLS on 127.0.0.1, P-256 only; one `200 ok` per connection; every SNI it read, in order."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ca.issue_cert("allowed.test", "evil.test").configure_cert(self.ctx)
        self.ctx.set_ecdh_curve("prime256v1")  # an X25519 key share gets a HelloRetryRequest
        self.names: list[str | None] = []
        self.ctx.sni_callback = lambda _sock, name, _ctx: self.names.append(name)  # type: ignore[assignment,misc,return-value]
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        with contextlib.suppress(OSError), raw, self.ctx.wrap_socket(raw, server_side=True) as conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


@pytest.fixture(scope="module")
def retry_origin(origin_ca: trustme.CA) -> Iterator[RetryOrigin]:
    origin = RetryOrigin(origin_ca)
    origin.thread.start()
    try:
        yield origin
    finally:
        origin.stopping.set()
        origin.thread.join(5)
        origin.sock.close()


@pytest.fixture(scope="module", params=["fast", "mitmproxy"])
def warden(request: pytest.FixtureRequest, retry_origin: RetryOrigin, origin_ca_file: Path, shared_confdir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warden]:
    work = tmp_path_factory.mktemp(f"retry-{request.param}")
    rules: dict[str, Any] = {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
        "policies": {"p": {"allow": [{"id": "pass", "host": "allowed.test", "ports": [retry_origin.port],
                                      "addresses": ["127.0.0.1/32"]}]}},
        "settings": {"hosts_file": str(hosts_file(work / "hosts", ["allowed.test", "evil.test"]))},
    }
    fast = "true" if request.param == "fast" else "false"
    w = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents={"coder": TOKEN},
                     extra_args=["--set", f"warden_fast_connect={fast}"])
    try:
        yield w
    finally:
        w.stop()


def client_hello(sni: str, curve: str | None = None) -> bytes:
    """A real OpenSSL ClientHello (TLS 1.3 only); X25519 key share unless `curve`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if curve:
        ctx.set_ecdh_curve(curve)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def fronting_hellos() -> tuple[bytes, bytes]:
    """CH1 naming allowed.test (X25519 share: the origin asks again), CH2 naming evil.test with
    a P-256 share and CH1's legacy_session_id, which OpenSSL requires of a second hello."""
    first = client_hello("allowed.test")
    second = bytearray(client_hello("evil.test", "prime256v1"))
    at = 5 + 4 + 2 + 32
    second[at:at + 1 + second[at]] = first[at:at + 1 + first[at]]
    body = len(second) - 5
    second[3:5] = body.to_bytes(2, "big")
    second[6:9] = (body - 4).to_bytes(3, "big")
    return first, bytes(second)


def tunnel_close(w: Warden, count: int) -> dict[str, Any]:
    closes = events_after(w, count, "tunnel_close")
    assert len(closes) == 1, w.audit_records()[count:]
    return closes[0]


def test_a_real_hello_retry_passes_and_is_relayed(warden: Warden, retry_origin: RetryOrigin) -> None:
    before = len(warden.audit_records())
    retry_origin.names.clear()
    sock, status, _ = connect_raw(warden, "coder", f"allowed.test:{retry_origin.port}")
    assert status == 200
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with ctx.wrap_socket(sock, server_hostname="allowed.test") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        answer = read_until_closed(tls)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
    assert retry_origin.names == ["allowed.test", "allowed.test"]  # two ClientHellos: the retry happened
    record = tunnel_close(warden, before)
    assert "error" not in record and record["bytes_down"] > 0


@pytest.mark.parametrize("timing", ["pipelined", "after_the_retry_request"])
def test_a_second_hello_naming_another_host_closes_the_tunnel(warden: Warden, retry_origin: RetryOrigin,
                                                                timing: str) -> None:
    before = len(warden.audit_records())
    retry_origin.names.clear()
    first, second = fronting_hellos()
    sock, status, _ = connect_raw(warden, "coder", f"allowed.test:{retry_origin.port}")
    assert status == 200
    with sock:
        if timing == "pipelined":
            sock.sendall(first + second)
        else:
            sock.sendall(first)
            sock.settimeout(5)
            retry = sock.recv(65536)
            assert retry[:1] == b"\x16" and bytes.fromhex("cf21ad74e59a6111") in retry  # the HelloRetryRequest
            with contextlib.suppress(OSError):
                sock.sendall(second)
        read_until_closed(sock)
    record = tunnel_close(warden, before)
    assert "names another host" in record.get("error", ""), record
    assert "evil.test" not in retry_origin.names, retry_origin.names  # the origin never read it
    assert retry_origin.names == ["allowed.test"]
