"""The bubblewrap command line for one sandbox, and the environment inside it.

Namespaces: all of them new (user where bwrap needs one, mount, PID, network, IPC, UTS,
cgroup), so the network namespace has only loopback. `--die-with-parent` (the launcher's
death kills the sandbox), `--new-session` (no TIOCSTI keystroke injection into the calling
terminal), `--cap-drop ALL`, and no_new_privs (set by bwrap and again by inner.py).

Filesystem, in the order bwrap applies it (later mounts cover earlier ones):

1. `/` read-only; a fresh `/proc`, a minimal `/dev`, private tmpfs on `/tmp`, `/dev/shm`
   and `/run` (so the host's sockets there, Docker's, D-Bus, ssh-agent and gpg-agent under
   /run/user, are not reachable), `/run/warden` holding the bridge socket and the CA bundle.
2. Mount operations sorted by depth (shallow first):
   * each read-write path (the workdir and the profile's `read_write`) bound read-write;
   * each directory D that holds denied entries and is not inside a read-write path:
     a tmpfs on D, every other entry of D bound back (symlinks re-created, sockets left out),
     then D remounted read-only. The denied entries are then *absent*: ENOENT, not EACCES.
   * a denied path inside a read-write path (e.g. `./**/.env` in the workdir) is *masked*:
     a file by /dev/null, a directory by an empty read-only tmpfs. Making it absent would
     need a tmpfs on the read-write directory itself, and new files there would vanish.
3. Denied commands: a stub (prints the reason, exits 126) bound over every copy found on
   the PATH and the standard bin directories, and `/run/warden/bin` first on PATH.

The environment is not bwrap arguments (`/proc/PID/cmdline` is world-readable and the proxy
URL holds the session token): the launcher hands it to bwrap as its own environment.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from collections import defaultdict
from dataclasses import dataclass

from egresswarden.sandbox.profiles import PathPlan

SANDBOX_RUN = "/run/warden"
BRIDGE_SOCKET = f"{SANDBOX_RUN}/proxy.sock"
CA_BUNDLE = f"{SANDBOX_RUN}/ca-bundle.pem"
STUB_DIR = f"{SANDBOX_RUN}/bin"
STANDARD_BIN_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
# Already replaced by fresh filesystems inside, so nothing under them needs hiding.
REPLACED = ("/tmp", "/run", "/proc", "/dev", "/var/run")

# The host variables a sandbox inherits (plus the profile's env_inherit).
ENV_ALLOWLIST = ("PATH", "LANG", "LANGUAGE", "TERM", "COLORTERM", "TZ", "USER", "LOGNAME", "SHELL",
                 "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")
ENV_ALLOWLIST_PREFIXES = ("LC_",)
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class HostFiles:
    """Files the launcher prepared in its private directory (outside the sandbox)."""

    bridge_socket: str
    ca_bundle: str
    stub_dir: str
    stub_file: str  # one stub script; every denied command is bound to it


def _depth(path: str) -> int:
    return 0 if path == "/" else path.rstrip("/").count("/")


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


def _replaced(path: str) -> bool:
    return any(_within(path, r) for r in REPLACED)


def mount_operations(plan: PathPlan) -> list[str]:
    """Step 2 of the module docstring: read-write binds, absent and masked denied paths."""
    ops: list[tuple[int, list[str]]] = []
    for path in plan.read_write:
        ops.append((_depth(path), ["--bind", path, path]))
    absent: dict[str, set[str]] = defaultdict(set)
    for path in plan.hidden:
        in_rw = any(_within(path, rw) for rw in plan.read_write)
        if _replaced(path) and not in_rw:
            continue  # under the private /tmp or /run: not visible anyway
        if not os.path.lexists(path):
            continue
        parent = os.path.dirname(path)
        if in_rw or parent == "/" or _replaced(parent):
            if os.path.isdir(path) and not os.path.islink(path):
                ops.append((_depth(path), ["--tmpfs", path, "--remount-ro", path]))
            else:
                ops.append((_depth(path), ["--ro-bind", "/dev/null", path]))
        else:
            absent[parent].add(os.path.basename(path))
    for parent, names in absent.items():
        args = ["--tmpfs", parent]
        try:
            entries = sorted(os.listdir(parent))
        except OSError:
            entries = []
        for name in entries:
            if name in names:
                continue
            src = os.path.join(parent, name)
            try:
                st = os.lstat(src)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                args += ["--symlink", os.readlink(src), src]
            elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                args += ["--ro-bind-try", src, src]
            # sockets, fifos and devices in such a directory are left out on purpose
        args += ["--remount-ro", parent]
        ops.append((_depth(parent), args))
    ops.sort(key=lambda item: item[0])  # stable: same depth keeps insertion order
    return [arg for _, group in ops for arg in group]


def command_copies(name: str, path_value: str) -> list[str]:
    """Every existing file a denied command name resolves to, on PATH or the standard dirs."""
    dirs = [d for d in path_value.split(":") if d.startswith("/")] + list(STANDARD_BIN_DIRS)
    found: dict[str, None] = {}
    for d in dirs:
        candidate = os.path.join(d, name)
        if os.path.isfile(candidate):
            found.setdefault(os.path.realpath(candidate), None)
    return [p for p in found if not _replaced(p)]


def build_argv(bwrap: str, plan: PathPlan, files: HostFiles, deny_commands: tuple[str, ...], path_value: str,
               python: str, inner_script: str, status_fd: int, info_fd: int, cmd: list[str]) -> list[str]:
    argv = [
        bwrap,
        "--unshare-all",  # user (when unprivileged), ipc, pid, net, uts, cgroup: loopback-only network
        "--die-with-parent",
        "--new-session",
        "--cap-drop", "ALL",
        "--as-pid-1",  # inner.py is PID 1: it forwards signals and reaps
        "--info-fd", str(info_fd),
        "--ro-bind", "/", "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--tmpfs", "/dev/shm",
        "--tmpfs", "/tmp",
        "--tmpfs", "/run",
    ]
    if os.path.islink("/var/run"):
        pass  # /var/run -> /run: covered by the /run tmpfs
    elif os.path.isdir("/var/run"):
        argv += ["--tmpfs", "/var/run"]
    argv += mount_operations(plan)
    # The interpreter that runs inner.py (and the venv it may live in) must exist inside even
    # when it lives under a directory the sandbox replaces (a checkout in /tmp): read-only.
    for path in dict.fromkeys((sys.base_prefix, sys.prefix, os.path.dirname(python), inner_script)):
        real = os.path.realpath(path)
        if _replaced(real) and os.path.exists(real):
            argv += ["--ro-bind", real, real]
    argv += [
        "--dir", SANDBOX_RUN,
        "--bind", files.bridge_socket, BRIDGE_SOCKET,
        "--ro-bind", files.ca_bundle, CA_BUNDLE,
        "--ro-bind", files.stub_dir, STUB_DIR,
    ]
    for name in deny_commands:
        for copy in command_copies(name, path_value):
            argv += ["--ro-bind", files.stub_file, copy]
    argv += ["--chdir", plan.workdir, "--",
             python, "-I", "-S", inner_script, BRIDGE_SOCKET, str(status_fd), "--", *cmd]
    return argv


def sandbox_env(host_env: dict[str, str], inherit: tuple[str, ...], profile_env: tuple[tuple[str, str], ...],
                proxy_url: str, home: str, sandbox_id: str, agent: str) -> dict[str, str]:
    """The whole environment inside: an allowlist of the host's, then Warden's, then the profile's."""
    env = {k: v for k, v in host_env.items()
           if k in ENV_ALLOWLIST or k.startswith(ENV_ALLOWLIST_PREFIXES) or k in inherit}
    env["PATH"] = f"{STUB_DIR}:{env.get('PATH') or DEFAULT_PATH}"
    env["HOME"] = home
    env["TMPDIR"] = "/tmp"
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        env[name] = proxy_url
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "NODE_EXTRA_CA_CERTS",
                 "PIP_CERT"):
        env[name] = CA_BUNDLE
    env["NODE_USE_ENV_PROXY"] = "1"
    env["WARDEN_SANDBOX_ID"] = sandbox_id
    env["WARDEN_AGENT"] = agent
    env.update(dict(profile_env))  # validation refuses profile keys that would override the above
    return env


def stub_script(profile_id: str, origin: str) -> str:
    """One shell script for every denied command: it names itself from $0."""
    profile_id = re.sub(r"[^A-Za-z0-9_.:/-]", "?", profile_id)
    origin = re.sub(r"[^A-Za-z0-9_.:/ -]", "?", origin)
    return (
        "#!/bin/sh\n"
        f"echo \"warden sandbox: '$(basename \"$0\")' is denied by sandbox profile '{profile_id}' ({origin}). "
        "Network access goes through Warden's proxy (HTTPS_PROXY); ask the operator to change the profile "
        "if this command is needed.\" >&2\n"
        "exit 126\n"
    )
