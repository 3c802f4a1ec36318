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

Signals: SIGTERM/SIGINT stop the workers (SIGTERM, then SIGKILL after 15 s) and the
supervisor; SIGHUP is forwarded to every worker, each of which reloads its rules, hosts file
and secrets (and audits it); SIGUSR1, SIGUSR2 and SIGPIPE are logged and ignored, so no signal
an operator sends leaves workers orphaned. A worker never outlives its supervisor: it asks
the kernel for SIGTERM when its parent dies (`prctl(PR_SET_PDEATHSIG)`), and exits at once if
the supervisor was already gone before that took effect.

The supervisor also hands its policy-version key to the workers (see `core/secrets.py`), so
every worker reports the same policy version for the same rules, hosts file and secrets.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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
from pathlib import Path
from typing import Any

from egresswarden.runtime.probes import ProbeServer, Response, json_response

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LIVENESS_STALL_SECONDS = 10.0
SUPERVISOR_PID_ENV = "WARDEN_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def prepare_worker() -> None:
    """Run first in a worker process: die with the supervisor, then share the proxy port."""
    supervisor = os.environ.pop(SUPERVISOR_PID_ENV, "")
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            print(f"warden: worker cannot set PR_SET_PDEATHSIG (errno {ctypes.get_errno()})", file=sys.stderr)
    if supervisor and os.getppid() != int(supervisor):
        sys.exit("warden: worker's supervisor is gone; exiting")  # died before prctl took effect
    enable_reuse_port()


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


def reuse_port_enabled() -> bool:
    """Was `enable_reuse_port` called in this process (a worker)? Listeners Warden opens itself
    (runtime/fastconnect.py) bind the same way."""
    import asyncio

    return bool(getattr(asyncio.start_server, "_warden_reuse_port", False))


class _LineRelay:
    """`--audit-log -` with workers: each worker's stdout (its own audit chain) is copied to
    the supervisor's stdout one whole line at a time, so records of two workers never tear
    each other (a pipe write above PIPE_BUF is not atomic). `warden audit verify -` splits
    the interleaved chains again by their hash links."""

    def __init__(self) -> None:
        from egresswarden.record.journal import claim_stdout

        self.out = claim_stdout()
        self.lock = threading.Lock()

    def follow(self, stream: Any, index: int) -> None:
        threading.Thread(target=self._copy, args=(stream,), name=f"warden-audit-relay-{index}", daemon=True).start()

    def _copy(self, stream: Any) -> None:
        with stream:
            for line in iter(stream.readline, b""):
                with self.lock:
                    try:
                        self.out.write(line)
                    except (OSError, ValueError):
                        return  # stdout gone: the worker will see EPIPE and fail closed


class _Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str], state_dir: Path) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.port_file = state_dir / f"worker{index}.port"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self, relay: _LineRelay | None = None) -> None:
        self.port_file.unlink(missing_ok=True)
        self.started = time.monotonic()
        if relay is None:
            self.proc = subprocess.Popen(self.argv, env=self.env)
            return
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        relay.follow(self.proc.stdout, self.index)

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
        self.heartbeat = time.monotonic()
        from egresswarden.core.secrets import VERSION_KEY, VERSION_KEY_ENV

        env = {**os.environ, MULTIPROC_ENV: str(state_dir / "metrics"), SUPERVISOR_PID_ENV: str(os.getpid()),
               VERSION_KEY_ENV: VERSION_KEY.hex()}
        (state_dir / "metrics").mkdir()
        self.workers = [_Worker(i, self._worker_argv(i), env, state_dir) for i in range(args.workers)]
        self.relay = _LineRelay() if args.audit_log == "-" else None

    def _worker_argv(self, index: int) -> list[str]:
        a = self.args
        argv = [sys.executable, "-m", "egresswarden", "run", "--rules", a.rules,
                "--listen", f"{a.listen[0]}:{a.listen[1]}", "--metrics-listen", "127.0.0.1:0",
                "--audit-log", worker_audit_path(a.audit_log, index), "--confdir", a.confdir,
                "--worker-index", str(index), "--log-format", getattr(a, "log_format", "text"),
                "--set", f"warden_metrics_port_file={self.state_dir / f'worker{index}.port'}"]
        for item in a.set or []:
            argv += ["--set", item]
        if a.verbose:
            argv.append("-v")
        return argv

    def _ask(self, w: _Worker, path: str) -> dict[str, Any]:
        alive = w.proc is not None and w.proc.poll() is None
        report: dict[str, Any] = {"worker": w.index, "pid": w.proc.pid if w.proc else None, "alive": alive}
        port = w.metrics_port()
        if not alive:
            report["status"] = "down"
        elif not port:
            report["status"] = "starting"
        else:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    report.update(json.loads(r.read()))
            except urllib.error.HTTPError as e:
                with e:
                    report.update(json.loads(e.read() or b"{}"))
            except (OSError, ValueError):
                report["status"] = "unreachable"
        return report

    def health(self) -> tuple[int, dict[str, Any]]:
        """Readiness: every worker alive, its rules loaded and its audit log writable."""
        reports = [self._ask(w, "/readyz") for w in self.workers]
        ok = all(r["alive"] and r.get("status") == "ok" for r in reports)
        first = reports[0] if reports else {}
        versions = {r.get("policy_version") for r in reports}
        body = {"status": "ok" if ok else "unhealthy", "rules_loaded": first.get("rules_loaded", 0),
                "policy_version": first.get("policy_version") if len(versions) == 1 else None,
                "audit_writable": all(r.get("audit_writable") is True for r in reports), "workers": reports}
        return (200 if ok else 503), body

    def liveness(self) -> tuple[int, dict[str, Any]]:
        """Liveness of the supervisor: its loop turns. Dead workers are its job, not the kubelet's."""
        lag = time.monotonic() - self.heartbeat
        ok = lag < LIVENESS_STALL_SECONDS
        body = {"status": "ok" if ok else "stalled", "loop_lag_seconds": round(lag, 3),
                "workers_alive": sum(1 for w in self.workers if w.proc is not None and w.proc.poll() is None),
                "workers": len(self.workers)}
        return (200 if ok else 503), body

    def metrics(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.state_dir / "metrics"))
        return generate_latest(registry)

    def serve(self) -> ProbeServer | None:
        if self.args.metrics_listen is None:
            return None

        def metrics() -> Response:
            return 200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8"

        def ready() -> Response:
            return json_response(*self.health())

        def live() -> Response:
            return json_response(*self.liveness())

        host, port = self.args.metrics_listen
        server = ProbeServer((host, port), {"/metrics": metrics, "/readyz": ready, "/healthz": ready,
                                            "/livez": live})
        server.start("warden-supervisor-metrics")
        return server

    def forward(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(OSError):
                    w.proc.send_signal(sig)

    def run(self) -> int:
        from prometheus_client.multiprocess import mark_process_dead

        for w in self.workers:
            w.start(self.relay)
        server = self.serve()
        try:
            while not self.stopping.wait(0.2):
                self.heartbeat = time.monotonic()
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
                    w.start(self.relay)
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
                server.stop()
        return 0


def _say(message: str) -> None:
    # from a signal handler: a closed stderr must not kill the supervisor
    with contextlib.suppress(OSError, ValueError):
        print(message, file=sys.stderr, flush=True)


def run_workers(args: argparse.Namespace) -> int:
    state_dir = Path(tempfile.mkdtemp(prefix="warden-workers-"))
    supervisor = _Supervisor(args, state_dir)

    def stop(*_: object) -> None:
        supervisor.stopping.set()

    def hangup(*_: object) -> None:
        _say("warden: SIGHUP: reloading every worker")
        supervisor.forward(signal.SIGHUP)

    def ignore(signum: int, _frame: object) -> None:
        _say(f"warden: {signal.Signals(signum).name} ignored (SIGHUP reloads; SIGTERM/SIGINT stop)")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE):
        signal.signal(sig, ignore)
    try:
        return supervisor.run()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
