"""Resource limits of a sandbox: cgroup v2, cgroup v1, or rlimits where that is all there is.

A cgroup is created as a child of the launcher's own cgroup (so limits the host already
placed on the user still apply) and the bwrap process joins it before it execs (the fd of
`cgroup.procs` is opened here, the write happens in the child between fork and exec), so
everything the sandbox starts is inside from its first instruction. With a cgroup:

* memory_mb -> memory.max (v2) / memory.limit_in_bytes (+ memsw, swappiness 0) (v1): the
  kernel's OOM killer acts inside the cgroup; an `oom_kill` event ends the whole sandbox;
* max_processes -> pids.max: a refused fork (`max` event) ends the sandbox;
* cpu_seconds -> the CPU time of the whole cgroup, polled every 0.1 s: over budget ends it.

Without a usable cgroup (cgroup v2 needs a delegated subtree whose `subtree_control` we may
write; v1 needs writable controller directories, typically root), rlimits apply per process:
RLIMIT_AS (allocations fail), RLIMIT_NPROC (counted per *user* on the whole host, not per
sandbox, and not enforced for root), RLIMIT_CPU (SIGXCPU, then SIGKILL). Only a CPU limit is
then reported as `limit_hit`; the others show as the process's own failure.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from egresswarden.core.model import SandboxLimits
from egresswarden.sandbox.protocol import LimitHit

CGROUP_ROOT = Path("/sys/fs/cgroup")
POLL_SECONDS = 0.1


class LimitsUnavailable(Exception):
    pass


def _own_cgroup_v1(controller: str) -> str | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


def _own_cgroup_v2() -> str | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def _read_key(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


class Limits:
    """The limit backend of one sandbox. `preexec` runs in the bwrap child before exec."""

    backend = "none"

    def __init__(self, limits: SandboxLimits) -> None:
        self.limits = limits
        self.procs_fds: list[int] = []
        self.hit: LimitHit | None = None

    def preexec(self) -> None:
        pid = str(os.getpid()).encode()
        for fd in self.procs_fds:
            os.write(fd, pid)

    def check(self) -> LimitHit | None:
        return None

    def close(self) -> None:
        for fd in self.procs_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.procs_fds = []

    def watch(self, stopped: threading.Event, kill: Callable[[], None]) -> None:
        """Poll until `stopped` is set; on a limit hit, remember it and `kill()` the sandbox."""
        while not stopped.wait(POLL_SECONDS):
            hit = self.check()
            if hit is not None:
                self.hit = hit
                kill()
                return
        self.hit = self.check()  # the kernel's kill may have ended the sandbox between two polls


class RlimitLimits(Limits):
    backend = "rlimit"

    def preexec(self) -> None:
        lim = self.limits
        if lim.memory_mb is not None:
            size = lim.memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
        if lim.max_processes is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (lim.max_processes, lim.max_processes))
        if lim.cpu_seconds is not None:
            resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_seconds, lim.cpu_seconds + 2))


class CgroupV1Limits(Limits):
    backend = "cgroup_v1"

    def __init__(self, limits: SandboxLimits, name: str) -> None:
        super().__init__(limits)
        self.dirs: dict[str, Path] = {}
        wanted = []
        if limits.memory_mb is not None:
            wanted.append("memory")
        if limits.max_processes is not None:
            wanted.append("pids")
        if limits.cpu_seconds is not None:
            wanted.append("cpuacct")
        try:
            for controller in wanted:
                own = _own_cgroup_v1(controller)
                base = CGROUP_ROOT / controller
                if own is None or not base.is_dir():
                    raise LimitsUnavailable(f"no cgroup v1 {controller} controller")
                path = base / own.lstrip("/") / name
                path.mkdir()
                self.dirs[controller] = path
            if "memory" in self.dirs:
                size = str(limits.memory_mb * 1024 * 1024 if limits.memory_mb else 0)
                (self.dirs["memory"] / "memory.limit_in_bytes").write_text(size)
                with contextlib.suppress(OSError):  # no swap accounting: nothing to limit there
                    (self.dirs["memory"] / "memory.memsw.limit_in_bytes").write_text(size)
                with contextlib.suppress(OSError):
                    (self.dirs["memory"] / "memory.swappiness").write_text("0")
            if "pids" in self.dirs:
                (self.dirs["pids"] / "pids.max").write_text(str(limits.max_processes))
            for path in self.dirs.values():
                self.procs_fds.append(os.open(path / "cgroup.procs", os.O_WRONLY))
        except (OSError, LimitsUnavailable) as e:
            self.close()
            raise LimitsUnavailable(f"cgroup v1: {e}") from None

    def check(self) -> LimitHit | None:
        if "memory" in self.dirs and _read_key(self.dirs["memory"] / "memory.oom_control", "oom_kill") > 0:
            return LimitHit.MEMORY
        if "pids" in self.dirs and _read_key(self.dirs["pids"] / "pids.events", "max") > 0:
            return LimitHit.PROCESSES
        cpu = self.limits.cpu_seconds
        if "cpuacct" in self.dirs and cpu is not None and _read_int(self.dirs["cpuacct"] / "cpuacct.usage") > cpu * 10**9:
            return LimitHit.CPU
        return None

    def close(self) -> None:
        super().close()
        for path in self.dirs.values():
            _remove_cgroup(path, "cgroup.procs")
        self.dirs = {}


class CgroupV2Limits(Limits):
    backend = "cgroup_v2"

    def __init__(self, limits: SandboxLimits, name: str) -> None:
        super().__init__(limits)
        self.dir: Path | None = None
        own = _own_cgroup_v2()
        if own is None or not (CGROUP_ROOT / "cgroup.controllers").exists():
            raise LimitsUnavailable("no cgroup v2 hierarchy")
        parent = CGROUP_ROOT / own.lstrip("/")
        try:
            needed = {"memory"} if limits.memory_mb is not None else set()
            if limits.max_processes is not None:
                needed.add("pids")
            if limits.cpu_seconds is not None:
                needed.add("cpu")
            enabled = set((parent / "cgroup.subtree_control").read_text().split())
            missing = needed - enabled
            if missing:
                # Fails (EBUSY) when our own cgroup holds processes: no delegated subtree.
                (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(missing)))
            path = parent / name
            path.mkdir()
            self.dir = path
            if limits.memory_mb is not None:
                (path / "memory.max").write_text(str(limits.memory_mb * 1024 * 1024))
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
            if limits.max_processes is not None:
                (path / "pids.max").write_text(str(limits.max_processes))
            self.procs_fds.append(os.open(path / "cgroup.procs", os.O_WRONLY))
        except OSError as e:
            self.close()
            raise LimitsUnavailable(f"cgroup v2 under {parent}: {e.strerror or e}") from None

    def check(self) -> LimitHit | None:
        if self.dir is None:
            return None
        if self.limits.memory_mb is not None and _read_key(self.dir / "memory.events", "oom_kill") > 0:
            return LimitHit.MEMORY
        if self.limits.max_processes is not None and _read_key(self.dir / "pids.events", "max") > 0:
            return LimitHit.PROCESSES
        cpu = self.limits.cpu_seconds
        if cpu is not None and _read_key(self.dir / "cpu.stat", "usage_usec") > cpu * 10**6:
            return LimitHit.CPU
        return None

    def close(self) -> None:
        super().close()
        if self.dir is not None:
            _remove_cgroup(self.dir, "cgroup.procs")
            self.dir = None


def _remove_cgroup(path: Path, procs: str) -> None:
    """Kill anything still in the cgroup (nothing should be), then remove it (bounded wait)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            pids = [int(p) for p in (path / procs).read_text().split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)


def choose(limits: SandboxLimits, mode: str) -> Limits:
    """mode: auto (cgroup v2, then v1, then rlimits), cgroup (refuse without one), rlimit."""
    if limits.memory_mb is None and limits.max_processes is None and limits.cpu_seconds is None:
        return Limits(limits)
    if mode == "rlimit":
        return RlimitLimits(limits)
    name = f"warden-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
    problems = []
    for cls in (CgroupV2Limits, CgroupV1Limits):
        try:
            return cls(limits, name)
        except LimitsUnavailable as e:
            problems.append(str(e))
    if mode == "cgroup":
        raise LimitsUnavailable("; ".join(problems))
    return RlimitLimits(limits)
