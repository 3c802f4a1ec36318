"""End to end: TLS session resumption towards upstreams (stages/upstream_tls.py).

A real `warden run` intercepts curl's HTTPS (a new client connection per request) towards a
real TLS 1.3 origin that issues session tickets and records, per connection, the SNI it was
asked for and whether the session was resumed. The origin accepts any of its tickets for
any name, so a session Warden offered to the wrong name, agent or port would show up here as
a resumed connection.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from .harness import Warden, curl, hosts_file, sha256_hex, start_warden

NAMES = ["allowed.test", "api.test"]


@dataclass
class TicketOrigin:
    """A TLS origin answering each request with 200 and closing; records every handshake."""

    ctx: ssl.SSLContext
    sock: socket.socket = field(default_factory=socket.socket)
    seen: list[tuple[str | None, bool]] = field(default_factory=list)  # (SNI, session resumed)
    failed: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        names: list[str | None] = []
        self.ctx.sni_callback = lambda _s, name, _c: names.append(name)  # type: ignore[assignment,misc]
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                self.seen.append((names[0] if names else None, conn.session_reused))
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        except (OSError, ssl.SSLError) as e:
            self.failed.append(type(e).__name__)


@contextmanager
def ticket_origin(ca: trustme.CA, port: int = 0, padding: int = 0, tmp: Path | None = None) -> Iterator[TicketOrigin]:
    """padding: that many unrelated self-signed certificates sent after the real chain (chain
    building ignores them; OpenSSL keeps them all in the client's session)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    leaf = ca.issue_cert(*NAMES)
    if padding:
        assert tmp is not None
        pem = tmp / "padded-chain.pem"
        pem.write_bytes(leaf.private_key_and_cert_chain_pem.bytes()
                        + b"".join(trustme.CA().cert_pem.bytes() for _ in range(padding)))
        ctx.load_cert_chain(str(pem))
    else:
        leaf.configure_cert(ctx)
    origin = TicketOrigin(ctx)
    origin.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    origin.sock.bind(("127.0.0.1", port))
    origin.sock.listen(16)
    thread = threading.Thread(target=origin.serve, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        origin.stop.set()
        thread.join(5)
        origin.sock.close()


def _rules(work: Path, port: int) -> dict:
    return {
        "agents": [{"id": "a1", "token_sha256": [sha256_hex("tok-a1")], "policies": ["p"]},
                   {"id": "a2", "token_sha256": [sha256_hex("tok-a2")], "policies": ["p"]}],
        "policies": {"p": {"allow": [*({"host": name, "ports": [port]} for name in NAMES),
                                     {"cidr": "127.0.0.1/32", "ports": [port]}]}},
        "settings": {"hosts_file": str(hosts_file(work / "hosts", NAMES)), "tls_intercept": "always"},
    }


def _get(w: Warden, agent: str, name: str, port: int) -> str:
    r = curl(["-o", "/dev/null", "-w", "%{http_code}", "--proxy", w.proxy_url(agent), "--cacert", str(w.ca_cert),
              f"https://{name}:{port}/"])
    return r.stdout


def _leaf_names(w: Warden, agent: str, name: str, port: int) -> list[str]:
    """The names in the certificate Warden mints for the agent (mitmproxy copies them from the
    upstream's certificate, which a resumed session must still carry)."""
    auth = base64.b64encode(f"{agent}:{w.agents[agent]}".encode()).decode()
    with socket.create_connection(("127.0.0.1", w.port), timeout=10) as raw:
        raw.sendall(f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n"
                    f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += raw.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(w.ca_cert))
        with ctx.wrap_socket(raw, server_hostname=name) as tls:
            names = sorted(value for _, value in tls.getpeercert()["subjectAltName"])
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            while tls.recv(4096):
                pass
            return names


def _handshakes(w: Warden, resumed: str) -> float:
    for line in w.metrics_text().splitlines():
        if line.startswith(f'warden_upstream_tls_handshakes_total{{resumed="{resumed}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _assert_three_full_handshakes(w: Warden, origin: TicketOrigin) -> None:
    """Three requests, each on a new connection: all answered, none resumed upstream."""
    assert [_get(w, "a1", "allowed.test", origin.port) for _ in range(3)] == ["200"] * 3
    assert origin.seen == [("allowed.test", False)] * 3
    assert (_handshakes(w, "false"), _handshakes(w, "true")) == (3, 0)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def _start(tmp_path: Path, ca: trustme.CA, port: int, *extra: str) -> Warden:
    ca_file = tmp_path / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return start_warden(tmp_path, _rules(tmp_path, port), upstream_ca=ca_file, extra_args=list(extra),
                        agents={"a1": "tok-a1", "a2": "tok-a2"})


def test_a_new_connection_resumes_the_session_of_the_last_one(tmp_path, ca):
    with ticket_origin(ca) as origin:
        w = _start(tmp_path, ca, origin.port)
        try:
            assert [_get(w, "a1", "allowed.test", origin.port) for _ in range(4)] == ["200"] * 4
            assert origin.seen == [("allowed.test", False)] + [("allowed.test", True)] * 3
            assert (_handshakes(w, "false"), _handshakes(w, "true")) == (1, 3)
            # mitmproxy reads the upstream's chain for the certificate it mints: still there
            assert set(NAMES) <= set(_leaf_names(w, "a1", "allowed.test", origin.port))  # api.test: from the chain
            assert origin.seen[-1] == ("allowed.test", True)
        finally:
            w.stop()


def test_a_session_is_offered_only_to_the_same_name_and_agent(tmp_path, ca):
    with ticket_origin(ca) as origin:
        w = _start(tmp_path, ca, origin.port)
        try:
            for agent, name in [("a1", "allowed.test"), ("a1", "api.test"), ("a2", "allowed.test"),
                                ("a2", "api.test"), ("a1", "allowed.test"), ("a2", "api.test")]:
                assert _get(w, agent, name, origin.port) == "200"
            # Same address and port throughout: only the last two, each the second of its
            # (agent, name), may resume. The origin would have resumed any session offered.
            assert origin.seen == [("allowed.test", False), ("api.test", False), ("allowed.test", False),
                                   ("api.test", False), ("allowed.test", True), ("api.test", True)]
        finally:
            w.stop()


def test_resumption_can_be_turned_off(tmp_path, ca):
    with ticket_origin(ca) as origin:
        w = _start(tmp_path, ca, origin.port, "--set", "warden_upstream_tls_resumption=false")
        try:
            _assert_three_full_handshakes(w, origin)
        finally:
            w.stop()


def test_a_server_that_cannot_resume_gets_a_full_verified_handshake(tmp_path, ca):
    """The origin restarts on the same port with new ticket keys and a certificate Warden does
    not trust: the stored session cannot be resumed, so the handshake is a full one, and its
    verification refuses the new certificate."""
    with ticket_origin(ca) as origin:
        port = origin.port
        w = _start(tmp_path, ca, port)
        try:
            assert _get(w, "a1", "allowed.test", port) == "200"
            assert origin.seen == [("allowed.test", False)]
        except BaseException:
            w.stop()
            raise
    try:
        with ticket_origin(trustme.CA(), port) as impostor:
            assert _get(w, "a1", "allowed.test", port) == "502"
            assert impostor.seen == []  # the handshake never completed on the server's side
            assert impostor.failed  # it failed there: Warden refused the certificate
        with ticket_origin(ca, port) as again:  # trusted again, new ticket keys: full handshake
            assert _get(w, "a1", "allowed.test", port) == "200"
            assert again.seen == [("allowed.test", False)]
    finally:
        w.stop()


def test_a_session_with_a_padded_chain_is_not_kept(tmp_path, ca):
    """Red team 22: a server can pad a valid chain with certificates chain building ignores, and
    OpenSSL keeps them all in the session (208 KiB each); such sessions are not kept."""
    with ticket_origin(ca, padding=8, tmp=tmp_path) as origin:
        w = _start(tmp_path, ca, origin.port)
        try:
            _assert_three_full_handshakes(w, origin)
        finally:
            w.stop()
