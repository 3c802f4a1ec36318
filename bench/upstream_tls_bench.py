"""What resuming an upstream TLS session saves Warden, per upstream connection (issue 17).

Warden's side of an upstream handshake, as mitmproxy makes it (pyOpenSSL, the context of
`mitmproxy.net.tls.create_proxy_server_context`, VERIFY_PEER with hostname check), full and
resumed, against `openssl s_server` on 127.0.0.1, with two kinds of certificate:

  short     one ECDSA leaf signed by its root, the root alone as the trust store (what the
            `make bench` origin uses)
  web-like  an RSA-2048 leaf and intermediate under an RSA root, the system CA bundle plus
            that root as the trust store (what public upstreams look like)

Reports the CPU of this process (the client side) per connection, median of the rounds.

    .venv/bin/python bench/upstream_tls_bench.py [--connections 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL

NAME = b"upstream.test"
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _server(tmp: Path, kind: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    if kind == "short":
        root = trustme.CA()
        leaf = root.issue_cert(NAME.decode())
        trust = root.cert_pem.bytes()
    else:
        root = trustme.CA(key_type=trustme.KeyType.RSA)
        leaf = root.create_child_ca(key_type=trustme.KeyType.RSA).issue_cert(NAME.decode(), key_type=trustme.KeyType.RSA)
        trust = (SYSTEM_BUNDLE.read_bytes() if SYSTEM_BUNDLE.exists() else b"") + root.cert_pem.bytes()
    (tmp / f"{kind}-leaf.pem").write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
    (tmp / f"{kind}-chain.pem").write_bytes(b"".join(c.bytes() for c in leaf.cert_chain_pems[1:]) or leaf.cert_chain_pems[0].bytes())
    (tmp / f"{kind}-trust.pem").write_bytes(trust)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(tmp / f"{kind}-leaf.pem"),
            "-www", "-quiet", "-naccept", "1000000"]
    if len(leaf.cert_chain_pems) > 1:
        argv += ["-cert_chain", str(tmp / f"{kind}-chain.pem")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port, tmp / f"{kind}-trust.pem"


def _context(trust: Path) -> SSL.Context:
    return net_tls.create_proxy_server_context(
        method=net_tls.Method.TLS_CLIENT_METHOD, min_version=net_tls.Version.TLS1_2,
        max_version=net_tls.Version.UNBOUNDED, cipher_list=None, ecdh_curve=None, verify=net_tls.Verify.VERIFY_PEER,
        ca_path=None, ca_pemfile=str(trust), client_cert=None, legacy_server_connect=False)


def _connect(ctx: SSL.Context, port: int, session: SSL.Session | None) -> tuple[bool, SSL.Session | None]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(None)  # pyOpenSSL reads a socket with a timeout as non-blocking
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(NAME)
    param = SSL._lib.SSL_get0_param(conn._ssl)  # type: ignore[attr-defined]  # noqa: SLF001 - as mitmproxy does
    SSL._lib.X509_VERIFY_PARAM_set1_host(param, NAME, len(NAME))  # type: ignore[attr-defined]  # noqa: SLF001
    conn.set_connect_state()
    if session is not None:
        conn.set_session(session)
    conn.do_handshake()
    conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
    try:
        while conn.recv(65536):
            pass
    except (SSL.ZeroReturnError, SSL.SysCallError):
        pass
    reused = bool(SSL._lib.SSL_session_reused(conn._ssl))  # type: ignore[attr-defined]  # noqa: SLF001
    new = conn.get_session()
    conn.set_shutdown(SSL.SENT_SHUTDOWN)  # as Warden does: keep the session resumable
    sock.close()
    return reused, new


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print("| certificate | full handshake, ms CPU | resumed, ms CPU | saved | resumed / tried |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for kind in ("short", "web-like"):
            proc, port, trust = _server(Path(d), kind)
            try:
                ctx = _context(trust)
                _, session = _connect(ctx, port, None)
                times: dict[str, list[float]] = {"full": [], "resumed": []}
                reused_total = 0
                for _ in range(args.rounds):
                    for label in ("full", "resumed"):
                        started = time.process_time()
                        for _ in range(args.connections):
                            reused, new = _connect(ctx, port, session if label == "resumed" else None)
                            if label == "resumed":
                                reused_total += reused
                                session = new
                        times[label].append((time.process_time() - started) / args.connections * 1000)
                full, resumed = statistics.median(times["full"]), statistics.median(times["resumed"])
                print(f"| {kind} | {full:.3f} | {resumed:.3f} | {full - resumed:.3f} | "
                      f"{reused_total}/{args.rounds * args.connections} |", flush=True)
            finally:
                proc.kill()
                proc.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
