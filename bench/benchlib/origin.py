"""The origin: nginx on 127.0.0.1 serving fixed bodies over HTTP and HTTPS.

Certificates for the *.test names come from trustme, written into the run's
temp dir (never into the repo).
"""

from __future__ import annotations

import hashlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from .procs import Proc, Procs, free_port, wait_until

CRED_SECRET = "bench-upstream-secret"  # what Warden injects for cred.test (env BENCH_TOKEN)

# probe.test: the reload bench toggles a deny rule for it to see when new rules take effect.
TEST_HOSTS = ("plain.test", "passthrough.test", "intercept.test", "cred.test", "denied.test", "probe.test")
BODIES = {"128B": 128, "1MiB": 1024 * 1024}


@dataclass(frozen=True)
class Origin:
    http_port: int
    https_port: int
    ca_pem: Path          # CA that signed the origin certificate
    cert_sha256: str      # sha256 of the origin's leaf certificate (DER)
    proc: Proc


def _write_certs(tmp: Path) -> tuple[Path, Path, str]:
    ca = trustme.CA(organization_name="warden-bench origin CA")
    leaf = ca.issue_cert(*TEST_HOSTS, "localhost", "127.0.0.1")
    ca_pem, srv_pem = tmp / "origin-ca.pem", tmp / "origin-server.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(srv_pem))
    os.chmod(srv_pem, 0o644)  # nginx workers run as nobody
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return ca_pem, srv_pem, hashlib.sha256(der).hexdigest()


def _write_bodies(docroot: Path) -> None:
    docroot.mkdir(parents=True, exist_ok=True)
    for name, size in BODIES.items():
        (docroot / name).write_bytes(os.urandom(size))


def _nginx_conf(tmp: Path, docroot: Path, srv_pem: Path, http_port: int, https_port: int) -> Path:
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 10000000;   # never make the proxy reconnect mid-run
  keepalive_timeout 120s;
  default_type application/octet-stream;
  map $http_authorization $bench_auth {{ "Bearer {CRED_SECRET}" "injected"; "" "absent"; default "other"; }}
  server {{ listen 127.0.0.1:{http_port} backlog=4096; root {docroot}; }}
  server {{
    listen 127.0.0.1:{https_port} ssl backlog=4096;
    ssl_certificate {srv_pem};
    ssl_certificate_key {srv_pem};
    root {docroot};
    # Lets the harness see, independently of Warden, whether the credential was injected.
    # Answers a verdict, not the header: Warden redacts secrets echoed back in responses.
    location = /echo-auth {{ default_type text/plain; return 200 "$bench_auth"; }}
  }}
}}
""")
    return conf


def start_origin(procs: Procs, tmp: Path) -> Origin:
    ca_pem, srv_pem, sha = _write_certs(tmp)
    docroot = tmp / "docroot"
    _write_bodies(docroot)
    http_port, https_port = free_port(), free_port()
    conf = _nginx_conf(tmp, docroot, srv_pem, http_port, https_port)
    proc = procs.start("nginx", ["/usr/sbin/nginx", "-c", str(conf), "-p", str(tmp)])
    if not wait_until(lambda: _listening(https_port) and _listening(http_port), 10):
        raise RuntimeError(f"nginx did not start:\n{proc.log_tail()}")
    return Origin(http_port, https_port, ca_pem, sha, proc)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
