"""End to end: a real `warden run` subprocess injects, strips, guards and redacts credentials.

One Warden and one TLS origin per module. The origin answers 401 unless it receives
`Authorization: Bearer <secret>`; the agent never holds the secret.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml

from .harness import WARDEN, Warden, curl, echo_handler, hosts_file, run_origin, sha256_hex, start_warden

SECRET = "ghp_E2eSecretValue_9f8e7d6c5b4a3210zz"
PLACEHOLDER = "WARDEN-PLACEHOLDER-GITHUB"
BIG_LIMIT = 65536


def _handler(req: Any, body: bytes) -> tuple[int, dict[str, str], bytes]:
    if req.headers.get("Authorization") != f"Bearer {SECRET}":
        return 401, {"Content-Type": "text/plain"}, b"unauthorized\n"
    if req.path.startswith("/echo"):
        return echo_handler(req, body)  # echoes the injected Authorization header back
    if req.path.startswith("/big"):
        return 200, {"X-Echo": f"token={SECRET}"}, b"x" * 200_000 + SECRET.encode() + b"y" * 1000
    if req.path.startswith("/placeholder"):
        return 200, {}, f"got {req.headers.get('X-Token') == SECRET}\n".encode()
    return 200, {"Content-Type": "text/plain"}, b"hello from the bound host\n"


@pytest.fixture(scope="module")
def env(origin_ca, origin_ca_file: Path, shared_confdir: Path, tmp_path_factory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("cred-e2e")
    with run_origin(_handler, ca=origin_ca) as origin, run_origin(_handler) as plain:
        ports = [origin.port, plain.port]
        rules = {
            "agents": [{"id": "coder", "token_sha256": [sha256_hex("tok-coder")], "policies": ["p"]},
                       {"id": "other", "token_sha256": [sha256_hex("tok-other")], "policies": ["q"]}],
            "policies": {
                "p": {"allow": [{"host": "cred.test", "ports": ports}, {"host": "leak.test", "ports": ports},
                                {"cidr": "127.0.0.1/32", "ports": ports}],
                      "credentials": [{"id": "github", "host": "cred.test", "ports": ports,
                                       "inject": {"Authorization": "Bearer ${secret:GH_TOKEN}"},
                                       "strip": ["Authorization"], "placeholder": PLACEHOLDER}],
                      "strip": ["Cookie"]},
                "q": {"allow": [{"host": "cred.test", "ports": ports}, {"cidr": "127.0.0.1/32", "ports": ports}]},
            },
            "settings": {"hosts_file": str(hosts_file(work / "hosts")), "tls_intercept": "always",
                         "body_scan": {"max_buffered_bytes": BIG_LIMIT}},
        }
        warden = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                              env={"GH_TOKEN": secret_env()}, agents={"coder": "tok-coder", "other": "tok-other"})
        try:
            yield {"warden": warden, "origin": origin, "plain": plain, "work": work}
        finally:
            warden.stop()


def secret_env() -> str:
    return SECRET


def _get(w: Warden, agent: str, url: str, *args: str) -> tuple[int, dict[str, str], str]:
    r = curl(["-D", "-", "--suppress-connect-headers", "--cacert", str(w.ca_cert), *args, url],
             env={"HTTPS_PROXY": w.proxy_url(agent), "http_proxy": w.proxy_url(agent)})
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def _audit_reason(w: Warden, path_part: str) -> dict:
    def found(records: list[dict]) -> bool:
        return any(r.get("path") and path_part in r["path"] and r.get("reason") == "secret_leak" for r in records)
    records = w.audit_records(found)
    match = [r for r in records if r.get("path") and path_part in r["path"] and r.get("reason") == "secret_leak"]
    assert match, [r for r in records if r.get("path") and path_part in r["path"]]
    return match[-1]


def test_injects_secret_and_strips_agent_authorization(env):
    w, o = env["warden"], env["origin"]
    status, _, body = _get(w, "coder", f"https://cred.test:{o.port}/hello", "-H", "Authorization: Bearer agent-own",
                           "-H", "Cookie: session=abc")
    assert status == 200 and "bound host" in body
    seen = o.seen[-1]["headers"]
    assert seen["Authorization"] == f"Bearer {SECRET}" and "Cookie" not in seen
    rec = w.audit_records(lambda rs: any(r.get("path") == "/hello" and r.get("status") for r in rs))
    assert any(r.get("path") == "/hello" and "github" in (r.get("credential_ids") or []) for r in rec)


def test_other_agent_without_credential_gets_401(env):
    w, o = env["warden"], env["origin"]
    status, _, _ = _get(w, "other", f"https://cred.test:{o.port}/hello")
    assert status == 401


def test_plain_http_never_injected(env):
    w, p = env["warden"], env["plain"]
    status, _, _ = _get(w, "coder", f"http://cred.test:{p.port}/hello")
    assert status == 401
    status, headers, body = _get(w, "coder", f"http://cred.test:{p.port}/hello", "-H", f"X-Token: {PLACEHOLDER}")
    assert status == 403 and headers["x-warden-reason"] == "secret_leak" and "secret_leak" in body


@pytest.mark.parametrize("name,args", [
    ("header", ["-H", f"X-Leak: {SECRET}"]),
    ("basic", ["-H", "Authorization: Basic " + base64.b64encode(f"me:{SECRET}".encode()).decode()]),
    ("b64url", ["-H", "X-Leak: " + base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("=")]),
    ("query", []),
    ("json", ["--json", json.dumps({"token": SECRET})]),
])
def test_secret_to_other_host_denied(env, name, args):
    w, o = env["warden"], env["origin"]
    before = len(o.seen)
    path = f"/leak-{name}" + (f"?q={quote(SECRET, safe='')}" if name == "query" else "")
    status, headers, body = _get(w, "coder", f"https://leak.test:{o.port}{path}", *args)
    assert status == 403 and headers["x-warden-reason"] == "secret_leak", body
    assert "secret_leak" in body and SECRET not in body
    assert len(o.seen) == before
    rec = _audit_reason(w, f"/leak-{name}")
    assert "secret_leak" in rec.get("events", [])


def test_placeholder_replaced_on_bound_host_denied_elsewhere(env):
    w, o = env["warden"], env["origin"]
    status, _, body = _get(w, "coder", f"https://cred.test:{o.port}/placeholder", "-H", f"X-Token: {PLACEHOLDER}")
    assert status == 200 and body.strip() == "got True"
    status, headers, _ = _get(w, "coder", f"https://leak.test:{o.port}/leak-ph", "-H", f"X-Token: {PLACEHOLDER}")
    assert status == 403 and headers["x-warden-reason"] == "secret_leak"


def test_echoed_secret_is_redacted(env):
    w, o = env["warden"], env["origin"]
    status, _, body = _get(w, "coder", f"https://cred.test:{o.port}/echo")
    assert status == 200 and SECRET not in body and "[REDACTED by warden]" in body
    status, headers, body = _get(w, "coder", f"https://cred.test:{o.port}/big")  # streamed: > max_buffered
    assert status == 200 and SECRET not in body and SECRET not in json.dumps(headers)
    assert body.count("[REDACTED by warden]") == 1 and len(body) == 201_000 + len("[REDACTED by warden]")


def test_large_streamed_body_with_secret_is_stopped(env):
    w, o = env["warden"], env["origin"]
    before = [s for s in o.seen]
    big = env["work"] / "big.bin"
    big.write_bytes(b"a" * 150_000 + SECRET.encode() + b"b" * 150_000)
    r = curl(["--cacert", str(w.ca_cert), "--data-binary", f"@{big}", "-w", "\n%{http_code}",
              f"https://leak.test:{o.port}/leak-stream"],
             env={"HTTPS_PROXY": w.proxy_url("coder")})
    assert r.stdout.strip().endswith("403") and "secret_leak" in r.stdout, r.stdout[-300:]
    for s in o.seen[len(before):]:
        assert SECRET.encode() not in s["body"] and b"ghp_" not in s["body"]
    rec = _audit_reason(w, "/leak-stream")
    assert "secret_leak" in rec.get("events", [])
    # a clean large body still passes through the bound host
    big.write_bytes(b"c" * 300_000)
    r = curl(["--cacert", str(w.ca_cert), "--data-binary", f"@{big}", "-w", "\n%{http_code}",
              f"https://cred.test:{o.port}/upload"], env={"HTTPS_PROXY": w.proxy_url("coder")})
    assert r.stdout.strip().endswith("200"), r.stdout[-200:]
    assert len(o.seen[-1]["body"]) == 300_000


def test_missing_secret_fails_check_with_credential_id(tmp_path):
    rules = {"agents": [{"id": "coder", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
             "policies": {"p": {"allow": [{"host": "cred.test"}],
                                "credentials": [{"id": "github-missing", "host": "cred.test",
                                                 "inject": {"Authorization": "Bearer ${secret:WARDEN_NO_SUCH_VAR}"}}]}}}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    r = subprocess.run([WARDEN, "check", str(tmp_path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert "github-missing" in r.stdout + r.stderr


def test_http2_inject_and_leak(env):
    w, o = env["warden"], env["origin"]
    status, _, body = _get(w, "coder", f"https://cred.test:{o.port}/hello", "--http2")
    assert status == 200 and "bound host" in body
    status, headers, _ = _get(w, "coder", f"https://leak.test:{o.port}/leak-h2", "--http2",
                              "--json", json.dumps({"t": SECRET}))
    assert status == 403 and headers["x-warden-reason"] == "secret_leak"


def test_zz_secret_never_in_audit_metrics_or_output(env):
    """Runs last (module order): checks everything the tests above made Warden write."""
    w, o = env["warden"], env["origin"]
    # A final request whose audit record proves the writer got past every earlier one (it
    # writes in order), so the audit check below cannot pass on a log not yet flushed.
    status, _, _ = _get(w, "coder", f"https://cred.test:{o.port}/zz-last-request")
    assert status == 200
    records = w.audit_records(lambda rs: any("/zz-last-request" in (r.get("path") or "") for r in rs), timeout=10)
    assert any("/zz-last-request" in (r.get("path") or "") for r in records), records[-3:]
    metrics = w.metrics_text()
    assert "warden_secret_leaks_total" in metrics and "warden_credentials_injected_total" in metrics
    w.stop()  # flushes Warden's own output; the fixture's stop() is then a no-op
    forms = [SECRET, base64.b64encode(SECRET.encode()).decode().rstrip("="), quote(SECRET, safe="")]
    audit = w.audit_path.read_text()
    output = w.output()
    assert '"event":"shutdown"' in audit, "the audit log was not closed cleanly"
    assert "secret_leak" in audit
    for form in forms:
        assert form not in audit, "secret in audit log"
        assert form not in metrics, "secret in metrics"
        assert form not in output, "secret in warden output"
    assert "has crashed" not in output and "Traceback" not in output
