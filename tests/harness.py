"""Real parts for end-to-end tests: TLS origins on 127.0.0.1 and a `warden run` subprocess.

Everything binds 127.0.0.1 on ports the OS picks, every wait is bounded, and processes are
stopped by PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme
import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
WARDEN = str(VENV_BIN / "warden")
MITMDUMP = str(VENV_BIN / "mitmdump")
ORIGIN_NAMES = ["allowed.test", "api.test", "other.test", "denied.test", "front.test", "cred.test", "leak.test",
                "mcp.test", "internal.test", "localhost"]


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


# -- origins ---------------------------------------------------------------------------------
Handler = Callable[[BaseHTTPRequestHandler, bytes], tuple[int, dict[str, str], bytes]]


def echo_handler(req: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, str], bytes]:
    """Default origin behaviour: answer with what it received, as JSON."""
    payload = {"method": req.command, "path": req.path, "headers": dict(req.headers.items()),
               "body": body.decode("utf-8", "replace"), "port": req.server.server_address[1]}
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


class _OriginHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _OriginServer

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers.items()),
                                 "body": body})
        status, headers, out = self.server.handler(self, body)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _OriginServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, handler: Handler, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        self.handler = handler
        self.seen: list[dict[str, Any]] = []
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)


@dataclass
class Origin:
    server: _OriginServer
    tls: bool

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self.server.seen


@contextlib.contextmanager
def run_origin(handler: Handler = echo_handler, ca: trustme.CA | None = None) -> Iterator[Origin]:
    ctx = None
    if ca is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*ORIGIN_NAMES, "127.0.0.1").configure_cert(ctx)
    server = _OriginServer(handler, ctx)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield Origin(server, ca is not None)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- warden ----------------------------------------------------------------------------------
@dataclass
class Warden:
    """A running `warden run` subprocess and the files it uses."""

    proc: subprocess.Popen
    port: int
    metrics_port: int
    workdir: Path
    rules_dir: Path
    audit_path: Path
    ca_cert: Path
    stdout_path: Path
    stderr_path: Path
    agents: dict[str, str] = field(default_factory=dict)  # agent -> token

    def proxy_url(self, agent: str | None = None, token: str | None = None) -> str:
        if agent is None:
            return f"http://127.0.0.1:{self.port}"
        token = token if token is not None else self.agents[agent]
        return f"http://{agent}:{token}@127.0.0.1:{self.port}"

    def audit_records(self, wait_for: Callable[[list[dict]], bool] | None = None, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            records = []
            if self.audit_path.exists():
                records = [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]
            if wait_for is None or wait_for(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def metrics_text(self) -> str:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def write_rules(self, rules: dict[str, Any], name: str = "rules.yaml") -> None:
        tmp = self.rules_dir / f".{name}.tmp"
        tmp.write_text(yaml.safe_dump(rules, sort_keys=False))
        os.replace(tmp, self.rules_dir / name)  # atomic, as a config-management tool would

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")


def hosts_file(path: Path, names: list[str] = ORIGIN_NAMES) -> Path:
    path.write_text("".join(f"127.0.0.1 {n}\n" for n in names if n != "localhost"))
    return path


def start_warden(workdir: Path, rules: dict[str, Any] | list[tuple[str, dict[str, Any]]], *,
                 upstream_ca: Path | None = None, confdir: Path | None = None,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 agents: dict[str, str] | None = None, audit_log: str | None = None,
                 expect_start: bool = True) -> Warden:
    """Write the rules into workdir/rules and start `warden run` on free ports."""
    rules_dir = workdir / "rules"
    rules_dir.mkdir(parents=True, exist_ok=True)
    files = rules if isinstance(rules, list) else [("rules.yaml", rules)]
    for name, content in files:
        (rules_dir / name).write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    confdir = confdir or workdir / "certs"
    port, metrics_port = free_port(), free_port()
    audit_path = workdir / "audit.jsonl"
    args = [WARDEN, "run", "--rules", str(rules_dir), "--listen", f"127.0.0.1:{port}",
            "--metrics-listen", f"127.0.0.1:{metrics_port}", "--audit-log", audit_log or str(audit_path),
            "--confdir", str(confdir)]
    if upstream_ca is not None:
        args += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}"]
    args += extra_args or []
    stdout_path, stderr_path = workdir / "warden.stdout", workdir / "warden.stderr"
    full_env = {**os.environ, **(env or {})}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        full_env.pop(var, None)
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=full_env, cwd=workdir, start_new_session=True)
    warden = Warden(proc, port, metrics_port, workdir, rules_dir, audit_path, confdir / "mitmproxy-ca-cert.pem",
                    stdout_path, stderr_path, dict(agents or {}))
    if expect_start:
        try:
            wait_for_port(port, proc=proc)
            wait_for_port(metrics_port, proc=proc)
        except Exception:
            warden.stop()
            raise RuntimeError(f"warden did not start:\n{warden.output()}") from None
    return warden


def curl(args: list[str], env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    """Run curl with a clean proxy environment plus `env`."""
    full_env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    full_env.update(env or {})
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout)), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout + 5)
