"""Issue 15 item 2 (and 3): `warden agent-env` output is all an agent's shell needs.

Every client runs in `env -i PATH=/usr/bin:/bin HOME=<tmp>` plus `eval "$(warden agent-env ...)"`
and nothing else, through a real `warden run`, against one real TLS origin reached under two
names: `api.test` (method rules: intercepted, so the client must trust Warden's CA) and
`allowed.test` (passed through, so the client must trust the origin's own CA, which
`warden ca bundle --extra-ca` adds, as an internal CA would be). Clients: curl, requests,
httpx, git (dumb HTTP clone), pip (download from a simple index the origin serves) and
Node (undici's EnvHttpProxyAgent, installed from npm into the venv: Node 20 has no
NODE_USE_ENV_PROXY; where Node has it, native fetch is tried as well).

One variant starts from a shell that already exports SSL_CERT_DIR/CURL_CA_BUNDLE/SSL_CERT_FILE
(as this machine and many images do) and a stale proxy identity: the output must override all.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import trustme
import yaml

from .harness import REPO, VENV_BIN, WARDEN, Origin, Warden, hosts_file, run_origin, sha256_hex, start_warden

pytestmark = pytest.mark.e2e

TOKENS = {"coder": "coder-first-hour-token", "claw": "claw-first-hour-token"}
PYTHON = str(VENV_BIN / "python")
WHEEL_NAME = "wardenprobe-1.0-py3-none-any.whl"
UNDICI_DIR = REPO / ".venv" / "node-undici"
PRESET = {  # what this machine's own shell exports, plus a stale identity for another proxy
    "SSL_CERT_DIR": "/etc/ssl/certs",
    "CURL_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt",
    "REQUESTS_CA_BUNDLE": "/etc/ssl/certs/ca-certificates.crt",
    "HTTPS_PROXY": "http://stale:stale@127.0.0.1:9", "https_proxy": "http://stale:stale@127.0.0.1:9",
    "ALL_PROXY": "socks5://127.0.0.1:9",
}


def make_wheel() -> bytes:
    buf = io.BytesIO()
    files = {
        "wardenprobe/__init__.py": b"",
        "wardenprobe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: wardenprobe\nVersion: 1.0\n",
        "wardenprobe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + "wardenprobe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("wardenprobe-1.0.dist-info/RECORD", record)
    return buf.getvalue()


def make_git_repo(root: Path) -> None:
    """A bare repo served over git's dumb HTTP protocol (static files)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root), "GIT_CONFIG_NOSYSTEM": "1"}
    work = root / "work"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(work)], check=True, env=env)
    (work / "README").write_text("through warden\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True, env=env)
    subprocess.run([*git, "-C", str(work), "commit", "-qm", "one"], check=True, env=env)
    subprocess.run([*git, "clone", "-q", "--bare", str(work), str(root / "repo.git")], check=True, env=env)
    subprocess.run(["git", "-C", str(root / "repo.git"), "update-server-info"], check=True, env=env)


def static_handler(root: Path, wheel: bytes):  # noqa: ANN201
    digest = hashlib.sha256(wheel).hexdigest()
    index = (f'<html><body><a href="/files/{WHEEL_NAME}#sha256={digest}">{WHEEL_NAME}</a></body></html>').encode()

    def handle(req: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, str], bytes]:
        path = req.path.split("?", 1)[0]
        if path.rstrip("/") == "/simple/wardenprobe":
            return 200, {"Content-Type": "text/html"}, index
        if path == f"/files/{WHEEL_NAME}":
            return 200, {"Content-Type": "application/octet-stream"}, wheel
        if path.startswith("/repo.git/"):
            target = (root / path.lstrip("/")).resolve()
            if target.is_file() and root.resolve() in target.parents:
                return 200, {"Content-Type": "application/octet-stream"}, target.read_bytes()
            return 404, {}, b"not found"
        return 200, {"Content-Type": "text/plain"}, f"hello {req.command} {path}".encode()

    return handle


@dataclass
class Setup:
    warden: Warden
    origin: Origin
    bundle: Path
    home: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, origin_ca: trustme.CA, origin_ca_file: Path,
          shared_confdir: Path) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("firsthour")
    make_git_repo(work / "git")
    with run_origin(static_handler(work / "git", make_wheel()), ca=origin_ca) as origin:
        rules = {
            "agents": [{"id": a, "token_sha256": [sha256_hex(t)], "policies": ["main"]} for a, t in TOKENS.items()],
            "policies": {"main": {"allow": [
                {"id": "passthrough", "host": "allowed.test", "ports": [origin.port]},
                {"id": "intercepted", "host": "api.test", "ports": [origin.port], "methods": ["GET", "HEAD", "POST"]},
                {"id": "loopback-origin", "cidr": "127.0.0.1/32", "ports": [origin.port]},
            ]}},
            "settings": {"hosts_file": str(hosts_file(work / "hosts"))},
        }
        warden = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir, agents=TOKENS)
        try:
            bundle = work / "trust" / "bundle.pem"  # a directory of its own: SSL_CERT_DIR points here
            made = subprocess.run([WARDEN, "ca", "bundle", "--confdir", str(shared_confdir), "--extra-ca",
                                   str(origin_ca_file), "--out", str(bundle)], capture_output=True, text=True)
            assert made.returncode == 0, made.stderr
            home = work / "home"
            home.mkdir()
            yield Setup(warden, origin, bundle, home)
        finally:
            warden.stop()


def agent_shell(s: Setup, script: str, agent: str = "coder", preset: dict[str, str] | None = None,
                extra_eval: str = "") -> subprocess.CompletedProcess[str]:
    """Run `script` in a shell whose environment is env -i + PATH/HOME (+ preset) + agent-env."""
    token_file = s.home / f"{agent}.token"
    token_file.write_text(TOKENS[agent] + "\n")
    load = (f'eval "$({WARDEN} agent-env --agent {agent} --token-file {token_file} '
            f'--proxy 127.0.0.1:{s.warden.port} --ca-bundle {s.bundle})" || exit 99\n')
    base = {"PATH": "/usr/bin:/bin", "HOME": str(s.home), **(preset or {})}
    return subprocess.run(["env", "-i", *(f"{k}={v}" for k, v in base.items()), "bash", "-c",
                           extra_eval + load + script], capture_output=True, text=True, timeout=120)


def urls(s: Setup, path: str) -> tuple[str, str]:
    return f"https://api.test:{s.origin.port}{path}", f"https://allowed.test:{s.origin.port}{path}"


def audited_request(s: Setup, path: str) -> dict:
    records = s.warden.audit_records(lambda rs: any(r.get("event") == "request" and r.get("path") == path
                                                    for r in rs))
    found = [r for r in records if r.get("event") == "request" and r.get("path") == path]
    assert found, f"no audited request for {path}"
    return found[-1]


def assert_through(s: Setup, path: str, agent: str = "coder") -> None:
    """api.test was intercepted and decided for `agent`; allowed.test reached the origin."""
    rec = audited_request(s, path)
    assert rec["host"] == "api.test" and rec["agent"] == agent and rec["decision"] == "allow", rec
    assert rec["interception"] == "intercept"
    assert any(seen["path"] == path + "/pass" for seen in s.origin.seen)


PRESETS = [pytest.param(None, id="clean shell"), pytest.param(PRESET, id="shell with SSL_CERT_DIR+CURL_CA_BUNDLE set")]


@pytest.mark.parametrize("preset", PRESETS)
def test_curl(setup: Setup, preset: dict[str, str] | None) -> None:
    tag = "/curl" + ("-preset" if preset else "")
    api, passed = urls(setup, tag)
    r = agent_shell(setup, f"curl -sS -f --max-time 20 {api} && curl -sS -f --max-time 20 {passed}/pass", preset=preset)
    assert r.returncode == 0, r.stderr
    assert f"hello GET {tag}" in r.stdout and f"hello GET {tag}/pass" in r.stdout
    assert_through(setup, tag)


def test_old_readme_setup_fails_where_ssl_cert_dir_is_set(setup: Setup) -> None:
    """The control: exporting only SSL_CERT_FILE (the old README) is not enough for curl here."""
    api, _ = urls(setup, "/control")
    proxy = setup.warden.proxy_url("coder")
    r = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", f"HOME={setup.home}", "SSL_CERT_DIR=/etc/ssl/certs",
                        f"SSL_CERT_FILE={setup.bundle}", f"HTTPS_PROXY={proxy}", f"https_proxy={proxy}",
                        "curl", "-sS", "--max-time", "20", api], capture_output=True, text=True, timeout=60)
    assert r.returncode == 60, (r.returncode, r.stderr)  # CURLE_PEER_FAILED_VERIFICATION


@pytest.mark.parametrize("preset", PRESETS)
def test_python_requests_and_httpx(setup: Setup, preset: dict[str, str] | None) -> None:
    suffix = "-preset" if preset else ""
    code = (
        "import sys, requests, httpx\n"
        "api, passed, api2, passed2 = sys.argv[1:]\n"
        "for url in (api, passed):\n"
        "    r = requests.get(url, timeout=20); r.raise_for_status(); print(r.text)\n"
        "with httpx.Client(timeout=20) as c:\n"
        "    for url in (api2, passed2):\n"
        "        r = c.get(url); r.raise_for_status(); print(r.text)\n"
    )
    (setup.home / "clients.py").write_text(code)
    api, passed = urls(setup, "/requests" + suffix)
    api2, passed2 = urls(setup, "/httpx" + suffix)
    r = agent_shell(setup, f"{PYTHON} {setup.home}/clients.py {api} {passed}/pass {api2} {passed2}/pass", preset=preset)
    assert r.returncode == 0, r.stderr
    assert_through(setup, "/requests" + suffix)
    assert_through(setup, "/httpx" + suffix)


@pytest.mark.parametrize("host", ["api.test", "allowed.test"])
def test_git_clone(setup: Setup, host: str) -> None:
    dest = setup.home / f"clone-{host}"
    shutil.rmtree(dest, ignore_errors=True)
    r = agent_shell(setup, f"GIT_TERMINAL_PROMPT=0 git clone -q https://{host}:{setup.origin.port}/repo.git {dest}",
                    preset=PRESET)
    assert r.returncode == 0, r.stderr
    assert (dest / "README").read_text() == "through warden\n"
    if host == "api.test":
        rec = audited_request(setup, "/repo.git/HEAD")
        assert rec["agent"] == "coder" and rec["interception"] == "intercept"


@pytest.mark.parametrize("host", ["api.test", "allowed.test"])
def test_pip_download(setup: Setup, host: str) -> None:
    out = setup.home / f"pip-{host}"
    r = agent_shell(setup, f"{PYTHON} -m pip download --no-deps --no-cache-dir --disable-pip-version-check -q "
                           f"-d {out} --index-url https://{host}:{setup.origin.port}/simple/ wardenprobe",
                    preset=PRESET)
    assert r.returncode == 0, r.stderr
    assert (out / WHEEL_NAME).is_file()
    if host == "api.test":
        assert audited_request(setup, f"/files/{WHEEL_NAME}")["agent"] == "coder"


def node_supports_env_proxy() -> bool:
    """NODE_USE_ENV_PROXY arrived in Node 24.0 and 22.21 (not in 20)."""
    out = subprocess.run(["node", "-p", "process.versions.node"], capture_output=True, text=True, timeout=30).stdout
    major, minor, *_ = (int(x) for x in out.strip().split("."))
    return major >= 24 or (major == 22 and minor >= 21)


@pytest.fixture(scope="module")
def undici() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed (apt-get install nodejs npm)")
    module = UNDICI_DIR / "node_modules" / "undici"
    if not module.is_dir():
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(UNDICI_DIR), "undici@7"],
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            pytest.skip(f"npm could not install undici: {r.stderr[-300:]}")
    return module


def test_node_undici_env_proxy_agent(setup: Setup, undici: Path) -> None:
    script = setup.home / "fetch.cjs"
    script.write_text(
        f"const {{ fetch, EnvHttpProxyAgent }} = require({json.dumps(str(undici))});\n"
        "(async () => {\n"
        "  const dispatcher = new EnvHttpProxyAgent();\n"
        "  for (const url of process.argv.slice(2)) {\n"
        "    const r = await fetch(url, { dispatcher });\n"
        "    if (r.status !== 200) throw new Error(url + ' -> ' + r.status);\n"
        "    console.log(await r.text());\n"
        "  }\n"
        "})().catch((e) => { console.error(String(e), e.cause ? String(e.cause) : ''); process.exit(1); });\n")
    api, passed = urls(setup, "/undici")
    r = agent_shell(setup, f"node {script} {api} {passed}/pass", preset=PRESET)
    assert r.returncode == 0, r.stderr
    assert_through(setup, "/undici")


def test_node_native_fetch_with_node_use_env_proxy(setup: Setup) -> None:
    if shutil.which("node") is None:
        pytest.skip("node not installed")
    if not node_supports_env_proxy():
        pytest.skip("this Node has no NODE_USE_ENV_PROXY (Node 24+ / 22.21+); undici's EnvHttpProxyAgent is tested instead")
    api, passed = urls(setup, "/node-native")
    code = ("(async () => { for (const u of process.argv.slice(1)) { const r = await fetch(u); "
            "if (r.status !== 200) process.exit(1); console.log(await r.text()); } })()")
    r = agent_shell(setup, f"node -e {json.dumps(code)} {api} {passed}/pass", preset=PRESET)
    assert r.returncode == 0, r.stderr
    assert_through(setup, "/node-native")


def test_switching_agent_replaces_every_proxy_variable(setup: Setup) -> None:
    """Loading claw's environment over coder's leaves nothing of coder behind."""
    token_file = setup.home / "coder.token"
    token_file.write_text(TOKENS["coder"])
    first = (f'eval "$({WARDEN} agent-env --agent coder --token-file {token_file} '
             f'--proxy 127.0.0.1:{setup.warden.port} --ca-bundle {setup.bundle})"\n')
    api, _ = urls(setup, "/switched")
    r = agent_shell(setup, f"env | grep -i _proxy= | grep -c coder; curl -sS -f --max-time 20 {api}", agent="claw",
                    extra_eval=first)
    assert r.stdout.startswith("0\n"), r.stdout
    assert r.returncode == 0, r.stderr
    assert audited_request(setup, "/switched")["agent"] == "claw"


def test_output_without_a_token_holds_none(tmp_path: Path) -> None:
    for fmt in ("shell", "dotenv", "compose", "k8s"):
        r = subprocess.run([WARDEN, "agent-env", "--agent", "coder", "--format", fmt, "--ca-bundle",
                            str(tmp_path / "b.pem")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "example-coder-token" not in r.stdout and TOKENS["coder"] not in r.stdout
        for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "SSL_CERT_FILE",
                    "SSL_CERT_DIR", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO",
                    "NODE_EXTRA_CA_CERTS", "NODE_USE_ENV_PROXY"):
            assert var in r.stdout, (fmt, var)
    # Without a token the shell output refuses to load rather than set a token-less proxy URL.
    r = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "bash", "-c",
                        f'eval "$({WARDEN} agent-env --agent coder --ca-bundle {tmp_path}/b.pem 2>/dev/null)" '
                        '&& echo loaded'], capture_output=True, text=True, timeout=60)
    assert "loaded" not in r.stdout and "WARDEN_TOKEN" in r.stderr
    bad = subprocess.run([WARDEN, "agent-env", "--agent", "Bad Id"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "[a-z0-9][a-z0-9_-]*" in bad.stderr


def test_dotenv_and_compose_values_match_the_shell(tmp_path: Path) -> None:
    """All formats carry the same variables and values (dotenv parsed as docker/systemd would)."""
    bundle = tmp_path / "b.pem"
    common = ["--agent", "coder", "--token", "tok", "--proxy", "warden:8080", "--ca-bundle", str(bundle)]
    shell = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "bash", "-c",
                            f'eval "$({WARDEN} agent-env {" ".join(common)} 2>/dev/null)"; env -0'],
                           capture_output=True, text=True, timeout=60).stdout
    shell_env = dict(item.split("=", 1) for item in shell.split("\0") if "=" in item)
    dotenv = subprocess.run([WARDEN, "agent-env", *common, "--format", "dotenv"], capture_output=True, text=True,
                            timeout=60).stdout
    parsed = {k: v.strip("'") for k, v in (line.split("=", 1) for line in dotenv.splitlines()
                                           if line and not line.startswith("#"))}
    compose = yaml.safe_load(subprocess.run([WARDEN, "agent-env", *common, "--format", "compose"], capture_output=True,
                                            text=True, timeout=60).stdout)["environment"]
    for key, value in parsed.items():
        assert shell_env.get(key) == value, key
        assert compose[key] == value, key
    assert parsed["HTTPS_PROXY"] == "http://coder:tok@warden:8080" and parsed["SSL_CERT_DIR"] == str(tmp_path)



def test_k8s_env_refers_only_to_earlier_entries() -> None:
    """Kubernetes expands $(VAR) only from entries defined earlier in the same list (or service
    variables): the token comes from a Secret, the URL is built once, every proxy variable uses it."""
    out = subprocess.run([WARDEN, "agent-env", "--agent", "coder", "--format", "k8s"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    env = yaml.safe_load(out)["env"]
    assert env[0] == {"name": "WARDEN_AGENT_TOKEN",
                      "valueFrom": {"secretKeyRef": {"name": "warden-agent-coder", "key": "token"}}}
    defined = {"WARDEN_SERVICE_HOST"}
    for entry in env:
        for ref in re.findall(r"\$\(([A-Z_]+)\)", entry.get("value", "")):
            assert ref in defined, (entry["name"], ref)
        defined.add(entry["name"])
    values = {e["name"]: e.get("value") for e in env}
    assert values["WARDEN_PROXY_URL"] == "http://coder:$(WARDEN_AGENT_TOKEN)@$(WARDEN_SERVICE_HOST):8080"
    assert all(values[v] == "$(WARDEN_PROXY_URL)" for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"))
    assert "token=" not in out.replace("--from-file=token=", "")  # no token value anywhere
