#!/usr/bin/env python3
"""Memory per connection (issue 17): Warden's RSS with many concurrent idle connections.

    .venv/bin/python bench/conn_memory_bench.py [--tunnels 10000] [--intercepted 1000]

1. `--tunnels` idle passthrough tunnels: CONNECT passthrough.test, then a real TLS
   ClientHello (so Warden decides the tunnel and opens the upstream connection), then
   nothing. The upstream is a TCP sink in this process that accepts and holds every
   connection; the harness waits until the sink holds them all (a positive condition).
2. `--intercepted` intercepted keep-alive connections: CONNECT intercept.test, TLS with
   Warden's CA, one GET answered 200 by nginx, then the connection stays open.

Reports VmRSS of Warden's process tree before and with the connections open, and
(RSS with - RSS before) / connections. Everything is on 127.0.0.1; RLIMIT_NOFILE is raised
for this process and the Warden it starts; the whole run is bounded by an alarm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import resource
import selectors
import signal
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib.procs import tree_rss_mib, wait_until
from benchlib.proxies import PROXY_AUTH_HEADER, WARDEN, ProxySpec, rules_yaml, start_proxy
from benchlib.report import f, table
from benchlib.results import write_results
from benchlib.session import bench_session

HARD_LIMIT_S = 900
IO_TIMEOUT_S = 60.0
OPENERS = 16  # client threads opening connections


class Sink:
    """A TCP server that accepts and holds connections, discarding what they send."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.got_data = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        self.sock.setblocking(False)
        sel.register(self.sock, selectors.EVENT_READ)
        seen: set[int] = set()
        while not self._stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                if key.fileobj is self.sock:
                    try:
                        conn, _ = self.sock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self.held.append(conn)
                    sel.register(conn, selectors.EVENT_READ)
                else:
                    conn = key.fileobj  # type: ignore[assignment]
                    try:
                        data = conn.recv(65536)
                    except (BlockingIOError, ConnectionError):
                        continue
                    if not data:
                        sel.unregister(conn)
                    elif conn.fileno() not in seen:
                        seen.add(conn.fileno())
                        self.got_data += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.sock.close()


def client_hello(host: str) -> bytes:
    """The bytes of a real TLS ClientHello for `host`."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    with contextlib.suppress(ssl.SSLWantReadError):  # no server: the hello is all we want
        tls.do_handshake()
    return outgoing.read()


def connect_through(proxy_port: int, host: str, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proxy_port), timeout=IO_TIMEOUT_S)
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{PROXY_AUTH_HEADER}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)  # byte-wise: nothing after the CONNECT answer may be swallowed
        if not chunk:
            raise RuntimeError("proxy closed during CONNECT")
        head += chunk
    if not head.startswith(b"HTTP/1.1 200"):
        body = s.recv(300)
        raise RuntimeError(f"CONNECT refused: {head[:40]!r} {body!r}")
    return s


def held_open(n: int) -> ProxySpec:
    """Warden told to hold `n` connections (and the warm-up's): its derived warden_max_connections
    keeps a quarter of the descriptor limit for the kernel relay, which idle tunnels never use."""
    return dataclasses.replace(WARDEN, argv=lambda env, port, extra: [
        *WARDEN.argv(env, port, extra), "--set", f"warden_max_connections={n + 64}"])


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(need, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def settle_rss(pid: int) -> float:
    """VmRSS once it stops moving (two readings 0.5 s apart within 1%), at most 10 s."""
    last = tree_rss_mib(pid)
    for _ in range(20):
        time.sleep(0.5)
        now = tree_rss_mib(pid)
        if abs(now - last) <= 0.01 * last:
            return now
        last = now
    return last


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tunnels", type=int, default=10000)
    p.add_argument("--intercepted", type=int, default=1000)
    args = p.parse_args()
    signal.alarm(HARD_LIMIT_S)
    limit = raise_fd_limit(2 * max(args.tunnels, args.intercepted) + 1024)
    # Warden holds two descriptors per tunnel (client and upstream), and so does this process
    # (client and sink): without CAP_SYS_RESOURCE the hard limit caps what can be tested.
    fit = (limit - 600) // 2
    notes = []
    for name in ("tunnels", "intercepted"):
        if getattr(args, name) > fit:
            notes.append(f"--{name} {getattr(args, name):,} lowered to {fit:,}: RLIMIT_NOFILE hard limit {limit}")
            setattr(args, name, fit)
    for note in notes:
        print(f"conn_memory: {note}", file=sys.stderr)
    rows = []
    with bench_session() as sess:
        env, sink = sess.env, Sink()
        try:
            extra = (f"      - host: passthrough.test\n        ports: [{sink.port}]\n"
                     f"      - cidr: 127.0.0.1/32\n        ports: [{sink.port}]\n")
            (env.rules_dir / "bench.yaml").write_text(rules_yaml(
                env.origin, env.hosts_file, extra_allow=extra,
                # one agent holds all of them (only builds with connection limits know the key)
                extra_settings="  limits: {max_connections_per_agent: 100000}\n"))
            hello = client_hello("passthrough.test")
            ca = Path(env.confdir) / "mitmproxy-ca-cert.pem"
            ctx = ssl.create_default_context(cafile=str(ca))

            def tunnel(port: int) -> socket.socket:
                s = connect_through(port, "passthrough.test", sink.port)
                s.sendall(hello)
                return s

            def intercepted(port: int) -> ssl.SSLSocket:
                raw = connect_through(port, "intercept.test", env.origin.https_port)
                tls = ctx.wrap_socket(raw, server_hostname="intercept.test")
                tls.sendall(f"GET /128B HTTP/1.1\r\nHost: intercept.test:{env.origin.https_port}\r\n\r\n".encode())
                got = b""
                while b"\r\n\r\n" not in got or len(got) < got.index(b"\r\n\r\n") + 4 + 128:
                    chunk = tls.recv(65536)
                    if not chunk:
                        raise RuntimeError("closed before the response")
                    got += chunk
                if not got.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"intercepted GET: {got[:60]!r}")
                return tls

            for label, n, opener, ready in (
                ("idle passthrough tunnels", args.tunnels, tunnel, lambda k: sink.got_data >= k),
                ("intercepted keep-alive connections", args.intercepted, intercepted, lambda k: True),
            ):
                if n <= 0:
                    continue
                # A fresh Warden per kind: freed memory of one phase must not hide the next one's.
                rp = start_proxy(sess.procs, held_open(n), env)
                try:
                    for s in [intercepted(rp.port), tunnel(rp.port)]:  # warm-up: leaf cert, upstream TLS
                        s.close()
                    base = settle_rss(rp.proc.pid)
                    sink_before = sink.got_data
                    t0 = time.monotonic()
                    with ThreadPoolExecutor(OPENERS) as pool:
                        socks = list(pool.map(opener, [rp.port] * n))
                    if not wait_until(lambda n=n, b=sink_before, r=ready: r(b + n), timeout=120):
                        raise RuntimeError(f"{label}: the upstream side never saw all {n} connections")
                    opened_s = time.monotonic() - t0
                    rss = settle_rss(rp.proc.pid)
                    rows.append([label, f"{n:,}", f(base, 1), f(rss, 1), f((rss - base) * 1024 / n, 1),
                                 f(opened_s, 1)])
                    print(f"conn_memory: {label}: {n} open, RSS {base:.1f} -> {rss:.1f} MiB", flush=True)
                    for s in socks:
                        s.close()
                finally:
                    sess.procs.stop(rp.proc)
        finally:
            sink.close()
    text = ("# Warden memory per connection\n\n"
            f"RLIMIT_NOFILE {limit}; RSS = VmRSS of Warden's process tree (audit log and metrics on).\n\n"
            + "".join(f"* {note}\n" for note in notes) + ("\n" if notes else "")
            + table(["connections", "count", "RSS before MiB", "RSS with them open MiB", "KiB per connection",
                     "seconds to open"], rows))
    write_results("conn-memory", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
