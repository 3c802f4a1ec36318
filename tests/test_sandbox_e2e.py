"""End to end: `warden sandbox` with real bubblewrap, a real `warden run` (attached and embedded)
and real clients inside (curl, python, git), on 127.0.0.1 only.

One attached Warden (with `--admin-socket`) and TLS + plain origins per module. The test
home and workdir live under /var/tmp, because the sandbox's /tmp is private by design (a
home under /tmp would simply be invisible inside and prove nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import WARDEN, Warden, echo_handler, hosts_file, run_origin, sha256_hex, start_warden

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None or not sys.platform.startswith("linux"),
                                reason="needs bubblewrap on Linux (make system-deps installs it)")

SECRET = "sk-sandbox-RealSecretValue-7f3e9a1c"
PLACEHOLDER = "WARDEN-PLACEHOLDER-API"
HOST_ONLY_SECRET = "AKIA-host-shell-secret-should-not-leak"
PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def _handler(req: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
    if req.path.startswith("/placeholder"):
        return 200, {}, f"secret-ok={req.headers.get('X-Token') == SECRET}\n".encode()
    return echo_handler(req, body)


@pytest.fixture(scope="module")
def env(origin_ca, origin_ca_file: Path, shared_confdir: Path) -> Iterator[dict[str, Any]]:
    base = Path(tempfile.mkdtemp(prefix="warden-sandbox-test-", dir="/var/tmp"))
    try:
        home = base / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY\n")
        (home / ".aws").mkdir()
        (home / ".aws" / "credentials").write_text("aws_secret_access_key = hunter2\n")
        proj = home / "proj"
        proj.mkdir()
        (proj / "README.md").write_text("project readme\n")
        (proj / ".env").write_text("DB_PASSWORD=hunter2\n")
        work = base / "warden"
        work.mkdir()
        admin_dir = base / "admin"
        with run_origin(_handler, ca=origin_ca) as origin, run_origin() as plain, run_origin() as hook:
            ports = [origin.port, plain.port]
            rules = {
                "agents": [
                    {"id": "coder", "policies": ["p"], "sandbox_profile": "dev"},
                    {"id": "free", "token_sha256": [sha256_hex("tok-free")], "policies": ["p"]},
                ],
                "policies": {"p": {
                    "allow": [{"host": "allowed.test", "ports": ports}, {"host": "cred.test", "ports": ports}],
                    "credentials": [{"id": "api", "host": "cred.test", "ports": ports,
                                     "inject": {"X-Injected": "${secret:SANDBOX_API_KEY}"},
                                     "placeholder": PLACEHOLDER}],
                }},
                "sandbox_profiles": {
                    "dev": {"env": {"API_KEY": PLACEHOLDER}, "deny_commands": ["ssh", "perl"]},
                    "small": {"limits": {"memory_mb": 64}},
                    "tight": {"limits": {"max_processes": 16, "cpu_seconds": 1}},
                },
                "settings": {"hosts_file": str(hosts_file(work / "hosts")), "tls_intercept": "always",
                             "private_networks": "allow",  # the origins are on 127.0.0.1
                             "alerts": [{"id": "hook", "url": f"http://127.0.0.1:{hook.port}/hook",
                                         "events": ["sandbox_refused"], "dedup_window_seconds": 0}]},
            }
            warden = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                                  env={"SANDBOX_API_KEY": SECRET},
                                  extra_args=["--admin-socket", str(admin_dir / "warden.sock")])
            try:
                yield {"warden": warden, "origin": origin, "plain": plain, "hook": hook, "home": home, "proj": proj,
                       "base": base, "admin": str(admin_dir / "warden.sock"), "confdir": shared_confdir,
                       "origin_ca_file": origin_ca_file}
            finally:
                warden.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _host_env(env: dict[str, Any]) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(env["home"]), "LANG": "C.UTF-8",
            "AWS_SECRET_ACCESS_KEY": HOST_ONLY_SECRET, "SANDBOX_API_KEY": SECRET,
            "XDG_STATE_HOME": str(env["base"] / "state")}


def mode_args(env: dict[str, Any], mode: str) -> list[str]:
    if mode == "attached":
        return ["--attach", env["admin"]]
    w: Warden = env["warden"]
    return ["--rules", str(w.rules_dir), "--confdir", str(env["confdir"]),
            "--audit-log", str(env["base"] / "embedded-audit.jsonl"),
            "--set", f"ssl_verify_upstream_trusted_ca={env['origin_ca_file']}"]


def sandbox(env: dict[str, Any], cmd: list[str], *, mode: str = "attached", agent: str = "coder",
            extra: list[str] | None = None, workdir: Path | None = None, input: str | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:
    args = [WARDEN, "sandbox", "--agent", agent, "--workdir", str(workdir or env["proj"]), *mode_args(env, mode),
            *(extra or []), "--", *cmd]
    return subprocess.run(args, capture_output=True, text=True, env=_host_env(env), input=input, timeout=timeout,
                          cwd=str(env["proj"]))


def sh(env: dict[str, Any], script: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return sandbox(env, ["sh", "-c", script], **kw)


def audit_of(env: dict[str, Any], mode: str) -> Path:
    return env["warden"].audit_path if mode == "attached" else env["base"] / "embedded-audit.jsonl"


def records(path: Path, want: Any = None, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        if want is None or want(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


MODES = ["attached", "embedded"]


# -- network --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_allowed_host_works_through_warden_with_sandbox_id(env, mode):
    port = env["origin"].port
    r = sh(env, f"curl -sS --max-time 20 https://allowed.test:{port}/hello-{mode}; echo; echo id=$WARDEN_SANDBOX_ID",
           mode=mode)
    assert r.returncode == 0, r.stderr
    body, _, sid = r.stdout.strip().rpartition("id=")
    assert body.strip(), r.stdout + r.stderr
    assert json.loads(body.strip())["path"] == f"/hello-{mode}"
    recs = records(audit_of(env, mode), lambda rs: any(x.get("path") == f"/hello-{mode}" for x in rs))
    req = [x for x in recs if x.get("path") == f"/hello-{mode}"][-1]
    assert req["agent"] == "coder" and req["identity"] == "sandbox" and req["sandbox_id"] == sid
    connect = [x for x in recs if x.get("event") == "connect" and x.get("request_id") == req["request_id"]]
    assert connect and connect[-1]["sandbox_id"] == sid


@pytest.mark.parametrize("mode", MODES)
def test_denied_host_gets_readable_denial(env, mode):
    port = env["plain"].port
    r = sh(env, f"curl -sS --max-time 20 http://denied.test:{port}/x", mode=mode)
    assert "Warden refused this request for agent 'coder'" in r.stdout, r.stdout + r.stderr


def test_python_and_git_inside_go_through_warden(env):
    o = env["origin"]
    script = (f"import urllib.request; print(urllib.request.urlopen('https://allowed.test:{o.port}/from-python',"
              f" timeout=20).read().decode())")
    r = sandbox(env, [PY, "-c", script])
    assert r.returncode == 0 and json.loads(r.stdout)["path"] == "/from-python", r.stderr
    r = sandbox(env, ["git", "ls-remote", f"https://allowed.test:{o.port}/repo.git"])
    # The echo origin is no git server, so git fails after the request reached it through Warden.
    assert any(s["path"].startswith("/repo.git/info/refs") and s["headers"].get("User-Agent", "").startswith("git/")
               for s in o.seen), r.stderr


def test_no_way_around_the_proxy(env):
    w, plain = env["warden"], env["plain"]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    udp_port = udp.getsockname()[1]
    script = "\n".join([
        f"{PY} -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.sendto(b'LEAK-udp', ('127.0.0.1', {udp_port}))\"",
        f"env -u HTTPS_PROXY -u https_proxy -u ALL_PROXY -u all_proxy curl -sS --max-time 5 "
        f"https://allowed.test:{env['origin'].port}/direct && echo LEAK-unset",
        f"curl -sS --noproxy '*' --max-time 5 http://127.0.0.1:{plain.port}/direct && echo LEAK-origin",
        f"curl -sS --noproxy '*' --max-time 5 http://127.0.0.1:{w.port}/direct && echo LEAK-warden",
        f"{PY} -c \"import socket; socket.getaddrinfo('sandbox-dns-probe.test', 443)\" 2>/dev/null && echo LEAK-dns",
        "tail -n +3 /proc/net/dev | cut -d: -f1",  # this network namespace's interfaces
    ])
    r = sh(env, script)
    assert "LEAK" not in r.stdout, r.stdout
    assert r.stdout.split() == ["lo"], r.stdout
    assert not any(s["path"] == "/direct" for s in plain.seen)
    # Loopback delivery is synchronous: had the datagram reached the host, it would be queued now.
    with pytest.raises(BlockingIOError):
        udp.recv(100)
    udp.close()


def test_session_token_is_useless_outside_the_sandbox(env):
    """Read the token out of a running sandbox and try it from the host: 407, during and after."""
    w: Warden = env["warden"]
    flag = env["base"] / "release"
    out = env["base"] / "token.txt"
    proc = subprocess.Popen(
        [WARDEN, "sandbox", "--agent", "coder", "--workdir", str(env["base"]), "--attach", env["admin"], "--",
         "sh", "-c", f"echo $HTTPS_PROXY > {out}; i=0; while [ ! -e {flag} ] && [ $i -lt 600 ]; do sleep 0.1; "
                     f"i=$((i+1)); done"],
        env=_host_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        url = out.read_text().strip()
        token = url.split("@")[0].rsplit(":", 1)[1]
        assert token.startswith("wsb_") and len(token) == 4 + 64
        # The bridge socket itself (in the launcher's private directory) refuses host processes.
        live = Path(tempfile.gettempdir()) / f"warden-sandbox-{proc.pid}"
        sockets = [p for p in live.parent.glob(f"{live.name}-*/proxy.sock")]
        assert len(sockets) == 1
        for sock_path in sockets:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(10)
                s.connect(str(sock_path))
                try:  # the bridge may close before, during or after the send
                    s.sendall(f"GET http://allowed.test:{env['plain'].port}/stolen HTTP/1.1\r\n"
                              f"Host: allowed.test\r\n\r\n".encode())
                    answer = s.recv(100)
                except (BrokenPipeError, ConnectionResetError):
                    answer = b""
                assert answer == b""  # closed unanswered
        host_proxy = f"http://coder:{token}@127.0.0.1:{w.port}"
        r = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                            "-x", host_proxy, f"http://allowed.test:{env['plain'].port}/stolen"],
                           capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]})
        assert r.stdout == "407", r.stdout + r.stderr
    finally:
        flag.write_text("go")
        assert proc.wait(60) == 0
        flag.unlink()
    assert not any(s["path"] == "/stolen" for s in env["plain"].seen)


# -- filesystem -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_credentials_absent_workdir_readable_and_writable(env, mode):
    proj: Path = env["proj"]
    script = "\n".join([
        "cat ~/.ssh/id_rsa; echo ssh=$?",
        "cat ~/.aws/credentials; echo aws=$?",
        "ls -a ~",
        "cat README.md",
        f"echo written-{mode} > out-{mode}.txt && echo write=ok",
        "echo -n env=; cat .env; echo",
        "touch ~/outside 2>/dev/null; echo home=$?",
        "touch /usr/outside 2>/dev/null; echo usr=$?",
        "echo tmp > /tmp/inside && cat /tmp/inside",
    ])
    r = sh(env, script, mode=mode)
    out = r.stdout
    assert "ssh=1" in out and "aws=1" in out and "PRIVATE KEY" not in out and "hunter2" not in out, out
    assert "No such file or directory" in r.stderr
    listing = out.split("aws=1")[1].split("project readme")[0].split()
    assert ".ssh" not in listing and ".aws" not in listing and "proj" in listing
    assert "project readme" in out and "write=ok" in out and "env=\n" in out
    assert "home=1" in out and "usr=1" in out and "tmp" in out
    assert (proj / f"out-{mode}.txt").read_text() == f"written-{mode}\n"
    assert (proj / ".env").read_text() == "DB_PASSWORD=hunter2\n"
    assert not (env["home"] / "outside").exists()


@pytest.mark.parametrize("mode", MODES)
def test_workdir_under_denied_path_refuses_and_is_audited(env, mode):
    r = sandbox(env, ["true"], mode=mode, workdir=env["home"] / ".ssh")
    assert r.returncode == 125
    assert "refused" in r.stderr and ".ssh" in r.stderr
    recs = records(audit_of(env, mode), lambda rs: any(x["event"] == "sandbox_refused" for x in rs))
    refused = [x for x in recs if x["event"] == "sandbox_refused"][-1]
    assert refused["reason"] == "workdir_denied" and refused["agent"] == "coder" and refused["profile"] == "dev"
    hook = env["hook"]

    def alerted() -> bool:
        return any(json.loads(s["body"]).get("record", {}).get("sandbox_id") == refused["sandbox_id"]
                   for s in hook.seen if s["path"] == "/hook")

    deadline = time.monotonic() + 10
    while not alerted() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alerted(), "a refused sandbox raises the sandbox_refused alert"
    alert = next(json.loads(s["body"]) for s in hook.seen if s["path"] == "/hook"
                 and json.loads(s["body"])["record"].get("sandbox_id") == refused["sandbox_id"])
    assert alert["kind"] == "sandbox_refused" and "workdir_denied" in alert["text"]


def test_profile_binding_is_enforced(env):
    r = sandbox(env, ["true"], extra=["--profile", "small"])
    assert r.returncode == 125 and "bound to sandbox profile 'dev'" in r.stderr
    r = sandbox(env, ["true"], agent="nobody")
    assert r.returncode == 125 and "no agent 'nobody'" in r.stderr


# -- commands, environment, credentials ------------------------------------------------------
def test_denied_command_prints_stub_reason(env):
    r = sh(env, "ssh example.test; echo ssh=$?; /usr/bin/perl -e 1; echo perl=$?")
    assert "ssh=126" in r.stdout and "perl=126" in r.stdout
    assert "'ssh' is denied by sandbox profile 'dev'" in r.stderr
    assert "'perl' is denied by sandbox profile 'dev'" in r.stderr


def test_host_environment_not_inherited_and_placeholder_swapped_at_bound_host(env):
    o = env["origin"]
    r = sh(env, f"env; curl -sS --max-time 20 -H \"X-Token: $API_KEY\" https://cred.test:{o.port}/placeholder")
    assert HOST_ONLY_SECRET not in r.stdout and "AWS_SECRET_ACCESS_KEY" not in r.stdout
    assert SECRET not in r.stdout and f"API_KEY={PLACEHOLDER}" in r.stdout
    assert "secret-ok=True" in r.stdout, r.stdout + r.stderr


# -- lifetime, limits, audit ----------------------------------------------------------------
def test_exit_status_stdio_pipes_and_nothing_left_running(env):
    marker = "987.654"
    r = sandbox(env, ["sh", "-c", f"sleep {marker} & cat; exit 7"], input="piped input\n")
    assert r.returncode == 7 and r.stdout == "piped input\n", r.stderr
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                assert marker not in (entry / "cmdline").read_bytes().decode(errors="replace")


def test_signal_reaches_cmd(env):
    ready = env["base"] / "trap-ready"
    got = env["base"] / "trap-got"
    script = (f"trap 'echo term > {got}; exit 3' TERM; touch {ready}; i=0; "
              f"while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done")
    proc = subprocess.Popen([WARDEN, "sandbox", "--agent", "coder", "--workdir", str(env["base"]),
                             "--attach", env["admin"], "--", "sh", "-c", script],
                            env=_host_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 3
    assert got.read_text() == "term\n"


@pytest.mark.parametrize("backend", ["auto", "rlimit"])
def test_memory_limit_ends_a_process_that_exceeds_it(env, backend):
    script = "b = bytearray(512 * 1024 * 1024); print('allocated', len(b))"
    r = sandbox(env, [PY, "-c", script], agent="free", extra=["--profile", "small", "--limits-backend", backend])
    assert r.returncode != 0 and "allocated" not in r.stdout
    recs = records(env["warden"].audit_path,
                   lambda rs: any(x["event"] == "sandbox_exit" and x.get("profile") == "small" for x in rs))
    start = [x for x in recs if x["event"] == "sandbox_start" and x.get("profile") == "small"][-1]
    end = [x for x in recs if x["event"] == "sandbox_exit" and x["sandbox_id"] == start["sandbox_id"]][-1]
    assert start["limits"] == {"memory_mb": 64}
    if start["limits_backend"].startswith("cgroup"):
        assert end["limit_hit"] == "memory" and end["signal"] == "SIGKILL" and r.returncode == 137
        assert "memory limit reached" in r.stderr
    else:
        assert start["limits_backend"] == "rlimit" and "MemoryError" in r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_lifecycle_records_verify(env, mode):
    r = sandbox(env, ["sh", "-c", "exit 4"], mode=mode)
    assert r.returncode == 4
    path = audit_of(env, mode)
    recs = records(path, lambda rs: any(x["event"] == "sandbox_exit" and x.get("exit_status") == 4 for x in rs))
    end = [x for x in recs if x["event"] == "sandbox_exit" and x.get("exit_status") == 4][-1]
    start = [x for x in recs if x["event"] == "sandbox_start" and x["sandbox_id"] == end["sandbox_id"]][-1]
    assert start["agent"] == "coder" and start["profile"] == "dev" and start["command"] == "sh"
    assert start["workdir"] == str(env["proj"]) and end["duration_ms"] > 0 and end["signal"] is None
    if mode == "embedded":
        records(path, lambda rs: rs and rs[-1]["event"] == "shutdown")
    v = subprocess.run([WARDEN, "audit", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr


def test_admin_socket_is_owner_only(env):
    sock = Path(env["admin"])
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


def test_killed_launcher_takes_the_sandbox_with_it_and_is_audited(env):
    marker = "876.543"
    ready = env["base"] / "kill-ready"
    proc = subprocess.Popen([WARDEN, "sandbox", "--agent", "coder", "--workdir", str(env["base"]),
                             "--attach", env["admin"], "--", "sh", "-c", f"touch {ready}; sleep {marker}"],
                            env=_host_env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists()
    proc.kill()  # SIGKILL: no chance to clean up; --die-with-parent and PID 1 do it
    proc.wait(10)

    def running() -> bool:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                        return True
        return False

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running()
    recs = records(env["warden"].audit_path,
                   lambda rs: any(x["event"] == "sandbox_exit" and x.get("error") for x in rs))
    assert any(x["event"] == "sandbox_exit" and "closed before it reported" in (x.get("error") or "") for x in recs)
    # The killed launcher could not remove its private directory; the next launcher would.
    for leftover in Path(tempfile.gettempdir()).glob(f"warden-sandbox-{proc.pid}-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@pytest.mark.parametrize("limit, script", [
    pytest.param("processes", "for i in $(seq 64); do sleep 30 & done; wait", id="processes"),
    pytest.param("cpu", "while :; do :; done", id="cpu"),
])
def test_process_and_cpu_limits_end_the_sandbox(env, limit, script):
    r = sandbox(env, ["sh", "-c", script], agent="free", extra=["--profile", "tight"], timeout=120)
    recs = records(env["warden"].audit_path,
                   lambda rs: any(x["event"] == "sandbox_exit" and x.get("profile") == "tight"
                                  and x.get("limit_hit") == limit for x in rs))
    start = [x for x in recs if x["event"] == "sandbox_start" and x.get("profile") == "tight"][-1]
    if start["limits_backend"] == "rlimit":
        pytest.skip("no writable cgroup here: rlimits apply per process (see the README)")
    assert any(x["event"] == "sandbox_exit" and x.get("limit_hit") == limit for x in recs)
    assert f"{limit} limit reached" in r.stderr and r.returncode != 0
