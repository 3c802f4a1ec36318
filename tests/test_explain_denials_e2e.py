"""Issue 15 item 1, end to end: a refused CONNECT is explained in-band to real clients.

With `settings.explain_denials: in_band` (the default) Warden accepts a refused CONNECT,
terminates TLS with its own CA and answers the first request with the readable 403; the
denied origin is never resolved or contacted (it is a byte-logging origin: its log stays
empty, without even a TCP connection). With `status` the CONNECT itself gets the 403.
Clients: curl, python requests, httpx, git, pip, and Node's undici where npm provides it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from .bypass_helpers import LoggingOrigin, connect_raw, run_logging_origin
from .harness import Warden, curl, hosts_file, sha256_hex, start_warden

TOKEN = "tok-explain"
READABLE = "Warden refused this request for agent 'coder': no_matching_rule"


def _rules(work: Path, port: int, mode: str) -> dict[str, Any]:
    return {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex(TOKEN)], "policies": ["p"]}],
        "policies": {"p": {"allow": [{"id": "ok", "host": "allowed.test", "ports": [port],
                                      "addresses": ["127.0.0.1/32"]}]}},
        "settings": {"hosts_file": str(hosts_file(work / "hosts")), "explain_denials": mode},
    }


@pytest.fixture(scope="module")
def env(origin_ca: trustme.CA, origin_ca_file: Path, shared_confdir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("explain-e2e")
    with run_logging_origin(ca=origin_ca) as denied:
        warden = start_warden(work, _rules(work, denied.port, "in_band"), upstream_ca=origin_ca_file,
                              confdir=shared_confdir, agents={"coder": TOKEN})
        try:
            yield {"warden": warden, "denied": denied, "work": work}
        finally:
            warden.stop()


@pytest.fixture
def w(env: dict[str, Any]) -> Warden:
    return env["warden"]


@pytest.fixture
def denied(env: dict[str, Any]) -> Iterator[LoggingOrigin]:
    origin: LoggingOrigin = env["denied"]
    origin.reset()
    yield origin
    assert origin.connections == [] and origin.total_bytes == 0, "the denied origin was contacted"


def _url(denied: LoggingOrigin, path: str = "/data") -> str:
    return f"https://denied.test:{denied.port}{path}"


def _client_env(w: Warden) -> dict[str, str]:
    """A clean environment with the proxy and Warden's CA, nothing inherited that could override them."""
    base = {k: v for k, v in os.environ.items()
            if "proxy" not in k.lower() and k not in ("SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE",
                                                       "REQUESTS_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT",
                                                       "NODE_EXTRA_CA_CERTS")}
    proxy = w.proxy_url("coder", TOKEN)
    return {**base, "HTTPS_PROXY": proxy, "https_proxy": proxy, "SSL_CERT_FILE": str(w.ca_cert),
            "REQUESTS_CA_BUNDLE": str(w.ca_cert), "GIT_SSL_CAINFO": str(w.ca_cert), "NO_PROXY": "", "no_proxy": "",
            "GIT_TERMINAL_PROMPT": "0", "HOME": os.environ.get("HOME", "/root")}


def test_curl_shows_the_reason(w: Warden, denied: LoggingOrigin) -> None:
    r = curl(["--cacert", str(w.ca_cert), "-D", "-", "--suppress-connect-headers", _url(denied)], env={"HTTPS_PROXY": w.proxy_url("coder", TOKEN)})
    assert r.returncode == 0, r.stderr
    assert "403" in r.stdout.splitlines()[0] and READABLE in r.stdout, r.stdout
    assert "x-warden-reason: no_matching_rule" in r.stdout.lower()


def test_python_requests_shows_the_reason(w: Warden, denied: LoggingOrigin) -> None:
    import requests

    proxy = w.proxy_url("coder", TOKEN)
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(_url(denied), proxies={"https": proxy}, verify=str(w.ca_cert), timeout=20)
    assert r.status_code == 403 and READABLE in r.text, r.text
    assert r.headers["X-Warden-Reason"] == "no_matching_rule"


def test_httpx_shows_the_reason(w: Warden, denied: LoggingOrigin) -> None:
    import ssl

    import httpx

    ctx = ssl.create_default_context(cafile=str(w.ca_cert))
    with httpx.Client(proxy=w.proxy_url("coder", TOKEN), verify=ctx, trust_env=False, timeout=20) as client:
        r = client.get(_url(denied))
    assert r.status_code == 403 and READABLE in r.text, r.text


def test_git_shows_the_reason(w: Warden, denied: LoggingOrigin, tmp_path: Path) -> None:
    r = subprocess.run(["git", "clone", "--quiet", _url(denied, "/org/repo.git"), str(tmp_path / "repo")],
                       capture_output=True, text=True, env=_client_env(w), timeout=60)
    assert r.returncode != 0
    assert "403" in r.stderr, r.stderr
    assert "no_matching_rule" in r.stderr, r.stderr  # git prints a text/plain error body as `remote: ...`


def _pip(w: Warden, tmp_path: Path, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pip", "--isolated", "download", "--no-deps",
                        "--disable-pip-version-check", "--retries", "0", "--timeout", "15", "--no-cache-dir",
                        "--proxy", w.proxy_url("coder", TOKEN), "--cert", str(w.ca_cert), "-d", str(tmp_path), *args],
                       capture_output=True, text=True, env=_client_env(w), timeout=120)
    assert r.returncode != 0, r.stdout
    return r.stdout + r.stderr


def test_pip_shows_the_reason(w: Warden, denied: LoggingOrigin, tmp_path: Path) -> None:
    # pip never shows an error body, only the status line: the reason phrase carries the code.
    out = _pip(w, tmp_path, _url(denied, "/packages/probe-1.0-py3-none-any.whl"))
    assert "403 Client Error: Refused by Warden: no_matching_rule" in out, out
    # an index page that fails is logged only at -vvv ("... - skipping"), with the same phrase
    out = _pip(w, tmp_path, "-vvv", "--index-url", _url(denied, "/simple"), "warden-explain-probe")
    assert "403 Client Error: Refused by Warden: no_matching_rule" in out, out[-2000:]


def test_status_mode_refuses_the_connect_itself(origin_ca_file: Path, shared_confdir: Path, tmp_path: Path,
                                                origin_ca: trustme.CA) -> None:
    with run_logging_origin(ca=origin_ca) as origin:
        w = start_warden(tmp_path, _rules(tmp_path, origin.port, "status"), upstream_ca=origin_ca_file,
                         confdir=shared_confdir, agents={"coder": TOKEN})
        try:
            sock, status, head = connect_raw(w, "coder", f"denied.test:{origin.port}")
            sock.close()
            assert status == 403 and b"no_matching_rule" in head.lower(), head
            r = curl(["--cacert", str(w.ca_cert), _url(origin)], env={"HTTPS_PROXY": w.proxy_url("coder", TOKEN)})
            assert r.returncode != 0 and "403" in r.stderr, (r.stdout, r.stderr)
            recs = w.audit_records(lambda rs: sum(1 for x in rs if x.get("event") == "connect") >= 2)
            connects = [x for x in recs if x.get("event") == "connect"]
            assert all(x["reason"] == "no_matching_rule" and x["interception"] != "explain" for x in connects)
        finally:
            w.stop()
        assert origin.connections == []


# -- Node: undici's ProxyAgent -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def undici(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed")
    d = tmp_path_factory.mktemp("undici")
    (d / "package.json").write_text(json.dumps({"name": "undici-probe", "version": "1.0.0", "private": True}))
    r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent", "undici@6"], cwd=d,
                       capture_output=True, text=True, timeout=240)
    if r.returncode != 0:
        pytest.skip(f"npm install undici failed: {r.stderr[-300:]}")
    return d


def test_node_undici_shows_the_reason(w: Warden, denied: LoggingOrigin, undici: Path) -> None:
    script = undici / "probe.mjs"
    script.write_text("""
import { ProxyAgent, request } from 'undici';
import { readFileSync } from 'node:fs';
const [url, proxy, ca] = process.argv.slice(2);
const u = new URL(proxy);
const agent = new ProxyAgent({
  uri: `${u.protocol}//${u.host}`,
  token: 'Basic ' + Buffer.from(`${decodeURIComponent(u.username)}:${decodeURIComponent(u.password)}`).toString('base64'),
  requestTls: { ca: readFileSync(ca, 'utf8') },
});
const res = await request(url, { dispatcher: agent });
console.log(JSON.stringify({ status: res.statusCode, reason: res.headers['x-warden-reason'], body: await res.body.text() }));
await agent.close();
""")
    r = subprocess.run(["node", str(script), _url(denied), w.proxy_url("coder", TOKEN), str(w.ca_cert)],
                       capture_output=True, text=True, timeout=60, cwd=undici,
                       env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == 403 and out["reason"] == "no_matching_rule" and READABLE in out["body"], out
