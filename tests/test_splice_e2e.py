"""Issue 17: passed-through tunnels relayed in the kernel (runtime/splicing.py), through a real `warden run`.

The client below speaks TLS through memory BIOs, so it knows exactly how many bytes it put
on the wire and took off it: the tunnel_close record must report those numbers. Whether a
tunnel is really relayed in the kernel is read from the kernel too: each spliced tunnel
holds two pipes (four descriptors) in the Warden process, a tunnel on mitmproxy's relay none.
A tunnel is handed over once it has carried SPLICE_AFTER_BYTES or SPLICE_AFTER_CHUNKS through
mitmproxy's relay, so the tests warm each tunnel up with one larger request (`warm`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from .bypass_helpers import (
    LoggingOrigin,
    OriginReply,
    SeenRequest,
    audit_where,
    connect_raw,
    run_logging_origin,
    wait_until,
)
from .harness import Warden, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKENS = {"coder": "coder-token-1", "gone": "gone-token-2"}
BIG = 4 * 1024 * 1024


def echo_reply(req: SeenRequest) -> OriginReply:
    if req.method == "POST":  # the body back, byte for byte
        return 200, {"Content-Type": "application/octet-stream",
                     "X-Body-Sha256": hashlib.sha256(req.body).hexdigest()}, req.body
    return 200, {"Content-Type": "text/plain"}, f"ok {req.target}\n".encode()


def rules(origin_port: int, tmp: Path, agents: tuple[str, ...] = ("coder", "gone")) -> dict[str, Any]:
    # raw_tcp: these tunnels carry raw bytes (an echo origin), not only TLS
    allow = [{"host": "allowed.test", "ports": [origin_port], "raw_tcp": True},
             {"cidr": "127.0.0.1/32", "ports": [origin_port], "raw_tcp": True}]
    return {"agents": [{"id": a, "token_sha256": [sha256_hex(TOKENS[a])], "policies": ["web"]} for a in agents],
            "policies": {"web": {"allow": allow}},
            "settings": {"hosts_file": str(hosts_file(tmp / "hosts"))}}


def pipes(pid: int) -> int:
    """Pipe descriptors the process holds (the kernel relay's: two per direction)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:")
    return count


class CountingTLS:
    """TLS through memory BIOs over a CONNECT tunnel; `sent` / `received` are the raw tunnel bytes."""

    def __init__(self, sock: socket.socket, ca_file: Path, host: str) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ssl.create_default_context(cafile=str(ca_file)).wrap_bio(self.inc, self.out, server_hostname=host)
        self.sent = self.received = 0
        self.pending = b""
        self.eof = False
        self.reset = False  # the proxy ended the tunnel with a reset (a revocation, a timeout)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("closed during the handshake") from None
        self._flush()

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.sock.sendall(data)
            self.sent += len(data)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            self.inc.write_eof()
            self.eof = True
            return False
        self.received += len(data)
        self.inc.write(data)
        return True

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.obj.write(view[:1 << 18])
            view = view[n:]
            self._flush()

    def _more(self) -> bytes:
        while True:
            try:
                return self.obj.read(1 << 16)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def response(self) -> tuple[int, dict[str, str], bytes]:
        buf = self.pending
        while b"\r\n\r\n" not in buf:
            more = self._more()
            if not more:
                raise ConnectionError("closed before a response")
            buf += more
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        parts, have = [body], len(body)
        while have < length:
            more = self._more()
            if not more:
                raise ConnectionError("closed inside a response body")
            parts.append(more)
            have += len(more)
        whole = b"".join(parts)
        self.pending = whole[length:]
        return int(lines[0].split()[1]), headers, whole[:length]

    def request(self, method: str, target: str, body: bytes = b"") -> bytes:
        head = f"{method} {target} HTTP/1.1\r\nHost: allowed.test\r\nContent-Length: {len(body)}\r\n\r\n"
        return head.encode() + body

    def warm(self) -> None:
        """One round trip big enough (128 KiB each way) for the hand-over to the kernel."""
        up = os.urandom(128 * 1024)
        self.sendall(self.request("POST", "/echo", up))
        assert self.response()[2] == up

    def until_eof(self, timeout: float = 20) -> bytes:
        """Read (and count) until the proxy closes the tunnel; what decrypted meanwhile."""
        self.sock.settimeout(timeout)
        got = b""
        try:
            while more := self._more():
                got += more
        except ConnectionResetError:
            self.reset = True
        except ssl.SSLError:
            pass
        return got


@pytest.fixture
def echo_origin(origin_ca: trustme.CA) -> Iterator[LoggingOrigin]:
    with run_logging_origin(echo_reply, ca=origin_ca) as origin:
        yield origin


def warden_for(tmp: Path, origin: LoggingOrigin, origin_ca_file: Path, confdir: Path,
               extra: list[str] | None = None, loop: str = "asyncio") -> Warden:
    return start_warden(tmp, rules(origin.port, tmp), upstream_ca=origin_ca_file, confdir=confdir,
                        agents=TOKENS, extra_args=extra, env={"WARDEN_EVENT_LOOP": loop})


def tunnel(w: Warden, origin: LoggingOrigin, origin_ca_file: Path, agent: str = "coder") -> CountingTLS:
    sock, status, head = connect_raw(w, agent, f"allowed.test:{origin.port}")
    assert status == 200 and head.endswith(b"\r\n\r\n"), head  # nothing of the tunnel read with the head
    return CountingTLS(sock, origin_ca_file, "allowed.test")


def closes_of(w: Warden, agent: str, n: int = 1) -> list[dict[str, Any]]:
    records = w.audit_records(lambda rs: sum(r.get("event") == "tunnel_close" and r.get("agent") == agent
                                             for r in rs) >= n, timeout=15)
    return [r for r in records if r.get("event") == "tunnel_close" and r.get("agent") == agent]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_spliced_tunnel_carries_keepalive_and_4mib_both_ways_exactly(tmp_path: Path, echo_origin: LoggingOrigin,
                                                                     origin_ca_file: Path, shared_confdir: Path,
                                                                     loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    w = warden_for(tmp_path, echo_origin, origin_ca_file, shared_confdir, loop=loop)
    try:
        before = pipes(w.proc.pid)
        t = tunnel(w, echo_origin, origin_ca_file)
        for i in range(20):  # keep-alive: one tunnel, one TLS session, many requests
            t.sendall(t.request("GET", f"/small/{i}"))
            status, _, body = t.response()
            assert (status, body) == (200, f"ok /small/{i}\n".encode())
        # a handshake and 20 small requests are past SPLICE_AFTER_CHUNKS: handed over meanwhile
        assert wait_until(lambda: pipes(w.proc.pid) >= before + 4), "the tunnel was not handed to the kernel"
        up = os.urandom(BIG)
        t.sendall(t.request("POST", "/echo", up))
        status, headers, down = t.response()
        assert status == 200 and headers["x-body-sha256"] == hashlib.sha256(up).hexdigest()
        assert down == up  # 4 MiB up and the same 4 MiB down, byte-exact
        # Half-close: the last request leaves with the client's FIN right behind it; the answer
        # still comes back through the relay, then the origin's FIN.
        t.sendall(t.request("GET", "/last"))
        t.sock.shutdown(socket.SHUT_WR)
        assert t.response()[2] == b"ok /last\n"
        assert t.until_eof() == b""
        t.sock.close()
        closed = closes_of(w, "coder")
        assert len(closed) == 1, closed
        assert (closed[0]["bytes_up"], closed[0]["bytes_down"]) == (t.sent, t.received)
        assert t.sent > BIG and t.received > BIG
        seen = echo_origin.requests
        assert [r.target for r in seen] == [f"/small/{i}" for i in range(20)] + ["/echo", "/last"]
        assert wait_until(lambda: pipes(w.proc.pid) == before), "the relay's pipes were not closed"
    finally:
        w.stop()


def test_off_switch_keeps_mitmproxys_relay(tmp_path: Path, echo_origin: LoggingOrigin, origin_ca_file: Path,
                                           shared_confdir: Path) -> None:
    w = warden_for(tmp_path, echo_origin, origin_ca_file, shared_confdir, ["--set", "warden_splice=false"])
    try:
        before = pipes(w.proc.pid)
        t = tunnel(w, echo_origin, origin_ca_file)
        up = os.urandom(1 << 20)
        t.sendall(t.request("POST", "/echo", up))
        assert t.response()[2] == up  # a whole round trip: a kernel relay would exist by now
        assert pipes(w.proc.pid) == before, "warden_splice=false still spliced"
        t.sock.shutdown(socket.SHUT_WR)
        assert t.until_eof() == b""
        t.sock.close()
        closed = closes_of(w, "coder")
        assert (closed[0]["bytes_up"], closed[0]["bytes_down"]) == (t.sent, t.received)
    finally:
        w.stop()


def test_revocation_cuts_a_spliced_tunnel_at_once(tmp_path: Path, echo_origin: LoggingOrigin,
                                                  origin_ca_file: Path, shared_confdir: Path) -> None:
    w = warden_for(tmp_path, echo_origin, origin_ca_file, shared_confdir)
    try:
        before = pipes(w.proc.pid)
        doomed, kept = tunnel(w, echo_origin, origin_ca_file, "gone"), tunnel(w, echo_origin, origin_ca_file)
        doomed.warm()
        kept.warm()
        assert wait_until(lambda: pipes(w.proc.pid) >= before + 8), "the tunnels were not handed to the kernel"
        for t in (doomed, kept):
            t.sendall(t.request("GET", "/before"))
            assert t.response()[0] == 200
        started = time.monotonic()
        w.write_rules(rules(echo_origin.port, tmp_path, agents=("coder",)))
        # cut with a reset (red team 21): a clean EOF would let the agent take a cut for an end
        assert doomed.until_eof(timeout=10) == b"" and doomed.reset, "the revoked agent's spliced tunnel was not reset"
        assert time.monotonic() - started < 3.0
        kept.sendall(kept.request("GET", "/after"))
        assert kept.response()[2] == b"ok /after\n"  # still allowed: untouched, still in the kernel
        revoked = audit_where(w, lambda r: r.get("event") == "tunnel_revoked")
        assert [r["agent"] for r in revoked] == ["gone"] and revoked[0]["revocation"] == "denied"
        closed = closes_of(w, "gone")
        assert (closed[0]["bytes_up"], closed[0]["bytes_down"]) == (doomed.sent, doomed.received)
        assert wait_until(lambda: pipes(w.proc.pid) == before + 4), "the revoked relay's pipes stayed open"
        doomed.sock.close()
        kept.sock.close()
    finally:
        w.stop()


def test_inactivity_timeout_spares_a_busy_spliced_tunnel_and_cuts_an_idle_one(
        tmp_path: Path, echo_origin: LoggingOrigin, origin_ca_file: Path, shared_confdir: Path) -> None:
    timeout = 2
    w = warden_for(tmp_path, echo_origin, origin_ca_file, shared_confdir, ["--set", f"tcp_timeout={timeout}"])
    try:
        before = pipes(w.proc.pid)
        t = tunnel(w, echo_origin, origin_ca_file)
        t.warm()
        assert wait_until(lambda: pipes(w.proc.pid) >= before + 4), "the tunnel was not handed to the kernel"
        busy_until = time.monotonic() + 2.5 * timeout  # no layer event in all that time: only spliced bytes
        n = 0
        while time.monotonic() < busy_until:
            t.sendall(t.request("GET", f"/busy/{n}"))
            assert t.response()[2] == f"ok /busy/{n}\n".encode(), "a busy spliced tunnel was cut as idle"
            n += 1
            time.sleep(0.4)
        last = time.monotonic()
        assert t.until_eof(timeout=20) == b"" and t.reset, "an idle spliced tunnel was never timed out (reset)"
        assert time.monotonic() - last >= timeout - 0.5
        t.sock.close()
        closed = closes_of(w, "coder")
        assert (closed[0]["bytes_up"], closed[0]["bytes_down"]) == (t.sent, t.received)
    finally:
        w.stop()


class RawOrigin:
    """Raw TCP on 127.0.0.1: an optional greeting on accept, then echo (or only count); `reset`
    makes it abort the current connection with a TCP RST."""

    def __init__(self, greeting: bytes = b"", echo: bool = True) -> None:
        self.greeting, self.echo = greeting, echo
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.received = bytearray()
        self.lock = threading.Lock()
        self.reset = threading.Event()
        self.stopping = threading.Event()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        with conn:
            with contextlib.suppress(OSError):
                conn.sendall(self.greeting)
            while not self.stopping.is_set():
                if self.reset.is_set():
                    self.reset.clear()
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return  # close with linger 0: RST
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with self.lock:
                    self.received += data
                if self.echo:
                    conn.sendall(data)

    def got(self) -> bytes:
        with self.lock:
            return bytes(self.received)


@contextlib.contextmanager
def run_raw_origin(greeting: bytes = b"", echo: bool = True) -> Iterator[RawOrigin]:
    origin = RawOrigin(greeting, echo)
    thread = threading.Thread(target=origin.serve, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        origin.stopping.set()
        origin.sock.close()
        thread.join(5)


def raw_tunnel(w: Warden, port: int) -> socket.socket:
    sock, status, head = connect_raw(w, "coder", f"allowed.test:{port}")
    assert status == 200 and head.endswith(b"\r\n\r\n"), head
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_server_greeting_read_before_the_handover_arrives_once(tmp_path: Path, origin_ca_file: Path,
                                                               shared_confdir: Path) -> None:
    greeting = b"SSH-2.0-OpenSSH_9.2 origin speaks first\r\n"
    with run_raw_origin(greeting) as origin:
        w = start_warden(tmp_path, rules(origin.port, tmp_path), confdir=shared_confdir, agents=TOKENS)
        try:
            before = pipes(w.proc.pid)
            sock = raw_tunnel(w, origin.port)
            assert recv_exactly(sock, len(greeting)) == greeting  # relayed by mitmproxy, before the take-over
            data = os.urandom(300_000)
            sock.sendall(data)
            assert recv_exactly(sock, len(data)) == data  # the first 64 KiB or so by mitmproxy, the rest in the kernel
            assert wait_until(lambda: pipes(w.proc.pid) >= before + 4), "the tunnel was not handed to the kernel"
            sock.sendall(data)
            assert recv_exactly(sock, len(data)) == data
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # the greeting came once: nothing more is owed
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(10)
            assert sock.recv(1) == b""
            sock.close()
            closed = closes_of(w, "coder")
            assert (closed[0]["bytes_up"], closed[0]["bytes_down"]) == (2 * len(data), len(greeting) + 2 * len(data))
            assert origin.got() == data + data
        finally:
            w.stop()


def test_a_relay_error_closes_both_sides_is_audited_and_the_proxy_carries_on(tmp_path: Path,
                                                                             shared_confdir: Path) -> None:
    with run_raw_origin(echo=False) as origin:
        w = start_warden(tmp_path, rules(origin.port, tmp_path), confdir=shared_confdir, agents=TOKENS, extra_args=["-v"])
        try:
            before = pipes(w.proc.pid)
            sock = raw_tunnel(w, origin.port)
            first = b"hello" + os.urandom(100_000)  # not TLS: an allowed tunnel without interception relays it raw
            sock.sendall(first)
            assert wait_until(lambda: origin.got() == first) and wait_until(
                lambda: pipes(w.proc.pid) >= before + 4), "the tunnel was not handed to the kernel"
            origin.reset.set()  # the upstream aborts: the relay's next splice fails
            sent, deadline, ended = len(first), time.monotonic() + 20, False
            sock.settimeout(0.2)
            chunk = b"x" * 65536
            while not ended and time.monotonic() < deadline:
                try:
                    sock.sendall(chunk)
                    sent += len(chunk)
                    ended = sock.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    ended = True
            assert ended, "the client's side stayed open after the upstream reset"
            sock.close()
            closed = closes_of(w, "coder")
            assert len(closed) == 1 and len(first) <= closed[0]["bytes_up"] <= sent and closed[0]["bytes_down"] == 0
            assert wait_until(lambda: pipes(w.proc.pid) == before), "the failed relay's pipes stayed open"
            again = raw_tunnel(w, origin.port)  # the proxy is fine: the next tunnel works
            again.sendall(b"again")
            assert wait_until(lambda: origin.got().endswith(b"again"))
            again.close()
            out = w.output()
            assert f"tunnel to allowed.test:{origin.port} ended with" in out  # the relay saw the error (-v)
            assert "Traceback" not in out and "has crashed" not in out
        finally:
            w.stop()


def test_descriptor_budget_leaves_further_tunnels_on_mitmproxys_relay(tmp_path: Path, echo_origin: LoggingOrigin,
                                                                      origin_ca_file: Path,
                                                                      shared_confdir: Path) -> None:
    import resource

    w = warden_for(tmp_path, echo_origin, origin_ca_file, shared_confdir)
    try:
        pid = w.proc.pid
        budget = (len(os.listdir(f"/proc/{pid}/fd")) + 40) // 24 + 1
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (24 * budget, hard))  # splicing.descriptor_budget() == budget
        before = pipes(pid)
        spliced = [tunnel(w, echo_origin, origin_ca_file) for _ in range(budget)]
        for t in spliced:
            t.warm()
        assert wait_until(lambda: pipes(pid) == before + 4 * budget), "the tunnels within the budget were not spliced"
        extra = tunnel(w, echo_origin, origin_ca_file)
        extra.warm()  # carried all the same, by mitmproxy's relay
        extra.sendall(extra.request("GET", "/extra"))
        assert extra.response()[2] == b"ok /extra\n"
        assert pipes(pid) == before + 4 * budget
        first = spliced.pop(0)
        first.sock.shutdown(socket.SHUT_WR)
        assert first.until_eof() == b""
        first.sock.close()
        assert wait_until(lambda: pipes(pid) == before + 4 * (budget - 1))
        spliced.append(tunnel(w, echo_origin, origin_ca_file))  # room again: the next one is spliced
        spliced[-1].warm()
        assert wait_until(lambda: pipes(pid) == before + 4 * budget)
        for t in [*spliced, extra]:
            t.sendall(t.request("GET", "/bye"))
            assert t.response()[2] == b"ok /bye\n"
            t.sock.shutdown(socket.SHUT_WR)
            assert t.until_eof() == b""
            t.sock.close()
        closed = closes_of(w, "coder", budget + 2)
        assert sorted((r["bytes_up"], r["bytes_down"]) for r in closed) == sorted(
            (t.sent, t.received) for t in [first, *spliced, extra])
    finally:
        w.stop()


def test_a_one_shot_tunnel_is_not_handed_over(tmp_path: Path, echo_origin: LoggingOrigin, origin_ca_file: Path,
                                              shared_confdir: Path) -> None:
    """A handshake and one small request stay under SPLICE_AFTER_*: no descriptors spent on them."""
    w = warden_for(tmp_path, echo_origin, origin_ca_file, shared_confdir)
    try:
        before = pipes(w.proc.pid)
        t = tunnel(w, echo_origin, origin_ca_file)
        t.sendall(t.request("GET", "/once"))
        assert t.response()[2] == b"ok /once\n"
        assert pipes(w.proc.pid) == before
        t.sock.shutdown(socket.SHUT_WR)
        assert t.until_eof() == b""
        t.sock.close()
        closed = closes_of(w, "coder")
        assert (closed[0]["bytes_up"], closed[0]["bytes_down"]) == (t.sent, t.received)
    finally:
        w.stop()
