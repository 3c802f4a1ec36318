"""Issue 11 finding 7: Warden's memory stays bounded for any body size, in either direction.

Shared by tests/test_bypass_e2e.py (256 MiB) and bench/bench_memory.py (1 GiB). One `warden
run` with one intercepted credential host (redaction on), a byte-logging TLS origin that
serves a download of N bytes with the secret planted across chunk boundaries, and a raw
agent that reads the download (checking every byte for the secret) and sends chunked
uploads. Memory is Warden's peak resident set (VmHWM in /proc/PID/status) before and after.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

from .bypass_helpers import (
    SeenRequest,
    open_tunnel,
    peak_rss_kib,
    read_response,
    rss_kib,
    run_logging_origin,
)
from .harness import hosts_file, sha256_hex, start_warden

SECRET = "mem-secret-4b3a2c1d0e9f8a7b6c5d"
OTHER_SECRET = "other-secret-0f1e2d3c4b5a6978"
TOKEN = "tok-mem"
MIB = 1024 * 1024
PLANT_EVERY = 8 * MIB  # the secret is planted once per 8 MiB, straddling a 64 KiB write boundary
REDACTED = b"[REDACTED by warden]"


def _download(size: int) -> Iterator[bytes]:
    block = bytes(range(32, 127)) * (65536 // 95 + 1)
    block = block[:65536]
    sent = 0
    secret = SECRET.encode()
    while sent < size:
        n = min(65536, size - sent)
        chunk = bytearray(block[:n])
        if (sent + 65536) % PLANT_EVERY == 0 and n == 65536:
            chunk[-10:] = secret[:10]  # the rest starts the next chunk
        elif sent % PLANT_EVERY == 0 and sent and n > len(secret):
            chunk[:len(secret) - 10] = secret[10:]
        sent += n
        yield bytes(chunk)


def planted(size: int) -> int:
    return max(0, (size - 1) // PLANT_EVERY)


def handler(req: SeenRequest) -> tuple[int, dict[str, str], bytes | Iterator[bytes]]:
    if req.target.startswith("/download/"):
        size = int(req.target.rsplit("/", 1)[1])
        return 200, {"Content-Type": "application/octet-stream", "Content-Length": str(size)}, _download(size)
    return 200, {"Content-Type": "text/plain"}, f"received {req.body_size} bytes\n".encode()


@dataclass
class MemoryResult:
    baseline_hwm_kib: int
    after_download_hwm_kib: int
    after_upload_hwm_kib: int
    rss_after_kib: int
    downloaded: int
    redactions: int
    secret_seen_by_agent: bool
    upload_received: int
    leak_status: int
    leak_reached_origin: bool

    @property
    def download_growth_mib(self) -> float:
        return (self.after_download_hwm_kib - self.baseline_hwm_kib) / 1024

    @property
    def upload_growth_mib(self) -> float:
        return (self.after_upload_hwm_kib - self.after_download_hwm_kib) / 1024


def _read_download(sock: ssl.SSLSocket, port: int, size: int) -> tuple[int, int, bool]:
    sock.sendall(f"GET /download/{size} HTTP/1.1\r\nHost: cred.test:{port}\r\n\r\n".encode())
    resp = http.client.HTTPResponse(sock, method="GET")  # type: ignore[arg-type]
    resp.begin()
    assert resp.status == 200, resp.status
    total = redactions = 0
    tail = b""
    secret = SECRET.encode()
    leaked = False
    while True:
        piece = resp.read(MIB)
        if not piece:
            break
        total += len(piece)
        window = tail + piece
        leaked = leaked or secret in window
        # count markers that end in this piece (a marker split across pieces is counted once)
        redactions += window.count(REDACTED) - tail.count(REDACTED)
        tail = window[-(len(REDACTED) + len(secret)):]
    return total, redactions, leaked


def _upload(sock: ssl.SSLSocket, port: int, size: int, plant: bytes | None) -> int:
    sock.sendall(f"POST /upload HTTP/1.1\r\nHost: cred.test:{port}\r\nTransfer-Encoding: chunked\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n".encode())
    piece = b"u" * (256 * 1024)
    sent = 0
    while sent < size:
        chunk = piece[:min(len(piece), size - sent)]
        if plant is not None and sent + len(chunk) >= size:
            chunk = chunk[:-len(plant) - 7] + plant + chunk[-7:]
        sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        sent += len(chunk)
    sock.sendall(b"0\r\n\r\n")
    return read_response(sock, "POST").status


def measure(work: Path, ca: trustme.CA, ca_file: Path, *, download: int, upload: int,
            confdir: Path | None = None) -> MemoryResult:
    with run_logging_origin(handler, ca=ca, watch=[OTHER_SECRET.encode()]) as origin:
        ports = [origin.port]
        rules = {
            "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
            "policies": {"p": {
                "allow": [{"id": "cred", "host": "cred.test", "ports": ports, "addresses": ["127.0.0.1/32"]}],
                "credentials": [
                    {"id": "mem", "host": "cred.test", "ports": ports,
                     "inject": {"Authorization": "Bearer ${secret:MEM_SECRET}"}, "strip": ["Authorization"]},
                    {"id": "other", "host": "other.test", "inject": {"X-Key": "${secret:OTHER_SECRET}"}},
                ],
            }},
            "settings": {"hosts_file": str(hosts_file(work / "hosts"))},
        }
        warden = start_warden(work, rules, upstream_ca=ca_file, confdir=confdir,
                              env={"MEM_SECRET": SECRET, "OTHER_SECRET": OTHER_SECRET}, agents={"coder": TOKEN})
        try:
            pid = warden.proc.pid
            with open_tunnel(warden, "coder", "cred.test", origin.port) as s:  # warm-up: every code path once
                _read_download(s, origin.port, 4 * MIB)
            with open_tunnel(warden, "coder", "cred.test", origin.port) as s:
                assert _upload(s, origin.port, 2 * MIB, None) == 200
            baseline = peak_rss_kib(pid)
            with open_tunnel(warden, "coder", "cred.test", origin.port, timeout=120) as s:
                downloaded, redactions, leaked = _read_download(s, origin.port, download)
            after_download = peak_rss_kib(pid)
            origin.reset()
            with open_tunnel(warden, "coder", "cred.test", origin.port, timeout=120) as s:
                assert _upload(s, origin.port, upload, None) == 200
            received = origin.requests[-1].body_size if origin.requests else -1
            with open_tunnel(warden, "coder", "cred.test", origin.port, timeout=120) as s:
                leak_status = _upload(s, origin.port, upload, OTHER_SECRET.encode())
            after_upload = peak_rss_kib(pid)
            return MemoryResult(baseline, after_download, after_upload, rss_kib(pid), downloaded, redactions,
                                leaked, received, leak_status, origin.saw(OTHER_SECRET.encode()))
        finally:
            warden.stop()
