"""Issue 12 item 10: a reload re-decides open passthrough tunnels and cuts the denied ones."""

from __future__ import annotations

import base64
import socket
import ssl
import time
from pathlib import Path

import pytest
import requests

from .control_helpers import wait_until
from .harness import Origin, Warden, hosts_file, sha256_hex, start_warden

pytestmark = pytest.mark.e2e
TOKENS = {"gone": "gone-token-1", "stays": "stays-token-2", "icpt": "icpt-token-3"}


class Tunnel:
    """A CONNECT tunnel through Warden with TLS to the origin inside (passthrough)."""

    def __init__(self, w: Warden, agent: str, host: str, port: int, ca_file: Path) -> None:
        raw = socket.create_connection(("127.0.0.1", w.port), timeout=10)
        auth = base64.b64encode(f"{agent}:{TOKENS[agent]}".encode()).decode()
        raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            assert chunk, "proxy closed the CONNECT"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        ctx = ssl.create_default_context(cafile=str(ca_file))
        self.sock = ctx.wrap_socket(raw, server_hostname=host)
        self.host, self.port = host, port

    def get(self) -> int:
        self.sock.sendall(f"GET /x HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += self.sock.recv(65536)
        return int(head.split()[1])

    def closed(self) -> bool:
        self.sock.settimeout(0.05)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except (OSError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


def test_reload_cuts_the_tunnels_it_denies(tmp_path: Path, tls_origin: Origin, origin_ca_file: Path,
                                           shared_confdir: Path) -> None:
    port = tls_origin.port
    allow = [{"host": "allowed.test", "ports": [port]}, {"cidr": "127.0.0.1/32", "ports": [port]}]
    rules = {"agents": [{"id": a, "token_sha256": [sha256_hex(t)], "policies": [a]} for a, t in TOKENS.items()],
             "policies": {"gone": {"allow": allow}, "stays": {"allow": allow},
                          "icpt": {"allow": [{"host": "api.test", "ports": [port], "paths": ["/**"]},
                                             {"cidr": "127.0.0.1/32", "ports": [port]}]}},
             "settings": {"hosts_file": str(hosts_file(tmp_path / "hosts"))}}
    w = start_warden(tmp_path, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents=TOKENS)
    doomed = Tunnel(w, "gone", "allowed.test", port, origin_ca_file)
    kept = Tunnel(w, "stays", "allowed.test", port, origin_ca_file)
    session = requests.Session()
    session.trust_env = False
    try:
        assert doomed.get() == 200 and kept.get() == 200
        intercepted = session.get(f"https://api.test:{port}/x", proxies={"https": w.proxy_url("icpt")},
                                  verify=str(w.ca_cert), timeout=10)
        assert intercepted.status_code == 200
        rules["agents"] = [a for a in rules["agents"] if a["id"] == "stays"]
        del rules["policies"]["gone"], rules["policies"]["icpt"]
        started = time.monotonic()
        w.write_rules(rules)
        assert wait_until(doomed.closed, timeout=10), "the revoked agent's tunnel stayed open"
        took = time.monotonic() - started
        assert took < 3.0, took
        assert kept.get() == 200  # still allowed: untouched
        refused = session.get(f"https://api.test:{port}/x", proxies={"https": w.proxy_url("icpt")},
                              verify=str(w.ca_cert), timeout=10)
        assert refused.status_code in (403, 407)  # the intercepted tunnel refuses its next request
        records = w.audit_records(lambda rs: any(r.get("event") == "tunnel_revoked" for r in rs)
                                  and any(r.get("event") == "tunnel_close" and r.get("agent") == "gone" for r in rs))
        revoked = [r for r in records if r.get("event") == "tunnel_revoked"]
        assert len(revoked) == 1, revoked
        assert revoked[0]["agent"] == "gone" and revoked[0]["host"] == "allowed.test"
        assert revoked[0]["decision"] == "deny" and revoked[0]["reason"] == "auth_failed"
        assert revoked[0]["revocation"] == "denied" and revoked[0]["policy_version"] != records[0].get("policy_version")
        reload_seq = next(r["seq"] for r in records if r.get("event") == "reload")
        assert revoked[0]["seq"] > reload_seq
        assert 'warden_tunnels_revoked_total{agent="gone",reason="auth_failed"} 1.0' in w.metrics_text()
    finally:
        doomed.close()
        kept.close()
        session.close()
        w.stop()
