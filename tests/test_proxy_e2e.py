"""End to end: a real `warden run` subprocess, real curl/requests clients, real TLS origins (127.0.0.1)."""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import trustme
from egresswarden.record.journal import verify_chain

from .harness import WARDEN, Origin, Warden, curl, hosts_file, run_origin, sha256_hex, start_warden

pytestmark = pytest.mark.e2e

TOKENS = {"coder": "coder-token", "claw": "claw:token-with-colon"}


def rules_for(tls: Origin, plain: Origin, hosts: Path) -> dict:
    return {
        "agents": [
            {"id": "coder", "token_sha256": [sha256_hex(TOKENS["coder"])], "policies": ["main"]},
            {"id": "claw", "token_sha256": [sha256_hex(TOKENS["claw"])], "policies": ["main"], "mode": "report"},
        ],
        "policies": {"main": {"allow": [
            {"id": "allowed-tls", "host": "allowed.test", "ports": [tls.port]},
            {"id": "allowed-plain", "host": "allowed.test", "ports": [plain.port]},
            {"id": "api-read", "host": "api.test", "ports": [tls.port], "methods": ["GET"], "paths": ["/ok/**"]},
            {"id": "internal", "host": "internal.test", "ports": [tls.port + 1 if tls.port < 65535 else 1]},
            {"id": "metadata-name", "host": "metadata.test", "ports": [80]},
            {"id": "loopback-origins", "cidr": "127.0.0.1/32", "ports": [tls.port, plain.port]},
        ]}},
        "deny": [{"id": "no-denied", "host": "denied.test"}, {"id": "no-metadata", "cidr": "169.254.169.254/32"}],
        "settings": {"hosts_file": str(hosts), "explain_denials": "status"},  # in-band: test_explain_e2e
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, origin_ca: trustme.CA, origin_ca_file: Path,
        shared_confdir: Path) -> Iterator[tuple[Warden, Origin, Origin]]:
    work = tmp_path_factory.mktemp("core")
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        hosts = hosts_file(work / "hosts")
        with (work / "hosts").open("a") as f:
            f.write("169.254.169.254 metadata.test\n")
        warden = start_warden(work, rules_for(tls, plain, hosts), upstream_ca=origin_ca_file, confdir=shared_confdir,
                              agents=TOKENS)
        try:
            yield warden, tls, plain
        finally:
            warden.stop()


def proxy_env(w: Warden, agent: str | None = "coder", token: str | None = None) -> dict[str, str]:
    url = w.proxy_url(agent, token) if agent else w.proxy_url()
    return {"https_proxy": url, "http_proxy": url, "HTTPS_PROXY": url}


def connect_raw(w: Warden, target: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes, socket.socket]:
    """Send a CONNECT by hand and return (status, headers, body, socket) — clients hide CONNECT bodies."""
    sock = socket.create_connection(("127.0.0.1", w.port), timeout=10)
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines if ":" in h)}
    length = int(hdrs.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(status_line.split()[1]), hdrs, body, sock


def auth(agent: str, token: str) -> dict[str, str]:
    return {"Proxy-Authorization": "Basic " + base64.b64encode(f"{agent}:{token}".encode()).decode()}


def records_for(w: Warden, predicate) -> list[dict]:  # noqa: ANN001
    return [r for r in w.audit_records(lambda rs: any(predicate(r) for r in rs)) if predicate(r)]


def test_allowed_host_is_passed_through_not_intercepted(env, origin_ca_file: Path) -> None:
    w, tls, _ = env
    # Trusting ONLY the origin's CA proves the agent sees the origin's real certificate.
    r = curl(["--cacert", str(origin_ca_file), "-w", "\n%{http_code}", f"https://allowed.test:{tls.port}/hello"],
             env=proxy_env(w))
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("200") and '"path": "/hello"' in r.stdout
    connect = records_for(w, lambda x: x.get("event") == "connect" and x.get("host") == "allowed.test")[-1]
    assert connect["decision"] == "allow" and connect["interception"] == "passthrough"
    assert connect["rule_id"] == "allowed-tls" and connect["agent"] == "coder"
    closed = records_for(w, lambda x: x.get("event") == "tunnel_close" and x["request_id"] == connect["request_id"])
    assert closed and closed[0]["bytes_up"] > 0 and closed[0]["bytes_down"] > 0


def test_path_rule_intercepts_and_decides_per_request(env, origin_ca_file: Path) -> None:
    w, tls, _ = env
    ok = curl(["--cacert", str(w.ca_cert), "-w", "\n%{http_code}", f"https://api.test:{tls.port}/ok/1?token=s3"],
              env=proxy_env(w))
    assert ok.stdout.endswith("200"), ok.stderr
    wrong_path = curl(["--cacert", str(w.ca_cert), "-w", "\n%{http_code}", f"https://api.test:{tls.port}/admin"],
                      env=proxy_env(w))
    assert wrong_path.stdout.endswith("403")
    assert "path_not_allowed" in wrong_path.stdout and "api-read" in wrong_path.stdout
    wrong_method = curl(["--cacert", str(w.ca_cert), "-X", "POST", "-d", "x", "-w", "\n%{http_code}",
                         f"https://api.test:{tls.port}/ok/1"], env=proxy_env(w))
    assert wrong_method.stdout.endswith("403") and "method_not_allowed" in wrong_method.stdout
    assert not any(s["path"] == "/admin" for s in tls.seen), "denied request reached the origin"
    wanted = {"allowed", "path_not_allowed", "method_not_allowed"}

    def api_requests(records: list[dict]) -> list[dict]:
        return [r for r in records if r.get("event") == "request" and r.get("host") == "api.test"]

    reqs = api_requests(w.audit_records(lambda rs: {r["reason"] for r in api_requests(rs)} >= wanted))
    assert {r["reason"] for r in reqs} >= wanted
    assert any(r["path"] == "/ok/1?token=REDACTED" for r in reqs), "query values must be redacted"
    assert all(r["interception"] == "intercept" for r in reqs)


def test_python_requests_client(env) -> None:
    w, tls, plain = env
    proxies = {"https": w.proxy_url("coder"), "http": w.proxy_url("coder")}
    with requests.Session() as s:
        s.trust_env = False
        r = s.get(f"https://api.test:{tls.port}/ok/requests", proxies=proxies, verify=str(w.ca_cert), timeout=10)
        assert r.status_code == 200 and r.json()["path"] == "/ok/requests"
        r = s.get(f"http://allowed.test:{plain.port}/plain", proxies=proxies, timeout=10)
        assert r.status_code == 200
        headers = {k.lower() for k in r.json()["headers"]}
        assert "proxy-authorization" not in headers and "proxy-connection" not in headers


def test_denied_at_connect_with_readable_reason(env) -> None:
    w, tls, _ = env
    before = len(tls.seen)
    status, headers, body, sock = connect_raw(w, f"denied.test:{tls.port}", auth("coder", TOKENS["coder"]))
    sock.close()
    assert status == 403 and headers["x-warden-reason"] == "deny_listed"
    text = body.decode()
    assert "deny_listed" in text and "no-denied" in text and "global deny list" in text
    # other.test resolves into the loopback cidr rule, but not on this port: nothing allows it.
    status, _, body, sock = connect_raw(w, f"other.test:{tls.port + 2}", auth("coder", TOKENS["coder"]))
    sock.close()
    assert status == 403 and b"no_matching_rule" in body
    assert len(tls.seen) == before


@pytest.mark.parametrize("header", [
    None, "Basic", "Basic !!!", "Bearer x", "Basic " + base64.b64encode(b"coder:wrong").decode(),
    "Basic " + base64.b64encode(b"ghost:coder-token").decode(), "Basic " + "A" * 6000,
    "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(),
])
def test_missing_wrong_or_garbage_credentials_get_407(env, header: str | None) -> None:
    w, tls, _ = env
    status, headers, body, sock = connect_raw(w, f"allowed.test:{tls.port}",
                                              {"Proxy-Authorization": header} if header else {})
    sock.close()
    assert status == 407
    assert headers["proxy-authenticate"] == 'Basic realm="warden"'
    assert b"coder-token" not in body


def test_token_containing_colon_and_git_style_challenge(env, origin_ca_file: Path) -> None:
    w, tls, _ = env
    # curl --proxy-anyauth sends no credentials until challenged, like git.
    r = curl(["--proxy-anyauth", "--cacert", str(origin_ca_file), "-w", "\n%{http_code}",
              f"https://allowed.test:{tls.port}/colon"], env=proxy_env(w, "claw", TOKENS["claw"]))
    assert r.stdout.endswith("200"), r.stderr


def test_report_mode_allows_and_records_would_deny(env) -> None:
    w, tls, _ = env
    # No host rule names leak.test: report mode lets it through; its address is covered by the
    # loopback cidr rule on this port, so the private-address guard passes too.
    status, _, _, sock = connect_raw(w, f"leak.test:{tls.port}", auth("claw", TOKENS["claw"]))
    sock.close()
    assert status == 200
    rec = records_for(w, lambda x: x.get("event") == "connect" and x.get("agent") == "claw"
                      and x.get("host") == "leak.test")[-1]
    assert rec["decision"] == "report" and rec["reason"] == "no_matching_rule"


def test_report_mode_never_softens_the_private_address_guard(env) -> None:
    """Finding 10: a report-mode agent reached 127.0.0.1 on a port no cidr rule covers."""
    w, tls, _ = env
    for target in (f"other.test:{tls.port + 2}", f"127.0.0.1:{tls.port + 2}"):
        status, headers, _, sock = connect_raw(w, target, auth("claw", TOKENS["claw"]))
        sock.close()
        assert status == 403 and headers["x-warden-reason"] == "private_address", target


def test_ssrf_private_address_and_metadata_refused(env) -> None:
    w, tls, _ = env
    # internal.test resolves (hosts file) to 127.0.0.1, and no cidr rule covers that port.
    status, _, body, sock = connect_raw(w, f"internal.test:{tls.port + 1}", auth("coder", TOKENS["coder"]))
    sock.close()
    assert status == 403 and b"private_address" in body and b"127.0.0.1" in body
    # metadata.test resolves to 169.254.169.254: denied by the deny cidr even though the name is allowed.
    r = curl(["-w", "\n%{http_code}", "http://metadata.test/latest/meta-data/"], env=proxy_env(w))
    assert r.stdout.endswith("403") and "deny_listed" in r.stdout and "no-metadata" in r.stdout
    r = curl(["-w", "\n%{http_code}", "http://169.254.169.254/latest/meta-data/"], env=proxy_env(w))
    assert r.stdout.endswith("403") and "deny_listed" in r.stdout
    assert "private_address" in w.metrics_text()  # counted


def test_sni_fronting_refused(env, origin_ca_file: Path) -> None:
    w, tls, _ = env
    status, _, _, sock = connect_raw(w, f"allowed.test:{tls.port}", auth("coder", TOKENS["coder"]))
    assert status == 200
    ctx = ssl.create_default_context(cafile=str(w.ca_cert))
    with ctx.wrap_socket(sock, server_hostname="other.test") as tls_sock:
        tls_sock.sendall(f"GET /fronted HTTP/1.1\r\nHost: other.test:{tls.port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls_sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 403") and b"sni_mismatch" in data
    assert not any(s["path"] == "/fronted" for s in tls.seen)


def test_host_header_fronting_refused(env) -> None:
    w, tls, plain = env
    r = curl(["--cacert", str(w.ca_cert), "-H", f"Host: other.test:{tls.port}", "-w", "\n%{http_code}",
              f"https://api.test:{tls.port}/ok/x"], env=proxy_env(w))
    assert r.stdout.endswith("403") and "host_mismatch" in r.stdout
    r = curl(["-H", "Host: other.test", "-w", "\n%{http_code}", f"http://allowed.test:{plain.port}/x"], env=proxy_env(w))
    assert r.stdout.endswith("403") and "host_mismatch" in r.stdout


@pytest.mark.parametrize("target", ["a..b:443", "0x7f.1:443", ("x" * 70 + ".") * 5 + "com:443", "exa$mple.com:443"])
def test_absurd_host_names_refused(env, target: str) -> None:
    w, _, _ = env
    status, _, _, sock = connect_raw(w, target, auth("coder", TOKENS["coder"]))
    sock.close()
    assert status in (400, 403)


def test_audit_chain_verifies_and_detects_tampering(env, tmp_path: Path) -> None:
    w, _, _ = env
    lines = w.audit_path.read_bytes().splitlines(keepends=True)
    assert len(lines) > 5
    copy = tmp_path / "audit.jsonl"
    copy.write_bytes(b"".join(lines))
    assert verify_chain([copy]).ok
    edited = lines[:]
    edited[3] = edited[3].replace(b'"decision":"allow"', b'"decision":"deny"').replace(b'"decision":"deny"', b'"decision":"allow"', 1)
    if edited[3] == lines[3]:
        edited[3] = edited[3].replace(b'"event":"', b'"event":"x', 1)
    copy.write_bytes(b"".join(edited))
    result = subprocess.run([WARDEN, "audit", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"{copy}:4" in result.stdout  # the edited line itself
    deleted = lines[:2] + lines[3:]
    copy.write_bytes(b"".join(deleted))
    result = subprocess.run([WARDEN, "audit", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"{copy}:3" in result.stdout


def test_metrics_page_parses_and_counts(env) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    w, _, _ = env
    families = {f.name: f for f in text_string_to_metric_families(w.metrics_text())}
    connects = {tuple(sorted(s.labels.items())): s.value for s in families["warden_connects"].samples
                if s.name == "warden_connects_total"}
    assert any(dict(k).get("decision") == "deny" and dict(k).get("reason") == "deny_listed" for k in connects)
    assert families["warden_rules_loaded"].samples[0].value == 8
    for sample in families["warden_requests"].samples:
        assert set(sample.labels) <= {"agent", "decision", "reason"}


def test_invalid_rules_refuse_to_start(tmp_path: Path) -> None:
    rules = "agents:\n  - id: a\n    token_sha256: ['" + "0" * 64 + "']\n    policies: [p]\npolicies:\n  p:\n    allow:\n      - host: '*.com'\n"
    w = start_warden(tmp_path, [("bad.yaml", rules)], expect_start=False)
    try:
        code = w.proc.wait(30)
    finally:
        w.stop()
    assert code != 0
    assert "bad.yaml:8" in w.output() and "public suffix" in w.output()


def test_reload_good_and_broken_under_traffic(tmp_path: Path, origin_ca: trustme.CA, origin_ca_file: Path,
                                             shared_confdir: Path) -> None:
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        hosts = hosts_file(tmp_path / "hosts")

        def with_other() -> dict:  # a name needs a host rule (a cidr rule allows IP literals only)
            rules = rules_for(tls, plain, hosts)
            rules["policies"]["main"]["allow"].append({"id": "other-plain", "host": "other.test", "ports": [plain.port]})
            return rules
        base = with_other()
        w = start_warden(tmp_path, base, upstream_ca=origin_ca_file, confdir=shared_confdir, agents=TOKENS)
        try:
            proxies = {"http": w.proxy_url("coder")}
            url = f"http://allowed.test:{plain.port}/x"
            other = f"http://other.test:{plain.port}/x"
            failures = 0
            with requests.Session() as s:
                s.trust_env = False
                assert s.get(other, proxies=proxies, timeout=10).status_code == 200
                # Good change: deny other.test for everyone. Traffic keeps flowing meanwhile.
                good = with_other()
                good["deny"].append({"id": "no-other", "host": "other.test"})
                w.write_rules(good)
                changed_at = time.monotonic()
                took = None
                while time.monotonic() - changed_at < 5:
                    if s.get(url, proxies=proxies, timeout=10).status_code != 200:
                        failures += 1
                    if s.get(other, proxies=proxies, timeout=10).status_code == 403:
                        took = time.monotonic() - changed_at
                        break
                assert took is not None and took < 2.0, f"reload took {took}"
                # Broken change: the last good rules stay in force.
                (w.rules_dir / "rules.yaml").write_text("agents: [\n")
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    if s.get(url, proxies=proxies, timeout=10).status_code != 200:
                        failures += 1
                    if s.get(other, proxies=proxies, timeout=10).status_code != 403:
                        failures += 1
            assert failures == 0
            reloads = [r for r in w.audit_records() if r.get("event") == "reload"]
            assert [r["result"] for r in reloads][:2] == ["success", "failure"]
            assert "rules.yaml:2" in reloads[1]["error"]
            metrics = w.metrics_text()
            assert "warden_reloads_total{result=\"failure\"} 1.0" in metrics, [m for m in metrics.splitlines() if "reloads_total" in m]
        finally:
            w.stop()


def test_flow_recording_options_are_refused(tmp_path: Path) -> None:
    """warden run does not load mitmproxy's save/map/modify addons: setting their options is an error."""
    rules = {"agents": [{"id": "a", "token_sha256": ["0" * 64], "policies": []}], "policies": {}}
    w = start_warden(tmp_path, rules, extra_args=["--set", f"save_stream_file={tmp_path / 'flows'}"],
                     expect_start=False)
    try:
        code = w.proc.wait(30)
    finally:
        w.stop()
    assert code != 0 and "save_stream_file" in w.output()
    assert not (tmp_path / "flows").exists()
