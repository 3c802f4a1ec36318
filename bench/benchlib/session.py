"""One harness session: packages, load generator, temp dir, nginx origin, shared files."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import setup
from .origin import start_origin
from .procs import Procs
from .proxies import BARE, BenchEnv, own_ca, start_proxy, warden_binary, warden_status, write_shared_files


@dataclass
class Session:
    procs: Procs
    env: BenchEnv
    lg: Path
    tmp: Path


def _exit_on_sigterm() -> None:
    """SIGTERM/SIGHUP (e.g. `timeout`, a closed terminal) become SystemExit, so the
    `finally` blocks still stop every process we started, by PID."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


@contextmanager
def bench_session(keep_tmp: bool = False) -> Iterator[Session]:
    _exit_on_sigterm()
    setup.ensure_debian_packages()
    lg = setup.build_loadgen()
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-"))
    os.chmod(tmp, 0o755)  # nginx workers (nobody) and squid (proxy) read files here
    try:
        with Procs(tmp) as procs:
            origin = start_origin(procs, tmp)
            env = write_shared_files(tmp, origin)
            warden_usable = warden_status() is None
            if warden_usable:
                setup.byte_compile_warden(warden_binary())  # start-up compares bytecode with bytecode
            # One CA for both mitmproxies, made the way operators make it (`warden ca init`, ECDSA
            # P-256 by default; BENCH_CA_KEY=rsa for the old RSA-2048 one), so intercepted
            # handshakes compare equal keys. Without a usable warden, mitmdump makes its own (RSA).
            if warden_usable:
                own_ca(warden_binary(), env.confdir, os.environ.get("BENCH_CA_KEY", "ecdsa"))
            # The first mitmdump start otherwise creates the CA; keep that out of every measurement.
            procs.stop(start_proxy(procs, BARE, env).proc)
            yield Session(procs, env, lg, tmp)
    finally:
        if keep_tmp:
            print(f"bench: temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
