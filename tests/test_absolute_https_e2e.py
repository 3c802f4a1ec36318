"""End to end: a plain proxy request for an https:// URL (absolute-form, no CONNECT).

Policy pins the request to the checked address; mitmproxy then took that address as the
upstream SNI and verified the certificate against the IP (red team 22): every certificate
without an IP SAN failed (502), and one with an IP SAN passed whatever names it had. The
upstream is now verified for the name the policy checked, and one connection's TLS, which
mitmproxy reuses by address, carries requests for that one name only.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trustme

from .bypass_helpers import Response, proxy_auth, read_response
from .harness import Warden, _OriginServer, echo_handler, hosts_file, sha256_hex, start_warden


@contextmanager
def origin(ca: trustme.CA, *names: str) -> Iterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    server = _OriginServer(echo_handler, ctx)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def warden(tmp: Path, ca: trustme.CA, port: int) -> Iterator[Warden]:
    ca_file = tmp / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    rules = {"agents": [{"id": "a1", "token_sha256": [sha256_hex("tok-a1")], "policies": ["p"]}],
             "policies": {"p": {"allow": [{"host": name, "ports": [port], "addresses": ["127.0.0.1/32"]}
                                          for name in ("allowed.test", "api.test")]}},
             "settings": {"hosts_file": str(hosts_file(tmp / "hosts"))}}
    w = start_warden(tmp, rules, upstream_ca=ca_file, agents={"a1": "tok-a1"})
    try:
        yield w
    finally:
        w.stop()


def _get(sock: socket.socket, name: str, port: int) -> Response:
    sock.sendall(f"GET https://{name}:{port}/p HTTP/1.1\r\nHost: {name}:{port}\r\n"
                 f"Proxy-Authorization: {proxy_auth('a1', 'tok-a1')}\r\n\r\n".encode())
    return read_response(sock)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def test_the_upstream_is_verified_for_the_name(tmp_path, ca):
    with origin(ca, "allowed.test") as port, warden(tmp_path, ca, port) as w, \
            socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:  # no IP SAN
        assert _get(s, "allowed.test", port).status == 200, "was 502: verified against the IP"


def test_a_certificate_for_the_ip_but_not_the_name_is_refused(tmp_path, ca):
    with origin(ca, "127.0.0.1", "other.test") as port, warden(tmp_path, ca, port) as w, \
            socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
        assert _get(s, "allowed.test", port).status == 502, "was 200: the name was never verified"


def test_one_connection_carries_one_name_per_address(tmp_path, ca):
    with origin(ca, "allowed.test", "api.test") as port, warden(tmp_path, ca, port) as w:
        with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:
            assert _get(s, "allowed.test", port).status == 200
            refused = _get(s, "api.test", port)
            assert refused.status == 403 and refused.headers.get("x-warden-reason") == "host_mismatch", refused
        with socket.create_connection(("127.0.0.1", w.port), timeout=10) as s:  # its own connection: fine
            assert _get(s, "api.test", port).status == 200
