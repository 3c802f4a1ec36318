"""`warden run --workers N`: N proxy processes on one port, so that every core is used.

How it works: this supervisor process validates the rules, then starts N worker processes
(`warden run` with a hidden `--worker-index`). Each worker binds the proxy port with
SO_REUSEPORT, so the kernel spreads new client connections across them; a connection stays
on the worker that accepted it, so per-connection state (identity, tunnel, pinned address)
needs no sharing. Each worker writes its own audit chain (`audit.w<i>.jsonl`, verifiable on
its own) and records metrics in prometheus-client's multiprocess mode (one file per process
in a private directory); the supervisor serves the merged `/metrics` and a `/healthz` that is
200 only when every worker is alive and healthy. A worker that dies is restarted (at most
once per second) and its live gauges are dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_audit_path(path: str, index: int) -> str:
    """audit.jsonl -> audit.w0.jsonl: one hash chain per worker."""
    if path == "-":
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.w{index}{p.suffix}"))


def enable_reuse_port() -> None:
    """Make mitmproxy's listener bind with SO_REUSEPORT (only ever called in a worker process).

    mitmproxy opens its TCP listener with `asyncio.start_server(handler, host, port)` and has
    no option for SO_REUSEPORT; wrapping the function in this process is the smallest change.
    """
    import asyncio
    import functools

    if not getattr(asyncio.start_server, "_warden_reuse_port", False):
        wrapped = functools.partial(asyncio.start_server, reuse_port=True)
        # A marker on the partial (which has no such attribute) so a second call does not wrap twice.
        wrapped._warden_reuse_port = True  # type: ignore[attr-defined]
        asyncio.start_server = wrapped


class _Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str], state_dir: Path) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.port_file = state_dir / f"worker{index}.port"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, env=self.env)

    def metrics_port(self) -> int | None:
        try:
            return int(self.port_file.read_text())
        except (OSError, ValueError):
            return None


class _Supervisor:
    def __init__(self, args: argparse.Namespace, state_dir: Path) -> None:
        self.args = args
        self.state_dir = state_dir
        self.stopping = threading.Event()
        env = {**os.environ, MULTIPROC_ENV: str(state_dir / "metrics")}
        (state_dir / "metrics").mkdir()
        self.workers = [_Worker(i, self._worker_argv(i), env, state_dir) for i in range(args.workers)]

    def _worker_argv(self, index: int) -> list[str]:
        a = self.args
        argv = [sys.executable, "-m", "egresswarden", "run", "--rules", a.rules,
                "--listen", f"{a.listen[0]}:{a.listen[1]}", "--metrics-listen", "127.0.0.1:0",
                "--audit-log", worker_audit_path(a.audit_log, index), "--confdir", a.confdir,
                "--worker-index", str(index),
                "--set", f"warden_metrics_port_file={self.state_dir / f'worker{index}.port'}"]
        for item in a.set or []:
            argv += ["--set", item]
        if a.verbose:
            argv.append("-v")
        return argv

    def health(self) -> tuple[int, dict[str, Any]]:
        reports = []
        ok = True
        for w in self.workers:
            alive = w.proc is not None and w.proc.poll() is None
            report: dict[str, Any] = {"worker": w.index, "alive": alive}
            port = w.metrics_port()
            if alive and port:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                        report.update(json.loads(r.read()))
                except urllib.error.HTTPError as e:
                    report.update(json.loads(e.read() or b"{}"))
                    e.close()
                except (OSError, ValueError):
                    report["status"] = "unreachable"
            ok = ok and alive and report.get("status") == "ok"
            reports.append(report)
        first = reports[0] if reports else {}
        body = {"status": "ok" if ok else "unhealthy", "rules_loaded": first.get("rules_loaded", 0),
                "policy_version": first.get("policy_version"),
                "audit_writable": all(r.get("audit_writable") is True for r in reports), "workers": reports}
        return (200 if ok else 503), body

    def metrics(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.state_dir / "metrics"))
        return generate_latest(registry)

    def serve(self) -> ThreadingHTTPServer | None:
        if self.args.metrics_listen is None:
            return None
        supervisor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, body, ctype = 200, supervisor.metrics(), "text/plain; version=0.0.4; charset=utf-8"
                elif path == "/healthz":
                    status, report = supervisor.health()
                    body, ctype = json.dumps(report).encode(), "application/json"
                else:
                    status, body, ctype = 404, b"not found: try /metrics or /healthz\n", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        host, port = self.args.metrics_listen
        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="warden-supervisor-metrics", daemon=True).start()
        return server

    def run(self) -> int:
        from prometheus_client.multiprocess import mark_process_dead

        for w in self.workers:
            w.start()
        server = self.serve()
        try:
            while not self.stopping.wait(0.2):
                for w in self.workers:
                    assert w.proc is not None
                    code = w.proc.poll()
                    if code is None:
                        continue
                    mark_process_dead(w.proc.pid, str(self.state_dir / "metrics"))
                    if time.monotonic() - w.started < 1.0:
                        time.sleep(1.0)  # crash loop: at most one restart per second
                    print(f"warden: worker {w.index} (pid {w.proc.pid}) exited with {code}; restarting",
                          file=sys.stderr, flush=True)
                    w.start()
        finally:
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is None:
                    w.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for w in self.workers:
                if w.proc is not None:
                    try:
                        w.proc.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        w.proc.kill()
                        w.proc.wait(5)
            if server is not None:
                server.shutdown()
                server.server_close()
        return 0


def run_workers(args: argparse.Namespace) -> int:
    state_dir = Path(tempfile.mkdtemp(prefix="warden-workers-"))
    supervisor = _Supervisor(args, state_dir)

    def stop(*_: object) -> None:
        supervisor.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return supervisor.run()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
