"""Issue 15 items 4 and 7: `make run` variables and banner, the start-up line, a port in use,
`warden --version`, `warden token` checks, audit keep_query_values (git through Warden),
`make test` skip reasons. Everything here runs the real CLI, make, git and curl."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from egresswarden import __version__

from .harness import (
    REPO,
    WARDEN,
    Origin,
    curl,
    free_port,
    hosts_file,
    run_origin,
    sha256_hex,
    start_warden,
    wait_for_port,
)
from .test_firsthour_agent_env import make_git_repo, static_handler

pytestmark = pytest.mark.e2e

TOKEN = "run-test-token"


def rules_for(origin: Origin, hosts: Path, keep: list[str] | None = None) -> dict:
    rules: dict = {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["main"]}],
        "policies": {"main": {"allow": [
            {"id": "api", "host": "api.test", "ports": [origin.port], "methods": ["GET", "POST"]},
            {"id": "passthrough", "host": "allowed.test", "ports": [origin.port]},
            {"id": "loopback", "cidr": "127.0.0.1/32", "ports": [origin.port]},
        ]}},
        "settings": {"hosts_file": str(hosts)},
    }
    if keep is not None:
        rules["settings"]["audit"] = {"keep_query_values": keep}
    return rules


def ca_sha256(confdir: Path) -> str:
    cert = x509.load_pem_x509_certificate((confdir / "mitmproxy-ca-cert.pem").read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def test_version() -> None:
    r = subprocess.run([WARDEN, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"warden {__version__}"


def test_startup_line_with_audit_to_a_file(tmp_path: Path, tls_origin: Origin, origin_ca_file: Path) -> None:
    hosts = hosts_file(tmp_path / "hosts")
    w = start_warden(tmp_path, rules_for(tls_origin, hosts), upstream_ca=origin_ca_file)
    try:
        deadline = time.monotonic() + 20
        while " listening on " not in w.stderr_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        line = next(x for x in w.stderr_path.read_text().splitlines() if " listening on " in x)
        assert line.startswith(f"warden {__version__} listening on 127.0.0.1:{w.port} (metrics 127.0.0.1:{w.metrics_port})")
        version = w.audit_records(lambda rs: any(r.get("event") == "startup" for r in rs))
        startup = next(r for r in version if r.get("event") == "startup")
        assert f"rules {w.rules_dir} (3 rules, policy version {startup['policy_version']})" in line
        assert f"CA sha256 {ca_sha256(tmp_path / 'certs')}" in line
        assert line.endswith(f"audit {w.audit_path}")
        assert w.stdout_path.read_text() == ""  # nothing on stdout: with --audit-log - it is pure JSON Lines
    finally:
        w.stop()


def test_port_in_use_is_reported_in_wardens_words(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "rules").mkdir()
        (tmp_path / "rules" / "r.yaml").write_text(yaml.safe_dump(
            {"agents": [{"id": "a", "token_sha256": [sha256_hex("x")], "policies": []}]}))
        r = subprocess.run([WARDEN, "run", "--rules", str(tmp_path / "rules"), "--listen", f"127.0.0.1:{port}",
                            "--metrics-listen", f"127.0.0.1:{free_port()}", "--confdir", str(tmp_path / "c"),
                            "--audit-log", str(tmp_path / "a.jsonl")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"warden: 127.0.0.1:{port} is already in use (another Warden?); "
                                "pick another with --listen")
    assert "--mode" not in r.stderr


def test_token_refuses_ids_the_rules_reject() -> None:
    for bad in ("Coder", "_x", "-x", "a b", "x" * 65, "anonymous"):
        r = subprocess.run([WARDEN, "token", "--", bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stdout == "", (bad, r.stdout)
    tokens = []
    for _ in range(20):
        r = subprocess.run([WARDEN, "token", "coder"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0
        lines = r.stdout.splitlines()
        token = lines[1].strip()
        assert f'token_sha256: ["{sha256_hex(token)}"]' in r.stdout
        tokens.append(token)
    assert not any(t.startswith("-") for t in tokens) and len(set(tokens)) == 20


def test_new_token_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry itself: the first draws start with '-', the result must not."""
    from egresswarden.cli import token as token_cli
    draws = iter(["-abc", "-def", "ghi"])
    monkeypatch.setattr(token_cli.secrets, "token_urlsafe", lambda n: next(draws))
    assert token_cli.new_token() == "ghi"


@pytest.fixture
def git_origin(tmp_path: Path, origin_ca: trustme.CA) -> Iterator[Origin]:
    make_git_repo(tmp_path / "git")
    with run_origin(static_handler(tmp_path / "git", b""), ca=origin_ca) as origin:
        yield origin


def test_audit_keeps_listed_query_values(tmp_path: Path, git_origin: Origin, origin_ca_file: Path) -> None:
    hosts = hosts_file(tmp_path / "hosts")
    w = start_warden(tmp_path, rules_for(git_origin, hosts, keep=["service"]), upstream_ca=origin_ca_file)
    try:
        proxy = w.proxy_url("coder", TOKEN)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HTTPS_PROXY": proxy, "https_proxy": proxy,
               "GIT_SSL_CAINFO": str(w.ca_cert), "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
        r = subprocess.run(["git", "clone", "-q", f"https://api.test:{git_origin.port}/repo.git", str(tmp_path / "c")],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        c = curl(["--cacert", str(w.ca_cert), f"https://api.test:{git_origin.port}/x?service=a%20b&token=s3cr3t"],
                 env={"https_proxy": proxy})
        assert c.returncode == 0, c.stderr
        records = w.audit_records(lambda rs: any((r.get("path") or "").startswith("/x?") for r in rs))
        paths = [r.get("path") for r in records if r.get("event") == "request"]
        assert "/repo.git/info/refs?service=git-upload-pack" in paths
        assert "/x?service=a%20b&token=REDACTED" in paths
        assert "s3cr3t" not in w.audit_path.read_text()
    finally:
        w.stop()


def test_keep_query_values_cannot_keep_an_injected_secret(tmp_path: Path) -> None:
    rules = {
        "agents": [{"id": "a", "token_sha256": [sha256_hex("x")], "policies": ["p"]}],
        "policies": {"p": {"allow": [{"host": "api.example.com"}], "credentials": [
            {"id": "key", "host": "api.example.com", "inject_query": {"api_key": "${secret:K}"},
             "allow_secret_in_url": True}]}},
        "settings": {"audit": {"keep_query_values": ["service", "api_key"]}},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rules))
    r = subprocess.run([WARDEN, "check", "--offline", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "keep_query_values lists 'api_key', which credential 'key' injects" in r.stderr


# -- make run ------------------------------------------------------------------------------


def start_make_run(tmp_path: Path, **variables: str) -> tuple[subprocess.Popen[str], Path, Path]:
    out, err = tmp_path / "make.out", tmp_path / "make.err"
    # -o: never rebuild the venv from a test; the suite already runs inside it.
    args = ["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", "run", *(f"{k}={v}" for k, v in variables.items())]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(args, stdout=o, stderr=e, text=True, env=env, start_new_session=True)
    return proc, out, err


def stop_make_run(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the session this test created: make, bash and warden
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen[str], timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_text()
        if text in content:
            return content
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {path}: {path.read_text()}")


def test_make_run_variables_banner_and_the_printed_agent_shell(tmp_path: Path, tls_origin: Origin,
                                                               origin_ca_file: Path) -> None:
    hosts = hosts_file(tmp_path / "hosts")
    rules = tmp_path / "myrules"
    rules.mkdir()
    (rules / "r.yaml").write_text(yaml.safe_dump(rules_for(tls_origin, hosts)))
    port, metrics = free_port(), free_port()
    audit, confdir, port_file = tmp_path / "audit.jsonl", tmp_path / "ca", tmp_path / "metrics.port"
    proc, out, err = start_make_run(tmp_path, RULES=str(rules), AUDIT_LOG=str(audit), CONFDIR=str(confdir),
                                    LISTEN=f"127.0.0.1:{port}", METRICS_LISTEN=f"127.0.0.1:{metrics}",
                                    UPSTREAM_CA=str(origin_ca_file),
                                    WARDEN_ARGS=f"--set warden_metrics_port_file={port_file}")
    try:
        banner = wait_for_text(out, "Agent shell", proc)
        # Printed only once Warden listens: the port accepts right now, and Warden's own line came first.
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert " listening on " in err.read_text()
        assert f"Warden is listening on 127.0.0.1:{port}" in banner and f"rules {rules}" in banner
        assert port_file.read_text() == str(metrics)  # WARDEN_ARGS reached warden run
        eval_line = next(x.strip() for x in wait_for_text(out, "agent-env", proc).splitlines() if "agent-env" in x)
        eval_line = eval_line.replace("--token example-coder-token", f"--token {TOKEN}")
        script = (f"{eval_line}\ncurl -sS -f --max-time 20 https://api.test:{tls_origin.port}/via-make && "
                  f"curl -sS -f --max-time 20 https://allowed.test:{tls_origin.port}/passed")
        r = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"HOME={tmp_path}", "SSL_CERT_DIR=/etc/ssl/certs",
                            "CURL_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt", "bash", "-c", script],
                           capture_output=True, text=True, timeout=60)
        # api.test: Warden verified the origin with UPSTREAM_CA; allowed.test (passed through): the
        # bundle make run wrote holds UPSTREAM_CA as an extra CA.
        assert r.returncode == 0, r.stderr
        assert '"path": "/via-make"' in r.stdout and '"path": "/passed"' in r.stdout
        wait_for_port(port)
        assert any(x.get("path") == "/via-make" for x in
                   (yaml.safe_load(line) for line in audit.read_text().splitlines()))
    finally:
        stop_make_run(proc)
    assert_port_released(port)


def assert_port_released(port: int, timeout: float = 15) -> None:
    """Warden went down with make: the port can be listened on again (TIME_WAIT aside)."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.1)


def test_make_run_port_in_use_prints_no_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, out, err = start_make_run(tmp_path, LISTEN=f"127.0.0.1:{port}", METRICS_LISTEN=f"127.0.0.1:{free_port()}",
                                        CONFDIR=str(tmp_path / "ca"), AUDIT_LOG=str(tmp_path / "a.jsonl"))
        try:
            proc.wait(90)
        finally:
            stop_make_run(proc)
    assert proc.returncode != 0
    assert "Warden is listening" not in out.read_text()
    assert f"warden: 127.0.0.1:{port} is already in use (another Warden?)" in err.read_text()


def test_make_test_shows_skip_reasons(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe_skip.py"
    probe.write_text('import pytest\n\n\ndef test_x() -> None:\n    pytest.skip("needs the probe thing")\n')
    r = subprocess.run(["make", "-s", "-C", str(REPO), "-o", ".venv/.installed", "-o", "system-deps", "test",
                        f"PYTEST_ARGS={probe} -p no:cacheprovider"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"SKIPPED \[1\] .*test_probe_skip.py:\d+: needs the probe thing", r.stdout), r.stdout
