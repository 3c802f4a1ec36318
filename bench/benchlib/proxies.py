"""How to start each proxy under test: Warden, bare mitmdump, squid.

All three resolve the *.test names to 127.0.0.1 the same way a hosts file
would (Warden: settings.hosts_file; bare mitmdump: bench/bare_addon.py; squid:
hosts_file), so /etc/hosts is never touched.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .origin import CRED_SECRET, TEST_HOSTS, Origin
from .procs import Proc, Procs, free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
BARE_ADDON = REPO / "bench" / "bare_addon.py"

AGENT_ID = "bench"
AGENT_TOKEN = "bench-token-not-a-secret"
PROXY_AUTH_HEADER = "Proxy-Authorization: Basic " + base64.b64encode(
    f"{AGENT_ID}:{AGENT_TOKEN}".encode()).decode()


@dataclass
class BenchEnv:
    """Everything the proxies share for one harness run."""

    tmp: Path
    origin: Origin
    confdir: Path            # one mitmproxy CA for Warden and bare mitmdump
    rules_dir: Path
    hosts_file: Path


@dataclass
class RunningProxy:
    name: str
    proc: Proc
    port: int
    startup_s: float         # spawn -> first proxied request answered 200
    audit_log: Path | None = None
    metrics_port: int | None = None


@dataclass(frozen=True)
class ProxySpec:
    name: str                                           # column label
    argv: Callable[[BenchEnv, int, dict[str, object]], list[str]]
    supports_intercept: bool = True
    env: dict[str, str] = field(default_factory=dict)


def warden_binary() -> str:
    return os.environ.get("BENCH_WARDEN", str(VENV_BIN / "warden"))


def warden_status() -> str | None:
    """None when `warden run --help` works, else why not (the proxy may not have landed yet)."""
    if os.environ.get("BENCH_A") == "bare":
        return "BENCH_A=bare"
    exe = warden_binary()
    if not (Path(exe).exists() or shutil.which(exe)):
        return f"{exe} not found"
    try:
        out = subprocess.run([exe, "run", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe} run --help failed: {e}"
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return f"`{exe} run --help` exited {out.returncode}: {last[0]}"
    return None


def write_shared_files(tmp: Path, origin: Origin) -> BenchEnv:
    hosts = tmp / "hosts"
    hosts.write_text("127.0.0.1 " + " ".join(TEST_HOSTS) + "\n")
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "bench.yaml").write_text(rules_yaml(origin, hosts))
    confdir = tmp / "mitmproxy-conf"
    confdir.mkdir()
    return BenchEnv(tmp, origin, confdir, rules, hosts)


def rules_yaml(origin: Origin, hosts_file: Path, extra_allow: str = "", extra_deny: str = "",
               extra_settings: str = "") -> str:
    """Warden rules for the scenarios (see the contract in bench/README.md)."""
    token_sha = hashlib.sha256(AGENT_TOKEN.encode()).hexdigest()
    h, s = origin.http_port, origin.https_port
    return f"""\
agents:
  - id: {AGENT_ID}
    token_sha256: ["{token_sha}"]
    policies: [bench]
policies:
  bench:
    allow:
      - host: plain.test
        ports: [{h}]
      - host: passthrough.test          # no method/path: CONNECT passed through
        ports: [{s}]
      - host: intercept.test            # a path rule forces TLS interception
        ports: [{s}]
        paths: ["/**"]
        methods: [GET, POST]
      - host: cred.test
        ports: [{s}]
        paths: ["/**"]
        methods: [GET, POST]
      - cidr: 127.0.0.1/32              # origins live on loopback (SSRF guard)
        ports: [{h}, {s}]
{extra_allow}    credentials:
      - id: bench-cred
        host: cred.test
        ports: [{s}]                    # credentials, too, default to port 443
        inject: {{Authorization: "Bearer ${{secret:BENCH_TOKEN}}"}}
deny:
  - host: denied.test
{extra_deny}settings:
  hosts_file: {hosts_file}
  private_networks: deny
  # the denied scenario compares like with like: bare mitmdump answers the CONNECT with 403
  # (Warden's default, in_band, accepts it and answers the first request instead)
  explain_denials: status
{extra_settings}"""


def _warden_argv(env: BenchEnv, port: int, extra: dict[str, object]) -> list[str]:
    metrics_port = int(extra.setdefault("metrics_port", free_port()))  # type: ignore[call-overload]
    audit = Path(str(extra.setdefault("audit_log", env.tmp / f"audit-{port}.jsonl")))
    return [warden_binary(), "run", "--rules", str(env.rules_dir),
            "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
            "--audit-log", str(audit), "--confdir", str(env.confdir),
            # Both mitmproxies verify the origin against its (trustme) CA.
            "--set", f"ssl_verify_upstream_trusted_ca={env.origin.ca_pem}"]


def _bare_argv(env: BenchEnv, port: int, extra: dict[str, object]) -> list[str]:
    return [str(VENV_BIN / "mitmdump"), "--listen-host", "127.0.0.1", "-p", str(port),
            "--set", f"confdir={env.confdir}", "-q",
            "--set", f"ssl_verify_upstream_trusted_ca={env.origin.ca_pem}",
            # Same mode as Warden: passthrough.test is tunnelled, not intercepted.
            "--set", r"ignore_hosts=^passthrough\.test:",
            "-s", str(BARE_ADDON)]


def _squid_argv(env: BenchEnv, port: int, extra: dict[str, object]) -> list[str]:
    run_dir = env.tmp / f"squid-{port}"
    run_dir.mkdir()
    conf = run_dir / "squid.conf"
    conf.write_text(f"""\
http_port 127.0.0.1:{port}
acl denied_hosts dstdomain denied.test
http_access deny CONNECT denied_hosts
http_access allow localhost
http_access deny all
cache deny all
cache_mem 0 MB
hosts_file {env.hosts_file}
pid_filename {run_dir}/squid.pid
cache_log {run_dir}/cache.log
access_log stdio:{run_dir}/access.log
coredump_dir {run_dir}
pinger_enable off
shutdown_lifetime 0 seconds
via off
forwarded_for delete
workers 1
max_filedescriptors 16384
cache_effective_user proxy
""")
    shutil.chown(run_dir, user="proxy")
    return ["/usr/sbin/squid", "-N", "-f", str(conf)]


WARDEN = ProxySpec("warden", _warden_argv, env={"BENCH_TOKEN": CRED_SECRET})
BARE = ProxySpec("bare", _bare_argv)
SQUID = ProxySpec("squid", _squid_argv, supports_intercept=False)
# Harness self-test before Warden lands: A is a second bare mitmdump.
BARE_AS_A = ProxySpec("bare(A)", _bare_argv)


def other_build(name: str, exe: str, confdir: Path | None = None) -> ProxySpec:
    """Another Warden build (another checkout's `warden`) in Warden's place; with `confdir`, on
    its own CA instead of the session's (a build from before 2026-12-01 shipped on RSA-2048)."""
    def argv(env: BenchEnv, port: int, extra: dict[str, object]) -> list[str]:
        args = [exe, *_warden_argv(env, port, extra)[1:]]
        if confdir is not None:
            args[args.index("--confdir") + 1] = str(confdir)
        return args
    return ProxySpec(name, argv, env=WARDEN.env)


def own_ca(exe: str, confdir: Path, key_type: str) -> Path:
    """A CA of `key_type` in `confdir`, made by `warden ca init` (this build's: older ones lack
    --key-type; the files are mitmproxy's either way)."""
    subprocess.run([exe, "ca", "init", "--confdir", str(confdir), "--key-type", key_type],
                   check=True, capture_output=True, timeout=60)
    return confdir


def probe_once(port: int, origin: Origin, timeout: float = 2.0) -> bool:
    """One plain-HTTP GET through the proxy; True when it answers 200."""
    req = (f"GET http://plain.test:{origin.http_port}/128B HTTP/1.1\r\n"
           f"Host: plain.test:{origin.http_port}\r\n{PROXY_AUTH_HEADER}\r\n"
           "Connection: close\r\n\r\n").encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(req)
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def connect_status(port: int, host: str, tls_port: int, timeout: float = 5.0) -> int:
    """Status code the proxy answers to `CONNECT host:tls_port` (0 on I/O failure)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"CONNECT {host}:{tls_port} HTTP/1.1\r\nHost: {host}:{tls_port}\r\n"
                      f"{PROXY_AUTH_HEADER}\r\n\r\n".encode())
            line = s.recv(64).split(b"\r\n", 1)[0].split()
            return int(line[1]) if len(line) >= 2 and line[1].isdigit() else 0
    except OSError:
        return 0


def start_proxy(procs: Procs, spec: ProxySpec, env: BenchEnv, timeout: float = 30.0) -> RunningProxy:
    """Start a proxy and time spawn -> first successful proxied request."""
    port = free_port()
    extra: dict[str, object] = {}
    argv = spec.argv(env, port, extra)
    t0 = time.monotonic()
    proc = procs.start(f"{spec.name}-{port}", argv, env={**os.environ, **spec.env})
    while not probe_once(port, env.origin):
        if not proc.alive():
            raise RuntimeError(f"{spec.name} exited at start-up:\n{proc.log_tail()}")
        if time.monotonic() - t0 > timeout:
            procs.stop(proc)
            raise RuntimeError(f"{spec.name} not serving after {timeout}s:\n{proc.log_tail()}")
        time.sleep(0.01)
    startup = time.monotonic() - t0
    audit = extra.get("audit_log")
    metrics = extra.get("metrics_port")
    return RunningProxy(spec.name, proc, port, startup,
                        Path(str(audit)) if audit else None, int(str(metrics)) if metrics else None)
