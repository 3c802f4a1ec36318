"""A revoked passthrough tunnel lets go of both its sockets at once, even when they cannot drain.

Red-team round 2 (branch redteam2): a revoked passthrough tunnel carrying data both ways,
whose upstream does not read, kept the upstream connection to the revoked destination (and
its fd) open for as long as the upstream kept it (8 of 8, > 30 s), because asyncio's
`transport.close()` waits for the write buffer to drain. Revocation now aborts both legs.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.bypass_helpers import connect_raw, proxy_auth, read_head_only, wait_until
from tests.control_helpers import reload_rules
from tests.harness import hosts_file, sha256_hex, start_warden

TOKEN = "redteam2-token-0123456789"


def _rules(work: Path, flood_port: int) -> dict[str, Any]:
    loopback = ["127.0.0.1/32"]
    return {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
        "policies": {"p": {"allow": [
            {"id": "pass", "host": "other.test", "ports": [flood_port], "addresses": loopback,
             "raw_tcp": True},  # the flood origin speaks raw bytes
        ]}},
        "settings": {"hosts_file": str(hosts_file(work / "hosts"))},
    }


class _FloodServer:
    """Sends to every connection until it fails (or 60 s); counts the connections still open."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.open = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._flood, args=(conn,), daemon=True).start()

    def _flood(self, conn: socket.socket) -> None:
        with self.lock:
            self.open += 1
            self.conns.append(conn)
        conn.settimeout(60)
        deadline = time.monotonic() + 60
        try:
            while time.monotonic() < deadline and not self.stopping.is_set():
                conn.send(b"S" * 16384)
        except OSError:
            pass
        finally:
            with self.lock:
                self.open -= 1
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            for c in self.conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture(params=["spliced", "mitmproxy-relay"])
def env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    ca = trustme.CA()
    ca_file = tmp_path / "origin-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    flood = _FloodServer()
    try:
        rules = _rules(tmp_path, flood.port)
        extra = ["--set", "warden_splice=false"] if request.param == "mitmproxy-relay" else []
        warden = start_warden(tmp_path, rules, upstream_ca=ca_file, agents={"coder": TOKEN}, extra_args=extra)
        try:
            yield {"warden": warden, "flood": flood, "rules": rules}
        finally:
            warden.stop()
    finally:
        flood.stop()


@pytest.mark.parametrize("agent_reads", [True, False], ids=["agent-reads", "agent-silent"])
def test_revoked_passthrough_tunnel_releases_both_connections(env: dict[str, Any], agent_reads: bool) -> None:
    """Both sides flood, the upstream never reads (and, agent-silent, the agent never reads
    either): after tunnel_revoked Warden holds nothing to the revoked destination, and the
    agent's connection ends, within seconds."""
    warden, flood, rules = env["warden"], env["flood"], env["rules"]
    socks = []
    for _ in range(8):
        sock, status, head = connect_raw(warden, "coder", f"other.test:{flood.port}")
        assert status == 200, head
        socks.append(sock)

    def agent_sends(sock: socket.socket) -> None:
        deadline = time.monotonic() + 4
        try:
            sock.settimeout(1)
            while time.monotonic() < deadline:
                sock.sendall(b"C" * 65536)
        except OSError:
            pass
    def agent_reads(sock: socket.socket) -> None:  # the upstream's bytes keep flowing to the agent
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline and sock.recv(65536):
                pass
        except OSError:
            pass
    senders = [threading.Thread(target=agent_sends, args=(s,), daemon=True) for s in socks]
    if agent_reads:
        senders += [threading.Thread(target=agent_reads, args=(s,), daemon=True) for s in socks]
    for t in senders:
        t.start()
    assert wait_until(lambda: flood.open == 8, timeout=10)

    revoked = copy.deepcopy(rules)
    revoked["policies"]["p"]["allow"] = [a for a in revoked["policies"]["p"]["allow"] if a["id"] != "pass"]
    reload_rules(warden, revoked)
    assert wait_until(lambda: sum(r.get("event") == "tunnel_revoked" for r in warden.audit_records()) == 8,
                      timeout=10)
    revoked_at = time.monotonic()
    for t in senders:
        t.join(10)
    if not agent_reads:  # the agent's side ends too: it drains what is queued, then EOF or a reset
        for s in socks:
            s.settimeout(max(0.1, revoked_at + 10 - time.monotonic()))
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                while s.recv(1 << 20):
                    pass
    for s in socks:
        s.close()
    # The upstream's own send timeout is 60 s: only Warden closing its side ends these early.
    assert wait_until(lambda: flood.open == 0, timeout=10), (
        f"{flood.open} of 8 upstream connections of revoked tunnels still open 10 s after the revocation")


def _serve_one_connection(sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
    """In a thread: accept one connection on the listening `sock` (20 s at most), give it to
    `handle` with a 20 s timeout, and close it after."""
    def run() -> None:
        sock.settimeout(20)
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.settimeout(20)
        with conn:
            handle(conn)
    threading.Thread(target=run, daemon=True).start()


class _SlowReader:
    """Reads nothing until told to, then everything: counts what arrives and how it ends."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # inherited by accepted sockets
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port: int = self.sock.getsockname()[1]
        self.read_now = threading.Event()
        self.after = 0  # bytes read after read_now
        self.ended: str | None = None  # "eof" or "reset"
        self.accepted = threading.Event()
        _serve_one_connection(self.sock, self._read)

    def _read(self, conn: socket.socket) -> None:
        self.accepted.set()
        self.read_now.wait(30)
        try:
            while data := conn.recv(1 << 20):
                self.after += len(data)
            self.ended = "eof"
        except ConnectionResetError:
            self.ended = "reset"
        except OSError as e:
            self.ended = type(e).__name__

    def close(self) -> None:
        self.read_now.set()
        self.sock.close()


@pytest.mark.parametrize("path", ["fast", "fast-nosplice", "mitmproxy", "mitmproxy-nosplice"])
def test_a_revoked_upload_is_reset_not_delivered(tmp_path: Path, path: str) -> None:
    """Red team 21: a revocation closed Warden's socket to the revoked destination without a
    reset, so the kernel went on delivering the agent's queued upload (4 MB on loopback), then
    a clean FIN. Now the destination gets a reset, and at most what its own small receive
    buffer held before the revocation."""
    origin = _SlowReader()
    try:
        rules = _rules(tmp_path, origin.port)
        extra = ["--set", f"warden_fast_connect={'false' if path.startswith('mitmproxy') else 'true'}"]
        if path.endswith("nosplice"):
            extra += ["--set", "warden_splice=false"]
        warden = start_warden(tmp_path, rules, agents={"coder": TOKEN}, extra_args=extra)
        sock, status, head = connect_raw(warden, "coder", f"other.test:{origin.port}")
        try:
            assert status == 200, head
            assert origin.accepted.wait(10)
            sock.settimeout(0.5)
            sent, deadline = 0, time.monotonic() + 10
            with contextlib.suppress(TimeoutError, BlockingIOError):  # every buffer on the way is full
                while time.monotonic() < deadline:
                    sent += sock.send(b"U" * 65536)
            assert sent > 1 << 20, sent  # megabytes queued between the agent and the origin
            revoked = copy.deepcopy(rules)
            revoked["policies"]["p"]["allow"] = []
            reload_rules(warden, revoked)
            assert wait_until(lambda: any(r.get("event") == "tunnel_revoked" for r in warden.audit_records()))
            time.sleep(0.5)  # the cut has happened; now the origin reads what reached it
            origin.read_now.set()
            assert wait_until(lambda: origin.ended is not None, timeout=25)
            assert origin.ended == "reset", (origin.ended, origin.after)
            assert origin.after < 1 << 20, origin.after  # not the megabytes Warden had queued
            # the agent's side is reset too: a cut tunnel never ends in a clean EOF
            sock.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while sock.recv(65536):
                    pass
        finally:
            sock.close()
            warden.stop()
    finally:
        origin.close()


class _AnswerThenReset:
    """Sends its whole answer without reading the request, then closes: the unread request
    makes its kernel end the connection with a reset (as servers that answer early do)."""

    SIZE = 4 << 20

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        _serve_one_connection(self.sock, self._answer)

    def _answer(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.recv(10)  # the agent's request has begun: now answer without reading the rest
            conn.sendall(b"D" * self.SIZE)
            time.sleep(0.5)


SPLICE_RESET_GAP = pytest.mark.xfail(strict=False, reason=(
    "known gap (README, Enforcement details): in some runs the kernel relay loses up to ~180 KB "
    "of an answer the upstream completed before its reset, as it did before the resets of this round"))


@pytest.mark.parametrize("path", [pytest.param("fast", marks=SPLICE_RESET_GAP), "fast-nosplice"])
def test_a_complete_answer_reaches_the_agent_when_the_upstream_then_resets(tmp_path: Path, path: str) -> None:
    """Red team 23: with every abort a reset, an upstream's own reset after a complete answer
    made Warden drop what it still held for a slow agent (31% arrived). A peer's reset is passed
    on as before: everything the upstream sent arrives."""
    origin = _AnswerThenReset()
    extra = ["--set", "warden_splice=false"] if path == "fast-nosplice" else []
    warden = start_warden(tmp_path, _rules(tmp_path, origin.port), agents={"coder": TOKEN}, extra_args=extra)
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # a slow agent: Warden holds the answer
        sock.settimeout(10)
        sock.connect(("127.0.0.1", warden.port))
        with sock:
            sock.sendall(f"CONNECT other.test:{origin.port} HTTP/1.1\r\nHost: other.test:{origin.port}\r\n"
                         f"Proxy-Authorization: {proxy_auth('coder', TOKEN)}\r\n\r\n".encode())
            head = read_head_only(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
            # more than the origin reads (so it resets), little enough to fit in its receive buffer
            # (an agent upload still in Warden when the reset comes is another case: see README)
            sock.sendall(b"R" * 16384)
            time.sleep(1.5)  # the answer is sent and the origin's reset is out
            got, deadline = 0, time.monotonic() + 30
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                while time.monotonic() < deadline and (data := sock.recv(16384)):
                    got += len(data)
                    time.sleep(0.001)  # a slow reader: Warden holds the rest meanwhile
            assert got == _AnswerThenReset.SIZE, got
    finally:
        warden.stop()
        origin.sock.close()


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "mitmproxy-relay"])
def test_a_tunnel_open_at_shutdown_gets_its_record_on_mitmproxys_path(tmp_path: Path, splice: bool) -> None:
    """Red team 23: on mitmproxy's path (`warden_fast_connect=false`) a passthrough tunnel
    still open at SIGTERM got no `tunnel_close`; the fast path always wrote one."""
    echo = socket.create_server(("127.0.0.1", 0))

    def echo_back(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)
    _serve_one_connection(echo, echo_back)
    extra = ["--set", "warden_fast_connect=false"] + ([] if splice else ["--set", "warden_splice=false"])
    warden = start_warden(tmp_path, _rules(tmp_path, echo.getsockname()[1]), agents={"coder": TOKEN},
                          extra_args=extra)
    try:
        sock, status, head = connect_raw(warden, "coder", f"other.test:{echo.getsockname()[1]}")
        with sock:
            assert status == 200, head
            sent = 0
            for _ in range(40):  # enough round trips for the kernel relay to take over
                sock.sendall(b"e" * 4096)
                sent += 4096
                got = 0
                while got < 4096:
                    got += len(sock.recv(4096 - got))
            assert warden.stop() == 0
        closes = [r for r in warden.audit_records() if r.get("event") == "tunnel_close"]
        assert len(closes) == 1, closes
        assert closes[0]["error"] == "warden shutting down"
        assert (closes[0]["bytes_up"], closes[0]["bytes_down"]) == (sent, sent)
        assert warden.audit_records()[-1]["event"] == "shutdown"
    finally:
        warden.stop()
        echo.close()
