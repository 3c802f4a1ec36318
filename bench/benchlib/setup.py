"""Make the machine ready: Debian packages the harness needs, and the load generator.

Works on a fresh Debian 12 machine as root; on a machine that already has
everything it does nothing (no network).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
LG_SOURCE = BENCH_DIR / "loadgen" / "lg.c"
LG_BINARY = BENCH_DIR / ".build" / "lg"

# binary (or file) that must exist -> Debian package providing it
REQUIRED: dict[str, str] = {
    "/usr/sbin/nginx": "nginx-light",
    "/usr/sbin/squid": "squid",
    "/usr/bin/cc": "gcc",
    "/usr/include/stdio.h": "libc6-dev",
    "/usr/include/openssl/ssl.h": "libssl-dev",
}


def missing_packages() -> list[str]:
    return sorted({pkg for path, pkg in REQUIRED.items() if not Path(path).exists()})


def ensure_debian_packages() -> None:
    pkgs = missing_packages()
    if not pkgs:
        return
    if os.geteuid() != 0:
        sys.exit(f"bench: need Debian packages {pkgs}; run as root or `apt-get install -y {' '.join(pkgs)}`")
    print(f"bench: installing Debian packages: {' '.join(pkgs)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Lock timeout: another apt (e.g. the proxy's own setup) may be running.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-q"]
    subprocess.run(apt + ["update"], check=True, env=env, timeout=600)
    # --no-install-recommends: squid's recommends pull in a lot we don't use.
    subprocess.run(apt + ["install", "-y", "--no-install-recommends", *pkgs], check=True, env=env, timeout=900)
    still = missing_packages()
    if still:
        sys.exit(f"bench: packages still missing after apt-get install: {still}")


def build_loadgen() -> Path:
    """Compile bench/loadgen/lg.c into bench/.build/lg (only when the source is newer)."""
    if LG_BINARY.exists() and LG_BINARY.stat().st_mtime >= LG_SOURCE.stat().st_mtime:
        return LG_BINARY
    LG_BINARY.parent.mkdir(parents=True, exist_ok=True)
    cc = shutil.which("cc") or "/usr/bin/cc"
    cmd = [cc, "-O2", "-Wall", "-pthread", "-o", str(LG_BINARY), str(LG_SOURCE), "-lssl", "-lcrypto"]
    subprocess.run(cmd, check=True, timeout=120)
    return LG_BINARY


def byte_compile_warden(exe: str) -> None:
    """Write the .pyc files of the Warden build behind `exe`, as `pip install` does for an
    installed package. A source checkout run with PYTHONDONTWRITEBYTECODE=1 (set on some of
    these machines) otherwise recompiles ~90 modules at every start, which start-up timings
    would charge to Warden (~0.15 s) while bare mitmdump loads its installed bytecode."""
    python = Path(exe).with_name("python")
    if not python.exists():
        return  # a warden on PATH without its venv beside it: measured as it is
    where = subprocess.run([str(python), "-c", "import importlib.util as u, os; "
                            "print(os.path.dirname(u.find_spec('egresswarden').origin))"],
                           capture_output=True, text=True, timeout=60)
    if where.returncode == 0 and where.stdout.strip():
        subprocess.run([str(python), "-m", "compileall", "-q", where.stdout.strip()],
                       capture_output=True, timeout=300)
