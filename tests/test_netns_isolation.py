"""The agent's only way out is Warden — shown with real namespaces, curl and git.

Three namespaces joined by two veth pairs (see tests/netns_helpers.py):
agent <-> warden <-> internet, IP forwarding off in the warden namespace.
Origins (HTTPS static server with a dumb-HTTP git repo, a UDP responder on
:53) run in the internet namespace on its own address. Clients run in the
agent namespace via `ip netns exec`. The proxy is always the product: `warden run`
in the warden namespace.

The only skip is for a machine that cannot create network namespaces (no root,
no iproute2): the tools these tests drive (curl, git, getent) are installed by
`make system-deps`, and a missing one fails the test instead of hiding it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .netns_helpers import HELPER, Topology, netns_probe, stop_process

# Hard ceiling per test; every step below has its own smaller timeout.
pytestmark = [pytest.mark.netns, pytest.mark.e2e, pytest.mark.timeout(300)]

VENV_BIN = Path(sys.executable).parent
WARDEN = VENV_BIN / "warden"
ORIGIN_PORT = 8443
PROXY_PORT = 8080
AGENT_ID = "netns-agent"
CURL_MAX_TIME = "15"
SUBPROCESS_TIMEOUT = 40.0


@dataclass
class Origins:
    ca_file: Path  # trustme CA that signed the origin's cert (passthrough: agents trust this)
    head_sha: str  # commit at refs/heads/main of the served repo


@dataclass
class Proxy:
    url: str  # what goes into HTTPS_PROXY
    token: str
    workdir: Path
    audit_log: Path


# ---------------------------------------------------------------- fixtures


def netns_rules(token: str, hosts_file: Path) -> dict[str, object]:
    """The Warden rules these tests run with (the contract in the issue)."""
    return {
        "agents": [
            {
                "id": AGENT_ID,
                "token_sha256": [hashlib.sha256(token.encode()).hexdigest()],
                "policies": ["netns"],
            }
        ],
        "policies": {
            "netns": {
                "allow": [
                    # no methods/paths: passthrough, the agent sees the origin's own cert
                    {"host": "allowed.test", "ports": [ORIGIN_PORT]},
                    # the SSRF guard refuses private addresses unless a cidr allow covers them
                    {"cidr": "10.200.0.0/16", "ports": [ORIGIN_PORT]},
                ]
            }
        },
        "deny": [{"host": "denied.test"}],
        # This agent trusts only the origins' CA (passthrough only), so refusals stay status-only.
        "settings": {"hosts_file": str(hosts_file), "explain_denials": "status"},
    }


def test_netns_rules_match_the_rules_schema(tmp_path: Path) -> None:
    """Catches drift between this file's rules and the owner's schema without needing namespaces."""
    schema_file = Path(__file__).resolve().parents[1] / "addons" / "egresswarden" / "core" / "rules.schema.json"
    import jsonschema

    jsonschema.validate(netns_rules("t", tmp_path / "hosts"), json.loads(schema_file.read_text()))


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    reason = netns_probe()
    if reason:
        pytest.skip(f"cannot create network namespaces here: {reason}")
    t = Topology(suffix=secrets.token_hex(3), subnet=random.randint(0, 255))
    try:
        t.create()
        yield t
    finally:
        t.destroy()  # finalizer runs on failure too: processes by PID, namespaces, /etc/netns dirs
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        assert t.suffix not in leftover, f"namespaces left behind: {leftover}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("netns")


def _git(args: list[str], cwd: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


@pytest.fixture(scope="module")
def origins(topo: Topology, workdir: Path) -> Origins:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("allowed.test", "denied.test", topo.inet_addr)
    cert, key, ca_file = workdir / "origin.pem", workdir / "origin.key", workdir / "origin-ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))

    # A "dumb HTTP" git repo: a bare repo plus `update-server-info` is servable by any static server.
    webroot = workdir / "www"
    webroot.mkdir()
    (webroot / "index.html").write_text("hello from allowed origin\n")
    src = workdir / "src"
    src.mkdir()
    _git(["init", "-q"], src)
    (src / "README").write_text("governed egress\n")
    _git(["add", "README"], src)
    _git(["commit", "-q", "-m", "initial"], src)
    _git(["clone", "-q", "--bare", str(src), str(webroot / "repo.git")], workdir)
    _git(["update-server-info"], webroot / "repo.git")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=src,
        capture_output=True,
        text=True,
        check=True,
        timeout=SUBPROCESS_TIMEOUT,
    ).stdout.strip()

    web = topo.spawn(
        topo.inet_ns,
        [
            sys.executable,
            str(HELPER),
            "https-static",
            "--bind",
            topo.inet_addr,
            "--port",
            str(ORIGIN_PORT),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--root",
            str(webroot),
        ],
        workdir / "origin.log",
    )
    udp = topo.spawn(
        topo.inet_ns,
        [sys.executable, str(HELPER), "udp-responder", "--bind", topo.inet_addr, "--port", "53"],
        workdir / "udp.log",
    )
    # Positive control from the warden namespace: the origin is up and routable
    # from there, so every failure seen from the agent is isolation, not a dead server.
    topo.wait_tcp(topo.warden_ns, topo.inet_addr, ORIGIN_PORT, web, workdir / "origin.log")
    assert udp.poll() is None, (workdir / "udp.log").read_text()
    return Origins(ca_file=ca_file, head_sha=head)


@pytest.fixture(scope="module")
def proxy(topo: Topology, origins: Origins, workdir: Path) -> Iterator[Proxy]:
    token = secrets.token_urlsafe(24)
    hosts = workdir / "hosts"
    hosts.write_text(f"{topo.inet_addr} allowed.test denied.test\n")
    confdir = workdir / "confdir"
    audit = workdir / "audit.jsonl"
    log = workdir / "proxy.log"
    listen = f"{topo.warden_agent_side}:{PROXY_PORT}"
    rules = workdir / "rules"
    rules.mkdir()
    # JSON is YAML; avoids hand-quoting the paths.
    (rules / "netns.yaml").write_text(json.dumps(netns_rules(token, hosts), indent=2))
    argv = [
        str(WARDEN),
        "run",
        "--rules",
        str(rules),
        "--listen",
        listen,
        "--metrics-listen",
        "127.0.0.1:9464",
        "--audit-log",
        str(audit),
        "--confdir",
        str(confdir),
    ]
    p = topo.spawn(topo.warden_ns, argv, log)
    try:
        # Polled from the agent namespace: also proves the agent can reach Warden.
        topo.wait_tcp(topo.agent_ns, topo.warden_agent_side, PROXY_PORT, p, log, timeout=60)
        yield Proxy(f"http://{AGENT_ID}:{token}@{listen}", token, workdir, audit)
    finally:
        stop_process(p)


def agent_env(workdir: Path, proxy_url: str | None = None, ca_file: Path | None = None) -> dict[str, str]:
    """A clean environment: nothing inherited from the test runner's own proxy settings."""
    home = workdir / "agent-home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
    }
    if proxy_url:
        # curl reads lowercase https_proxy (and HTTPS_PROXY); set both like agent images do.
        env.update(HTTPS_PROXY=proxy_url, https_proxy=proxy_url, HTTP_PROXY=proxy_url, http_proxy=proxy_url)
    if ca_file:
        env.update(SSL_CERT_FILE=str(ca_file), CURL_CA_BUNDLE=str(ca_file), GIT_SSL_CAINFO=str(ca_file))
    return env


def curl(topo: Topology, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return topo.run(
        topo.agent_ns,
        [
            "curl",
            "-sS",
            "--max-time",
            CURL_MAX_TIME,
            "--connect-timeout",
            "5",
            "-w",
            "\n%{http_code} %{http_connect}",
            *args,
        ],
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
    )


def codes(r: subprocess.CompletedProcess[str]) -> tuple[str, str]:
    http_code, http_connect = r.stdout.rstrip("\n").rsplit("\n", 1)[-1].split()
    return http_code, http_connect


# ---------------------------------------------------------------- topology


def test_agent_has_only_a_route_to_warden(topo: Topology) -> None:
    r = topo.run(topo.agent_ns, ["ip", "-4", "route", "show", "table", "all"], timeout=10)
    # Normalise whitespace: iproute2 versions differ in trailing spaces.
    routes = [
        " ".join(line.split()) for line in r.stdout.splitlines() if line.strip() and "table local" not in line
    ]
    assert routes == [
        f"10.200.{topo.subnet}.0/30 dev wa{topo.suffix} proto kernel scope link src {topo.agent_addr}"
    ], routes
    # IPv6: link-local only, no default route either.
    r6 = topo.run(topo.agent_ns, ["ip", "-6", "route", "show"], timeout=10)
    assert "default" not in r6.stdout, r6.stdout
    assert all(line.startswith(("fe80::", "multicast")) for line in r6.stdout.splitlines() if line.strip()), (
        r6.stdout
    )


def test_warden_namespace_does_not_forward(topo: Topology) -> None:
    for knob in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        r = topo.run(topo.warden_ns, ["cat", f"/proc/sys/{knob}"], timeout=10)
        assert r.stdout.strip() == "0", knob


# ---------------------------------------------------------------- through the proxy


def test_curl_allowed_host_through_proxy(topo: Topology, origins: Origins, proxy: Proxy) -> None:
    env = agent_env(proxy.workdir, proxy.url, origins.ca_file)
    r = curl(topo, env, f"https://allowed.test:{ORIGIN_PORT}/index.html")
    assert r.returncode == 0, r.stderr
    assert "hello from allowed origin" in r.stdout
    # 200 for the CONNECT and for the request; TLS verified against the origin's own
    # CA only, which proves passthrough (no Warden-minted cert in between).
    assert codes(r) == ("200", "200")


def test_curl_denied_host_gets_403_at_connect(topo: Topology, origins: Origins, proxy: Proxy) -> None:
    env = agent_env(proxy.workdir, proxy.url, origins.ca_file)
    r = curl(topo, env, f"https://denied.test:{ORIGIN_PORT}/index.html")
    assert r.returncode == 56, (r.returncode, r.stderr)  # CURLE_RECV_ERROR: proxy refused the tunnel
    assert codes(r)[1] == "403"
    assert "hello" not in r.stdout


def test_git_ls_remote_and_clone_through_proxy(topo: Topology, origins: Origins, proxy: Proxy) -> None:
    env = agent_env(proxy.workdir, proxy.url, origins.ca_file)
    url = f"https://allowed.test:{ORIGIN_PORT}/repo.git"
    r = topo.run(topo.agent_ns, ["git", "ls-remote", url], env=env, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert f"{origins.head_sha}\trefs/heads/main" in r.stdout
    dest = proxy.workdir / f"clone-{secrets.token_hex(3)}"
    r = topo.run(topo.agent_ns, ["git", "clone", "-q", url, str(dest)], env=env, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert (dest / "README").read_text() == "governed egress\n"


def test_git_denied_host_refused(topo: Topology, origins: Origins, proxy: Proxy) -> None:
    env = agent_env(proxy.workdir, proxy.url, origins.ca_file)
    r = topo.run(
        topo.agent_ns,
        ["git", "ls-remote", f"https://denied.test:{ORIGIN_PORT}/repo.git"],
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert r.returncode != 0
    assert "403" in r.stderr, r.stderr
    assert origins.head_sha not in r.stdout


# ---------------------------------------------------------------- without the proxy: nothing


def test_no_proxy_vars_nothing_gets_out(topo: Topology, origins: Origins, proxy: Proxy) -> None:
    env = agent_env(proxy.workdir, None, origins.ca_file)
    # By address: the kernel has no route, connect() fails at once (curl exit 7).
    r = curl(topo, env, f"https://{topo.inet_addr}:{ORIGIN_PORT}/index.html")
    assert r.returncode == 7, (r.returncode, r.stderr)
    # curl does not print the errno; a bare connect() shows *why*: the kernel has no route.
    r = topo.run(
        topo.agent_ns,
        [sys.executable, str(HELPER), "tcp-probe", topo.inet_addr, str(ORIGIN_PORT)],
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert r.stdout.strip() == "ENETUNREACH", r.stdout
    # By name with the address forced: same, the name is not the reason.
    r = curl(
        topo,
        env,
        "--resolve",
        f"allowed.test:{ORIGIN_PORT}:{topo.inet_addr}",
        f"https://allowed.test:{ORIGIN_PORT}/",
    )
    assert r.returncode == 7, (r.returncode, r.stderr)
    # By name: not even resolvable (curl exit 6).
    r = curl(topo, env, f"https://allowed.test:{ORIGIN_PORT}/")
    assert r.returncode == 6, (r.returncode, r.stderr)
    r = topo.run(
        topo.agent_ns,
        ["git", "ls-remote", f"https://allowed.test:{ORIGIN_PORT}/repo.git"],
        env=env,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert r.returncode != 0 and origins.head_sha not in r.stdout


def test_dns_from_agent_reaches_nothing(topo: Topology, origins: Origins) -> None:
    r = topo.run(topo.agent_ns, ["getent", "hosts", "allowed.test"], timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout)  # 2 = key not found
    # A raw UDP "DNS" probe to the internet namespace: no route from the agent...
    r = topo.run(
        topo.agent_ns,
        [sys.executable, str(HELPER), "udp-probe", topo.inet_addr, "53", "--timeout", "2"],
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert r.returncode in (2, 3), r.stdout  # 2: no route (expected), 3: dropped; never a reply
    # ...while the same probe from the warden namespace gets an answer (responder is live).
    r = topo.run(
        topo.warden_ns,
        [sys.executable, str(HELPER), "udp-probe", topo.inet_addr, "53", "--timeout", "2"],
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert r.returncode == 0, r.stdout


def test_route_via_warden_still_blocked_because_forwarding_is_off(
    topo: Topology, origins: Origins, workdir: Path
) -> None:
    """Defence in depth: an agent that is root in its container adds a default route via Warden."""
    add = topo.run(
        topo.agent_ns, ["ip", "route", "add", "default", "via", topo.warden_agent_side], timeout=10
    )
    assert add.returncode == 0, add.stderr
    try:
        env = agent_env(workdir, None, origins.ca_file)
        r = topo.run(
            topo.agent_ns,
            [
                "curl",
                "-sS",
                "--max-time",
                "4",
                "--connect-timeout",
                "3",
                f"https://{topo.inet_addr}:{ORIGIN_PORT}/",
            ],
            env=env,
            timeout=SUBPROCESS_TIMEOUT,
        )
        # Packets reach the warden namespace and are dropped there (not forwarded): timeout.
        assert r.returncode == 28, (r.returncode, r.stderr)
    finally:
        topo.run(topo.agent_ns, ["ip", "route", "del", "default"], timeout=10)


# ---------------------------------------------------------------- Warden itself


def test_warden_rejects_wrong_or_missing_token(topo: Topology, origins: Origins, proxy: Proxy) -> None:
    bad = proxy.url.replace(proxy.token, "not-the-token")
    r = curl(topo, agent_env(proxy.workdir, bad, origins.ca_file), f"https://allowed.test:{ORIGIN_PORT}/")
    assert codes(r)[1] == "407", (r.returncode, r.stdout, r.stderr)
    anon = f"http://{topo.warden_agent_side}:{PROXY_PORT}"
    r = curl(topo, agent_env(proxy.workdir, anon, origins.ca_file), f"https://allowed.test:{ORIGIN_PORT}/")
    assert codes(r)[1] == "407", (r.returncode, r.stdout, r.stderr)


def test_warden_audits_the_denied_connect(topo: Topology, origins: Origins, proxy: Proxy) -> None:
    env = agent_env(proxy.workdir, proxy.url, origins.ca_file)
    curl(topo, env, f"https://denied.test:{ORIGIN_PORT}/")
    deadline = time.monotonic() + 10  # the audit writer is asynchronous
    records: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        if proxy.audit_log.exists():
            records = [json.loads(line) for line in proxy.audit_log.read_text().splitlines() if line.strip()]
            if any("denied.test" in json.dumps(rec) and "deny" in json.dumps(rec) for rec in records):
                break
        time.sleep(0.2)
    assert any("denied.test" in json.dumps(rec) and "deny" in json.dumps(rec) for rec in records), records[
        -5:
    ]
    assert any(AGENT_ID in json.dumps(rec) for rec in records)
    assert proxy.token not in proxy.audit_log.read_text(), "the proxy token must never be audited"


def test_warden_metrics_and_health_inside_its_namespace(topo: Topology, proxy: Proxy) -> None:
    r = topo.run(
        topo.warden_ns,
        ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9464/healthz"],
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    health = json.loads(r.stdout)
    assert health["status"] == "ok" and health["rules_loaded"] >= 1
    r = topo.run(
        topo.warden_ns,
        ["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9464/metrics"],
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert "warden_connects_total" in r.stdout
    # Metrics are bound to the warden namespace's loopback: the agent cannot scrape them.
    r = curl(topo, agent_env(proxy.workdir), f"http://{topo.warden_agent_side}:9464/metrics")
    assert r.returncode != 0
