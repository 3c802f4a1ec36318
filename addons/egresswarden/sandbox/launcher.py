"""`warden sandbox`: one sandboxed command, from start to the last process gone.

1. Warden: attached (`--attach SOCKET`: a running `warden run --admin-socket SOCKET`) or
   embedded (a `warden run` of our own on 127.0.0.1:<free port> from `--rules`, with its
   admin socket in our private directory, stopped when we are done).
2. `register`: Warden checks the agent, picks the profile from its rules and returns the
   session token, proxy address, CA bundle and its own paths to hide. Everything refused from
   here on is reported back (`refused`) so Warden audits it.
3. Local checks and preparation: bubblewrap present, paths planned (the workdir or a
   read-write path under a denied path refuses), limits set up, the private directory
   (0700: bridge socket, CA bundle, command stubs) filled.
4. bwrap runs inner.py as PID 1 of the sandbox, which runs CMD. `started` is audited. The
   launcher forwards the signals it gets (SIGINT, SIGTERM, SIGHUP, ...) to that PID 1, which
   forwards them to CMD; a limit hit kills the sandbox's PID 1 (the kernel then kills the rest).
5. `exit` with CMD's status (from inner.py), signal, duration and limit hit; cleanup; our
   exit status is CMD's (128+N when a signal N ended it; 125 when the sandbox itself failed
   or was refused).

stdin, stdout and stderr pass straight through to CMD (a terminal or pipes alike: the MCP
stdio helper runs sandboxed servers this way), and the launcher writes nothing to stdout.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egresswarden.sandbox import bwrap as bw
from egresswarden.sandbox import inner, limits
from egresswarden.sandbox.bridge import AdminClient, AdminError, Bridge
from egresswarden.sandbox.profiles import PathRefusal, home_dir, plan_paths
from egresswarden.sandbox.protocol import LimitHit, Op, Refusal, limits_to_wire, profile_from_wire

EXIT_SANDBOX_FAILED = 125
PRIVATE_PREFIX = "warden-sandbox-"  # + launcher pid + random: /tmp/warden-sandbox-<pid>-<random>
FORWARDED = inner.FORWARDED
PR_SET_PDEATHSIG = 1


@dataclass
class Options:
    agent: str
    command: list[str]
    workdir: str
    profile: str | None = None
    attach: str | None = None
    rules: str = "rules"
    audit_log: str | None = None
    confdir: str | None = None
    limits_backend: str = "auto"
    warden_set: list[str] = field(default_factory=list)
    verbose: bool = False


def _say(message: str) -> None:
    print(f"warden sandbox: {message}", file=sys.stderr, flush=True)


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(home_dir(), ".local", "state")
    return Path(base) / "warden"


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class EmbeddedWarden:
    """A `warden run` for this sandbox only, on a free loopback port."""

    def __init__(self, opts: Options, private: Path) -> None:
        state = state_dir()
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.audit_log = opts.audit_log or str(state / "sandbox-audit.jsonl")
        confdir = opts.confdir or str(state / "certs")
        admin_dir = private / "admin"
        admin_dir.mkdir(mode=0o700)
        self.socket = str(admin_dir / "warden.sock")
        self.log_path = private / "warden.log"
        args = [sys.executable, "-m", "egresswarden", "run", "--rules", opts.rules, "--listen", "127.0.0.1:0",
                "--audit-log", self.audit_log, "--confdir", confdir, "--admin-socket", self.socket,
                "--metrics-listen", "127.0.0.1:0"]
        for item in opts.warden_set:
            args += ["--set", item]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True, preexec_fn=_die_with_parent)

    def connect(self, timeout: float = 60.0) -> AdminClient:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AdminError(f"the embedded Warden exited with status {self.proc.returncode}:\n{self.output()}")
            if os.path.exists(self.socket):
                try:
                    return AdminClient(self.socket)
                except AdminError:
                    pass
            time.sleep(0.02)
        raise AdminError(f"the embedded Warden did not open its admin socket within {timeout:.0f}s")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Sandbox:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.admin: AdminClient | None = None
        self.child_pid = 0
        self.pending_signals: list[int] = []

    # -- refusal path ------------------------------------------------------------------------
    def refuse(self, reason: Refusal, message: str) -> int:
        _say(f"refused: {message}")
        if self.admin is not None:
            with contextlib.suppress(AdminError, ValueError):
                self.admin.call({"op": Op.REFUSED, "reason": reason, "message": message,
                                 "command": os.path.basename(self.opts.command[0]), "workdir": self.opts.workdir})
        return EXIT_SANDBOX_FAILED

    def _forward(self, signum: int, _frame: object) -> None:
        if self.child_pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.child_pid, signum)
        else:
            self.pending_signals.append(signum)

    def run(self) -> int:
        if not sys.platform.startswith("linux"):
            _say("Linux only (bubblewrap); macOS and Windows are not supported yet")
            return EXIT_SANDBOX_FAILED
        _remove_stale_private_dirs()
        private = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-"))
        os.chmod(private, 0o700)
        embedded: EmbeddedWarden | None = None
        try:
            if self.opts.attach:
                self.admin = AdminClient(self.opts.attach)
            else:
                embedded = EmbeddedWarden(self.opts, private)
                self.admin = embedded.connect()
            return self._run(private)
        except AdminError as e:
            _say(str(e))
            return EXIT_SANDBOX_FAILED
        finally:
            if self.admin is not None:
                self.admin.close()
            if embedded is not None:
                embedded.stop()
            shutil.rmtree(private, ignore_errors=True)

    def _run(self, private: Path) -> int:
        assert self.admin is not None
        opts = self.opts
        workdir = os.path.realpath(opts.workdir)
        reply = self.admin.call({"op": Op.REGISTER, "agent": opts.agent, "profile": opts.profile,
                                 "workdir": workdir, "command": os.path.basename(opts.command[0])})
        if reply.get("ok") is not True:
            _say(f"refused: {reply.get('message', 'Warden refused the sandbox')}")
            return EXIT_SANDBOX_FAILED
        try:
            profile, origin = profile_from_wire(reply.get("profile"))
            host, port = reply["proxy"]
            token, sandbox_id, bundle = str(reply["token"]), str(reply["sandbox_id"]), str(reply["ca_bundle"])
            hidden = [str(p) for p in reply.get("hidden", [])]
        except (KeyError, TypeError, ValueError) as e:
            return self.refuse(Refusal.BAD_REQUEST, f"malformed register reply from Warden: {e}")

        bwrap_path = shutil.which("bwrap")
        if bwrap_path is None:
            return self.refuse(Refusal.BUBBLEWRAP_MISSING,
                               "bubblewrap (bwrap) is not installed: apt-get install bubblewrap "
                               "(dnf/pacman: bubblewrap)")
        home = home_dir()
        try:
            plan = plan_paths(profile, workdir, home, hidden + [str(private)])
        except PathRefusal as e:
            return self.refuse(e.reason, str(e))
        try:
            limiter = limits.choose(profile.limits, opts.limits_backend)
        except limits.LimitsUnavailable as e:
            return self.refuse(Refusal.LIMITS_UNAVAILABLE, f"no cgroup for the profile's limits: {e}")

        files = self._prepare(private, bundle, profile.id, origin, profile.deny_commands)
        proxy_url = f"http://{opts.agent}:{token}@127.0.0.1:{inner.BRIDGE_PORT}"
        env = bw.sandbox_env(dict(os.environ), profile.env_inherit, profile.env, proxy_url, home, sandbox_id,
                             opts.agent)
        bridge = Bridge(files.bridge_socket, (str(host), int(port)), self.admin)
        bridge.start()
        try:
            return self._execute(bwrap_path, plan, files, profile.deny_commands, env, limiter, sandbox_id, bridge)
        finally:
            bridge.close()
            limiter.close()

    def _prepare(self, private: Path, bundle: str, profile_id: str, origin: str,
                 deny_commands: tuple[str, ...]) -> bw.HostFiles:
        (private / "ca-bundle.pem").write_text(bundle)
        stub_dir = private / "bin"
        stub_dir.mkdir(mode=0o755)
        stub = bw.stub_script(profile_id, origin)
        stub_file = private / "stub"
        stub_file.write_text(stub)
        stub_file.chmod(0o755)
        for name in deny_commands:
            path = stub_dir / name
            path.write_text(stub)
            path.chmod(0o755)
        return bw.HostFiles(str(private / "proxy.sock"), str(private / "ca-bundle.pem"), str(stub_dir),
                            str(stub_file))

    def _execute(self, bwrap_path: str, plan: Any, files: bw.HostFiles, deny_commands: tuple[str, ...],
                 env: dict[str, str], limiter: limits.Limits, sandbox_id: str, bridge: Bridge) -> int:
        assert self.admin is not None
        opts = self.opts
        status_r, status_w = os.pipe()
        info_r, info_w = os.pipe()
        argv = bw.build_argv(bwrap_path, plan, files, deny_commands, env["PATH"], sys.executable,
                             inner.__file__, status_w, info_w, opts.command)
        if opts.verbose:
            _say("bwrap " + " ".join(argv[1:]))
        old_handlers = {sig: signal.signal(sig, self._forward) for sig in FORWARDED}
        started = time.monotonic()
        try:
            try:
                proc = subprocess.Popen(argv, env=env, pass_fds=(status_w, info_w), preexec_fn=limiter.preexec)
            except OSError as e:
                return self.refuse(Refusal.SETUP_FAILED, f"cannot run bubblewrap: {e}")
            finally:
                os.close(status_w)
                os.close(info_w)
            info = _read_all(info_r)
            try:
                namespaces = json.loads(info) if info else {}
                self.child_pid = int(namespaces["child-pid"])
                bridge.pid_namespace = int(namespaces["pid-namespace"])
            except (ValueError, KeyError, TypeError):
                self.child_pid = 0
            if not self.child_pid:
                proc.wait()
                os.close(status_r)
                return self.refuse(Refusal.SETUP_FAILED,
                                   f"bubblewrap could not create the sandbox (exit {proc.returncode}; "
                                   f"its message is above)")
            self.admin.call({"op": Op.STARTED, "command": os.path.basename(opts.command[0]), "workdir": plan.workdir,
                             "limits": limits_to_wire(limiter.limits), "limits_backend": limiter.backend,
                             "pid": os.getpid()})
            for signum in self.pending_signals:
                self._forward(signum, None)
            child = self.child_pid
            stopped = threading.Event()
            watcher = None
            if limiter.backend != "none":
                watcher = threading.Thread(target=limiter.watch, name="warden-sandbox-limits", daemon=True,
                                           args=(stopped, lambda: _kill(child)))
                watcher.start()
            status_text = _read_all(status_r)
            proc.wait()
            stopped.set()
            if watcher is not None:
                watcher.join(5)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        exit_status, sig_name = proc.returncode, None
        try:
            status = json.loads(status_text) if status_text else None
            if isinstance(status, dict):
                exit_status, sig_name = int(status["exit_status"]), status.get("signal")
        except (ValueError, KeyError, TypeError):
            pass
        if status_text == "" and proc.returncode < 0:
            sig_name = signal.Signals(-proc.returncode).name
            exit_status = 128 - proc.returncode
        elif status_text == "" and limiter.hit is not None:
            sig_name, exit_status = "SIGKILL", 128 + signal.SIGKILL
        hit = limiter.hit
        if hit is None and sig_name == "SIGXCPU":
            hit = LimitHit.CPU
        if hit is not None:
            _say(f"sandbox {sandbox_id} ended: {hit.value} limit reached")
        with contextlib.suppress(AdminError, ValueError):
            self.admin.call({"op": Op.EXIT, "exit_status": exit_status, "signal": sig_name,
                             "duration_ms": duration_ms, "limit_hit": hit.value if hit else None})
        return exit_status


def _remove_stale_private_dirs() -> None:
    """Private directories of launchers that were SIGKILLed (and so could not clean up)."""
    for path in Path(tempfile.gettempdir()).glob(f"{PRIVATE_PREFIX}*-*"):
        pid_text = path.name[len(PRIVATE_PREFIX):].split("-", 1)[0]
        try:
            if not pid_text.isdigit() or path.stat().st_uid != os.geteuid():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _read_all(fd: int) -> str:
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace").strip()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def run(opts: Options) -> int:
    return Sandbox(opts).run()
