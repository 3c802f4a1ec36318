"""One harness session: packages, load generator, temp dir, nginx origin, shared files."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from . import setup
from .origin import start_origin
from .procs import Procs
from .proxies import BARE, BenchEnv, start_proxy, write_shared_files


@dataclass
class Session:
    procs: Procs
    env: BenchEnv
    lg: Path
    tmp: Path


@contextmanager
def bench_session(keep_tmp: bool = False) -> Iterator[Session]:
    setup.ensure_debian_packages()
    lg = setup.build_loadgen()
    tmp = Path(tempfile.mkdtemp(prefix="warden-bench-"))
    os.chmod(tmp, 0o755)  # nginx workers (nobody) and squid (proxy) read files here
    try:
        with Procs(tmp) as procs:
            origin = start_origin(procs, tmp)
            env = write_shared_files(tmp, origin)
            # The first mitmdump start creates the CA in confdir; keep that out of every measurement.
            procs.stop(start_proxy(procs, BARE, env).proc)
            yield Session(procs, env, lg, tmp)
    finally:
        if keep_tmp:
            print(f"bench: temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
