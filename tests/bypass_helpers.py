"""Real parts for the bypass tests: origins that log every byte, raw tunnel clients, a DNS stand-in.

- `run_logging_origin`: a TCP (optionally TLS) server that records every byte each connection
  delivered, parses whatever HTTP/1.1 requests those bytes hold and answers them. Bytes that
  are not part of a whole request stay in `leftover`, so a test can prove that nothing but
  the requests Warden decided arrived.
- `open_tunnel` / `read_response`: an agent written by hand: CONNECT with its token, then TLS
  with Warden's CA (with or without ALPN), then exact byte streams.
- `run_dns_server`: a UDP stand-in resolver that logs each question's name and answers NXDOMAIN.
- `run_ws_origin`: a TLS WebSocket echo origin (wsproto) that logs every message it received.
- `run_logged_mcp_server`: the `mcp` SDK's MCPServer whose tools append their name to a call log.

Every server binds 127.0.0.1 (the DNS stand-in the address it is given), every wait is
bounded, and every server stops when its context exits.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from .harness import ORIGIN_NAMES, Warden, free_port, wait_for_port

KEEP_BYTES = 4 * 1024 * 1024  # per connection, the bytes kept verbatim (the rest is only counted)


# -- the byte-logging origin -------------------------------------------------------------------
@dataclass
class SeenRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes  # the first KEEP_BYTES of it
    body_size: int
    raw_size: int  # bytes of the whole request on the wire

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass
class SeenConnection:
    data: bytearray = field(default_factory=bytearray)  # first KEEP_BYTES received
    size: int = 0
    requests: list[SeenRequest] = field(default_factory=list)
    leftover: bytes = b""  # bytes after the last whole request (not HTTP, or cut short)
    watch_hits: set[bytes] = field(default_factory=set)


OriginReply = tuple[int, dict[str, str], bytes | Iterable[bytes]]
OriginHandler = Callable[[SeenRequest], OriginReply]


def default_reply(req: SeenRequest) -> OriginReply:
    return 200, {"Content-Type": "text/plain"}, f"origin got {req.method} {req.target}\n".encode()


class LoggingOrigin:
    def __init__(self, handler: OriginHandler, ssl_context: ssl.SSLContext | None, watch: Iterable[bytes]) -> None:
        self.handler = handler
        self.ssl_context = ssl_context
        self.watch = [w for w in watch if w]
        self.connections: list[SeenConnection] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []

    # what arrived ---------------------------------------------------------------------------
    @property
    def requests(self) -> list[SeenRequest]:
        with self.lock:
            return [r for c in self.connections for r in c.requests]

    @property
    def total_bytes(self) -> int:
        with self.lock:
            return sum(c.size for c in self.connections)

    def all_bytes(self) -> bytes:
        with self.lock:
            return b"".join(bytes(c.data) for c in self.connections)

    def saw(self, needle: bytes) -> bool:
        with self.lock:
            return any(needle in c.watch_hits for c in self.connections) or needle in self.all_bytes_unlocked()

    def all_bytes_unlocked(self) -> bytes:
        return b"".join(bytes(c.data) for c in self.connections)

    def reset(self) -> None:
        with self.lock:
            self.connections.clear()

    # serving --------------------------------------------------------------------------------
    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._connection, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _connection(self, raw: socket.socket) -> None:
        seen = SeenConnection()
        with self.lock:
            self.connections.append(seen)
        raw.settimeout(30)
        conn: socket.socket = raw
        try:
            if self.ssl_context is not None:
                conn = self.ssl_context.wrap_socket(raw, server_side=True)
            buf = b""
            tail = b""
            overlap = max((len(w) for w in self.watch), default=1)
            while not self.stopping.is_set():
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                with self.lock:
                    seen.size += len(chunk)
                    room = KEEP_BYTES - len(seen.data)
                    if room > 0:
                        seen.data += chunk[:room]
                    window = tail + chunk
                    for w in self.watch:
                        if w in window:
                            seen.watch_hits.add(w)
                    tail = window[-overlap:]
                buf += chunk
                buf = self._requests(conn, seen, buf)
                with self.lock:
                    seen.leftover = buf[:KEEP_BYTES]
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
                raw.close()

    def _requests(self, conn: socket.socket, seen: SeenConnection, buf: bytes) -> bytes:
        """Answer every whole request at the start of `buf`; return what is left."""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return buf
            head = buf[:end].decode("latin-1").split("\r\n")
            parts = head[0].split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                return buf  # not HTTP/1: stays leftover
            headers = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in head[1:])]
            req = SeenRequest(parts[0], parts[1], headers, b"", 0, 0)
            rest = buf[end + 4:]
            if (req.header("transfer-encoding") or "").lower() == "chunked":
                body = self._chunked(conn, seen, rest, req)
                if body is None:
                    return buf
                rest = body
            else:
                length = int(req.header("content-length") or 0)
                while len(rest) < length:
                    more = conn.recv(1 << 20)
                    if not more:
                        return buf[:end + 4] + rest  # cut short: all of it stays leftover
                    self._count(seen, more)
                    rest += more
                req.body, req.body_size = rest[:min(length, KEEP_BYTES)], length
                rest = rest[length:]
            req.raw_size = end + 4 + req.body_size
            with self.lock:
                seen.requests.append(req)
            self._answer(conn, req)
            buf = rest

    def _count(self, seen: SeenConnection, chunk: bytes) -> None:
        with self.lock:
            seen.size += len(chunk)
            room = KEEP_BYTES - len(seen.data)
            if room > 0:
                seen.data += chunk[:room]
            for w in self.watch:
                if w in chunk:
                    seen.watch_hits.add(w)

    def _chunked(self, conn: socket.socket, seen: SeenConnection, data: bytes, req: SeenRequest) -> bytes | None:
        """Read a chunked body (counting it, keeping its start); the bytes after it, or None if cut."""
        kept = bytearray()
        size = 0
        tail = b""
        overlap = max((len(w) for w in self.watch), default=1)

        def need(n: int) -> bool:
            nonlocal data
            while len(data) < n:
                more = conn.recv(1 << 20)
                if not more:
                    return False
                self._count(seen, more)
                data += more
            return True

        while True:
            while b"\r\n" not in data:
                if not need(len(data) + 1):
                    return None
            line, _, data = data.partition(b"\r\n")
            n = int(line.split(b";")[0], 16)
            if n == 0:
                while not data.startswith(b"\r\n"):
                    if b"\r\n\r\n" in data:
                        data = data[data.index(b"\r\n\r\n") + 2:]
                        break
                    if not need(len(data) + 1):
                        return None
                data = data[2:]
                req.body, req.body_size = bytes(kept), size
                return data
            if not need(n + 2):
                return None
            piece, data = data[:n], data[n + 2:]
            size += n
            window = tail + piece
            for w in self.watch:
                if w in window:
                    with self.lock:
                        seen.watch_hits.add(w)
            tail = window[-overlap:]
            room = KEEP_BYTES - len(kept)
            if room > 0:
                kept += piece[:room]

    def _answer(self, conn: socket.socket, req: SeenRequest) -> None:
        status, headers, body = self.handler(req)
        out = [f"HTTP/1.1 {status} {http.client.responses.get(status, 'X')}\r\n"]
        if isinstance(body, bytes):
            headers = {**headers, "Content-Length": str(len(body))}
        for k, v in headers.items():
            out.append(f"{k}: {v}\r\n")
        conn.sendall(("".join(out) + "\r\n").encode("latin-1"))
        if isinstance(body, bytes):
            conn.sendall(body)
        else:
            for piece in body:
                conn.sendall(piece)

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()
        for t in self.threads:
            t.join(2)


def server_context(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*ORIGIN_NAMES, "127.0.0.1").configure_cert(ctx)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@contextlib.contextmanager
def run_logging_origin(handler: OriginHandler = default_reply, ca: trustme.CA | None = None,
                       watch: Iterable[bytes] = ()) -> Iterator[LoggingOrigin]:
    origin = LoggingOrigin(handler, server_context(ca) if ca is not None else None, watch)
    thread = threading.Thread(target=origin.serve, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        origin.stop()
        thread.join(5)


# -- a hand-written agent -------------------------------------------------------------------------
def proxy_auth(agent: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{agent}:{token}".encode()).decode()


def connect_raw(warden: Warden, agent: str, authority: str, timeout: float = 15) -> tuple[socket.socket, int, bytes]:
    """CONNECT through Warden; (socket, status, the CONNECT response head)."""
    sock = socket.create_connection(("127.0.0.1", warden.port), timeout=timeout)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
                 f"Proxy-Authorization: {proxy_auth(agent, warden.agents[agent])}\r\n\r\n".encode())
    head = read_head_only(sock)
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return sock, status, head


def read_head_only(sock: socket.socket) -> bytes:
    """The response head up to and including its empty line, and not a byte more: what follows
    (a server's greeting relayed right behind the 200) stays in the socket for the caller."""
    head = b""
    while True:
        peeked = sock.recv(65536, socket.MSG_PEEK)
        if not peeked:
            return head
        end = (head + peeked).find(b"\r\n\r\n")
        take = len(peeked) if end < 0 else end + 4 - len(head)
        while take > 0:
            chunk = sock.recv(take)
            if not chunk:
                return head
            head, take = head + chunk, take - len(chunk)
        if end >= 0:
            return head


def client_tls(warden: Warden, alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(warden.ca_cert))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def open_tunnel(warden: Warden, agent: str, host: str, port: int, *, tls: bool = True,
                alpn: list[str] | None = None, sni: str | None = None, timeout: float = 15) -> socket.socket:
    """An established CONNECT tunnel, TLS-wrapped with Warden's CA unless `tls` is false."""
    sock, status, head = connect_raw(warden, agent, f"{host}:{port}", timeout)
    assert status == 200, head
    if not tls:
        return sock
    return client_tls(warden, alpn).wrap_socket(sock, server_hostname=sni or host)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def read_response(sock: socket.socket, method: str = "GET") -> Response:
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    body = resp.read()
    return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def closed_without_answer(sock: socket.socket, timeout: float = 10) -> bytes | None:
    """None when the peer closes (or resets) the connection without sending a byte; else what it sent."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
        pass
    return got or None


def read_until_closed(sock: socket.socket, timeout: float = 5) -> bytes:
    """Everything the peer sends until it closes, resets, or `timeout` passes (bounded)."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def events_after(warden: Warden, before: int, event: str, timeout: float = 5) -> list[dict[str, Any]]:
    """The `event` records written after the first `before` records (waiting, bounded, for one)."""
    records = warden.audit_records(lambda rs: any(r.get("event") == event for r in rs[before:]), timeout=timeout)
    return [r for r in records[before:] if r.get("event") == event]


def request_bytes(method: str, target: str, host: str, headers: dict[str, str] | None = None,
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def audit_where(warden: Warden, pred: Callable[[dict[str, Any]], bool],
                timeout: float = 10) -> list[dict[str, Any]]:
    """Audit records matching `pred`, waiting (bounded) until at least one exists."""
    records = warden.audit_records(lambda rs: any(pred(r) for r in rs), timeout=timeout)
    return [r for r in records if pred(r)]


def wait_until(pred: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def warden_pid(warden: Warden) -> int:
    """The PID of the process that carries traffic: `warden run` itself, or its single child
    when it re-executes (e.g. under `unshare`/`sh -c ... exec`, the PID stays the same)."""
    return warden.proc.pid


# -- the DNS stand-in -------------------------------------------------------------------------------
class DnsLog:
    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self.sock.settimeout(0.2)
        self.names: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def queried(self, needle: str) -> bool:
        with self.lock:
            return any(needle.lower() in n.lower() for n in self.names)

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            name, end = _qname(data)
            with self.lock:
                self.names.append(name)
            if end < 0 or len(data) < 12:
                continue
            (ident, _flags) = struct.unpack("!HH", data[:4])
            # NXDOMAIN: QR=1, opcode 0, RD copied, RA=1, RCODE=3; the question echoed back.
            flags = 0x8000 | (_flags & 0x0100) | 0x0080 | 3
            reply = struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 0) + data[12:end + 4]
            with contextlib.suppress(OSError):
                self.sock.sendto(reply, peer)


def _qname(data: bytes) -> tuple[str, int]:
    labels, i = [], 12
    try:
        while data[i] != 0:
            n = data[i]
            labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        return ".".join(labels), i + 1
    except IndexError:
        return ".".join(labels), -1


@contextlib.contextmanager
def run_dns_server(address: str = "127.0.0.1") -> Iterator[DnsLog]:
    dns = DnsLog(address)
    thread = threading.Thread(target=dns.serve, daemon=True)
    thread.start()
    try:
        yield dns
    finally:
        dns.stopping.set()
        dns.sock.close()
        thread.join(5)


# -- a TLS WebSocket origin ---------------------------------------------------------------------------
class WsOrigin:
    """Accepts WebSocket upgrades (wsproto), logs every message and every raw byte, echoes text
    messages, and answers the text `send-secret` with `server says <secret>`."""

    def __init__(self, ca: trustme.CA, secret: str) -> None:
        self.ctx = server_context(ca)
        self.secret = secret
        self.messages: list[str | bytes] = []
        self.raw = bytearray()
        self.upgrades: list[str] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
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

    def _connection(self, raw: socket.socket) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, CloseConnection, Message, Ping, Request, TextMessage

        raw.settimeout(20)
        conn: socket.socket = raw
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            ws = WSConnection(ConnectionType.SERVER)
            while not self.stopping.is_set():
                data = conn.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.raw += data
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, Request):
                        with self.lock:
                            self.upgrades.append(event.target)
                        offered = [e for e in event.extensions if "permessage-deflate" in str(e)]
                        extensions: list[Any] = []
                        if offered:
                            from wsproto.extensions import PerMessageDeflate

                            extensions = [PerMessageDeflate()]
                        conn.sendall(ws.send(AcceptConnection(extensions=extensions)))
                    elif isinstance(event, Message):
                        with self.lock:
                            self.messages.append(event.data)
                        if isinstance(event, TextMessage):
                            text = f"server says {self.secret}" if event.data == "send-secret" else event.data
                            conn.sendall(ws.send(TextMessage(data=text)))
                    elif isinstance(event, Ping):
                        conn.sendall(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        conn.sendall(ws.send(event.response()))
                        return
        except Exception:  # a test origin: any failure ends the connection
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
                raw.close()


@contextlib.contextmanager
def run_ws_origin(ca: trustme.CA, secret: str) -> Iterator[WsOrigin]:
    origin = WsOrigin(ca, secret)
    thread = threading.Thread(target=origin.serve, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        origin.stopping.set()
        origin.sock.close()
        thread.join(5)


class WsClient:
    """A WebSocket client (wsproto) over an established Warden tunnel."""

    def __init__(self, sock: socket.socket, host: str, target: str = "/ws", deflate: bool = False) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import Request

        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Any] = []
        extensions: list[Any] = []
        if deflate:
            from wsproto.extensions import PerMessageDeflate

            extensions = [PerMessageDeflate()]
        sock.sendall(self.ws.send(Request(host=host, target=target, extensions=extensions)))
        self.accepted: Any = None
        self.rejected: Any = None
        self.reject_body = b""

    def events(self, until: Callable[[list[Any]], bool], timeout: float = 10) -> list[Any]:
        from wsproto.events import RejectData

        deadline = time.monotonic() + timeout
        while not until(self.pending) and time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not data:
                self.ws.receive_data(None)
                self.pending += list(self.ws.events())
                break
            self.ws.receive_data(data)
            for ev in self.ws.events():
                if isinstance(ev, RejectData):
                    self.reject_body += ev.data
                self.pending.append(ev)
        return self.pending

    def send(self, event: Any) -> None:
        self.sock.sendall(self.ws.send(event))


# -- an MCP server whose tools log that they ran ------------------------------------------------------
@dataclass
class LoggedMcp:
    port: int
    calls: list[str]


@contextlib.contextmanager
def run_logged_mcp_server(ca: trustme.CA, tmp: Path) -> Iterator[LoggedMcp]:
    import uvicorn
    from mcp.server.mcpserver import MCPServer
    from mcp.server.transport_security import TransportSecuritySettings

    calls: list[str] = []
    srv = MCPServer("logged")

    @srv.tool(description="Current weather for a location")
    def get_weather(location: str) -> str:
        calls.append("get_weather")
        return f"sunny in {location}"

    @srv.tool(description="Delete every file. Dangerous.")
    def delete_all() -> str:
        calls.append("delete_all")
        return "deleted everything"

    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = srv.streamable_http_app(json_response=True, transport_security=security)
    cert = ca.issue_cert(*ORIGIN_NAMES, "127.0.0.1")
    cert_file, key_file = tmp / "logged-mcp-cert.pem", tmp / "logged-mcp-key.pem"
    cert_file.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
                            log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=15)
    try:
        yield LoggedMcp(port, calls)
    finally:
        uv.should_exit = True
        thread.join(10)


# -- an HTTP/2 origin -----------------------------------------------------------------------------------
class H2Origin:
    """A TLS origin that speaks only HTTP/2 (ALPN h2, the `h2` library): logs every request's
    headers and body and answers a JSON-RPC `tools/call` as if it had run the tool."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ctx = server_context(ca, alpn=["h2"])
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
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

    def _connection(self, raw: socket.socket) -> None:
        import json

        import h2.config
        import h2.connection
        import h2.events

        raw.settimeout(20)
        conn: socket.socket = raw
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            h2c.initiate_connection()
            conn.sendall(h2c.data_to_send())
            streams: dict[int, tuple[dict[str, str], bytearray]] = {}
            while not self.stopping.is_set():
                data = conn.recv(65536)
                if not data:
                    break
                for ev in h2c.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        hdrs = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                                for k, v in ev.headers}
                        streams[ev.stream_id] = (hdrs, bytearray())
                    elif isinstance(ev, h2.events.DataReceived):
                        streams[ev.stream_id][1].extend(ev.data)
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        hdrs, body = streams.pop(ev.stream_id)
                        with self.lock:
                            self.requests.append((hdrs, bytes(body)))
                        try:
                            msg = json.loads(body or b"null")
                        except ValueError:
                            msg = None
                        rpc_id = msg.get("id") if isinstance(msg, dict) else None
                        out = json.dumps({"jsonrpc": "2.0", "id": rpc_id, "result": {
                            "content": [{"type": "text", "text": "ran it"}], "isError": False}}).encode()
                        h2c.send_headers(ev.stream_id, [(":status", "200"), ("content-type", "application/json"),
                                                        ("content-length", str(len(out)))])
                        h2c.send_data(ev.stream_id, out, end_stream=True)
                conn.sendall(h2c.data_to_send())
        except Exception:  # a test origin: any failure ends the connection
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()
                raw.close()


@contextlib.contextmanager
def run_h2_origin(ca: trustme.CA, origin_class: type[H2Origin] = H2Origin) -> Iterator[H2Origin]:
    """`origin_class`: an H2Origin whose `_connection` answers otherwise."""
    origin = origin_class(ca)
    thread = threading.Thread(target=origin.serve, daemon=True)
    thread.start()
    try:
        yield origin
    finally:
        origin.stopping.set()
        origin.sock.close()
        thread.join(5)


# -- TLS whose ClientHello leaves in two writes ------------------------------------------------------
class SplitHelloTLS:
    """TLS over a plain socket through MemoryBIOs, so the ClientHello can be split into two TCP writes."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, host: str, first: int, pause: float) -> None:
        self.sock = sock
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=host)
        with contextlib.suppress(ssl.SSLWantReadError):
            self.obj.do_handshake()
        hello = self.out.read()
        sock.sendall(hello[:first])
        time.sleep(pause)
        sock.sendall(hello[first:])
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            self.inc.write(data)
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = self.out.read()
                if pending:
                    sock.sendall(pending)
        pending = self.out.read()
        if pending:
            sock.sendall(pending)

    def sendall(self, data: bytes) -> None:
        self.obj.write(data)
        self.sock.sendall(self.out.read())

    def read_response(self, timeout: float = 10) -> Response | None:
        """One HTTP/1.1 response with Content-Length, or None if the peer closed first."""
        self.sock.settimeout(timeout)
        buf = b""
        while True:
            while True:
                try:
                    buf += self.obj.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    break
            head, sep, body = buf.partition(b"\r\n\r\n")
            if sep:
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                if len(body) >= int(headers.get("content-length", "0")):
                    return Response(int(lines[0].split()[1]), headers, body)
            data = self.sock.recv(65536)
            if not data:
                return None
            self.inc.write(data)

    def close(self) -> None:
        self.sock.close()


# -- an HTTP/2 client over an established TLS socket --------------------------------------------------
def h2_get(sock: socket.socket, authority: str, path: str, timeout: float = 10) -> int | None:
    """One HTTP/2 GET; its status, or None when the peer closed or reset the stream first."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)],
                      end_stream=True)
    sock.sendall(conn.data_to_send())
    sock.settimeout(timeout)
    status: int | None = None
    while True:
        try:
            data = sock.recv(65536)
        except (TimeoutError, OSError):
            return status
        if not data:
            return status
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived):
                status = int(dict((k if isinstance(k, bytes) else k.encode(), v) for k, v in ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived):
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                sock.sendall(conn.data_to_send())
                return status
        sock.sendall(conn.data_to_send())


def client_hello_record(sni_list: list[bytes] | None, extra: bytes = b"", alpn: bytes | None = None) -> bytes:
    """A hand-built ClientHello in one TLS record: the server_name list given (None: no server_name
    extension), an ALPN extension body if given, then `extra` extensions. Its random is 0x11 x 32."""
    exts = b""
    if sni_list is not None:
        names = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in sni_list)
        body = struct.pack("!H", len(names)) + names
        exts = b"\x00\x00" + struct.pack("!H", len(body)) + body
    if alpn is not None:
        exts += b"\x00\x10" + struct.pack("!H", len(alpn)) + alpn
    exts += extra
    body = b"\x03\x03" + b"\x11" * 32 + b"\x00" + struct.pack("!H", 2) + b"\x13\x01" + b"\x01\x00" \
        + struct.pack("!H", len(exts)) + exts
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs
