"""`warden explain --json` and a real `warden run` agree, case by case.

One table of requests. For each, `warden explain --json` (a subprocess, offline) predicts
every stage; the same request is then sent with curl through a real Warden to real TLS and
plain origins, and the audit records it wrote must show the same decisions, reasons, rule
ids, interception, injected credential ids and MCP server.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .bypass_helpers import closed_without_answer, open_tunnel
from .harness import (
    ORIGIN_NAMES,
    WARDEN,
    Origin,
    Warden,
    curl,
    free_port,
    hosts_file,
    run_origin,
    sha256_hex,
    start_warden,
)

pytestmark = pytest.mark.e2e

SECRET = "explain-e2e-secret-value-123456"
PING = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})


@dataclass(frozen=True)
class Env:
    warden: Warden
    tls: Origin
    plain: Origin
    closed_port: int  # nothing listens here: refusals must come before any connection
    bundle: Path  # Warden's CA + the origins' CA, for intercepted and passed-through hosts


def _rules(tls: int, plain: int, closed: int, hosts: Path) -> dict[str, Any]:
    return {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex("tok-coder")], "policies": ["p"]},
                   {"id": "rep", "token_sha256": [sha256_hex("tok-rep")], "policies": ["p"], "mode": "report"}],
        "policies": {"p": {
            "allow": [
                {"id": "api-read", "host": "api.test", "ports": [tls], "methods": ["GET"], "paths": ["/v1/**"]},
                {"id": "plain-api", "host": "api.test", "ports": [plain], "methods": ["GET"]},
                {"id": "allowed-any", "host": "allowed.test", "ports": [tls]},
                {"id": "cred-host", "host": "cred.test", "ports": [tls]},
                {"id": "mcp-host", "host": "mcp.test", "ports": [tls]},
                {"id": "other", "host": "other.test", "ports": [tls]},
                {"id": "far-port", "host": "leak.test", "ports": [closed]},
                {"id": "raw-any", "host": "rawtcp.test", "ports": [plain], "raw_tcp": True},
                {"id": "tls-only", "host": "tlsonly.test", "ports": [plain]},
                {"id": "loopback", "cidr": "127.0.0.1/32", "ports": [tls, plain]},
            ],
            "credentials": [{"id": "gh", "host": "cred.test", "ports": [tls], "paths": ["/repos/**"],
                             "inject": {"Authorization": "Bearer ${secret:EXPLAIN_E2E_TOKEN}"}}],
        }},
        "deny": [{"id": "no-denied", "host": "denied.test"},
                 {"id": "no-admin", "host": "other.test", "paths": ["/admin/**"]}],
        "mcp_servers": [{"id": "tools", "url": f"https://mcp.test:{tls}/mcp"}],
        "settings": {"hosts_file": str(hosts)},
    }


@pytest.fixture(scope="module")
def env(origin_ca, origin_ca_file: Path, shared_confdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("explain-e2e")
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        closed = free_port()
        rules = _rules(tls.port, plain.port, closed, hosts_file(work / "hosts", [*ORIGIN_NAMES, "rawtcp.test", "tlsonly.test"]))
        warden = start_warden(work, rules, upstream_ca=origin_ca_file, confdir=shared_confdir,
                              env={"EXPLAIN_E2E_TOKEN": SECRET}, agents={"coder": "tok-coder", "rep": "tok-rep"})
        bundle = work / "bundle.pem"
        bundle.write_text(warden.ca_cert.read_text() + origin_ca_file.read_text())
        try:
            yield Env(warden, tls, plain, closed, bundle)
        finally:
            warden.stop()


# (agent, method, url template); {T}: TLS origin port, {P}: plain origin port, {C}: closed port
CASES = [
    ("coder", "GET", "https://api.test:{T}/v1/x"),
    ("coder", "POST", "https://api.test:{T}/v1/x"),
    ("coder", "GET", "https://api.test:{T}/v2"),
    ("coder", "GET", "https://allowed.test:{T}/anything"),
    ("coder", "GET", "https://denied.test:{T}/"),
    ("coder", "GET", "https://cred.test:{T}/repos/acme"),
    ("coder", "GET", "https://cred.test:{T}/elsewhere"),
    ("coder", "POST", "https://mcp.test:{T}/mcp"),
    ("coder", "GET", "https://other.test:{T}/admin/x"),
    ("coder", "GET", "https://other.test:{T}/ok"),
    ("coder", "GET", "http://api.test:{P}/v9"),
    ("coder", "DELETE", "http://api.test:{P}/v9"),
    ("coder", "GET", "https://internal.test:{T}/"),
    ("coder", "GET", "https://internal.test:{C}/"),
    ("coder", "GET", "https://leak.test:{C}/"),
    ("coder", "GET", "https://127.0.0.1:{T}/"),
    ("rep", "GET", "https://api.test:{T}/v2"),
    ("rep", "GET", "https://front.test:{T}/x"),
    ("coder", "POST", "https://mcp.test:{T}/mc%70"),  # governed on the canonical path
]


def _explain(env: Env, agent: str, method: str, url: str) -> dict[str, Any]:
    out = subprocess.run([WARDEN, "explain", "--json", "--rules", str(env.warden.rules_dir), "--agent", agent,
                          "--method", method, url], capture_output=True, text=True, timeout=60)
    assert out.returncode in (0, 3), out.stderr
    return json.loads(out.stdout)


def _records_for(env: Env, start: int, plan: dict[str, Any], https: bool) -> list[dict[str, Any]]:
    """Wait for this request's records (connect and/or request) after position `start`."""
    host, port = plan["host"], plan["port"]
    evaluated = {s["stage"] for s in plan["stages"] if s["evaluated"]}
    want = ({"connect"} if https else set()) | ({"request"} if "request" in evaluated else set())

    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records[start:] if r.get("event") in ("connect", "request")
                and r.get("host") == host and r.get("port") == port]

    records = env.warden.audit_records(wait_for=lambda rs: {r["event"] for r in mine(rs)} >= want, timeout=10)
    found = mine(records)
    assert {r["event"] for r in found} >= want, (plan, records[start:])
    return found


def _same(stage: dict[str, Any], record: dict[str, Any]) -> None:
    assert (record["decision"], record["reason"], record["rule_id"]) == (
        stage["decision"], stage["reason"], stage["rule_id"]), (stage, record)


@pytest.mark.parametrize(("agent", "method", "template"), CASES)
def test_explain_agrees_with_the_proxy(env: Env, agent: str, method: str, template: str) -> None:
    url = template.format(T=env.tls.port, P=env.plain.port, C=env.closed_port)
    plan = _explain(env, agent, method, url)
    assert plan["complete"], plan  # every name is in the hosts file: nothing depends on DNS
    start = len(env.warden.audit_records())
    https = url.startswith("https")
    proxy = env.warden.proxy_url(agent)
    body = PING if "mcp.test" in url else None  # JSON-RPC, so the MCP stage records its server
    extra = ["-H", "Content-Type: application/json", "-H", "Accept: application/json, text/event-stream",
             "--data", body] if body else []
    curl(["-o", "/dev/null", "--cacert", str(env.bundle), "-X", method, "--path-as-is", *extra, url],
         env={"HTTPS_PROXY": proxy, "http_proxy": proxy}, timeout=10)
    records = {r["event"]: r for r in _records_for(env, start, plan, https)}
    stages = {s["stage"]: s for s in plan["stages"]}
    if https:
        # The connect record carries the address-checked tunnel decision.
        tunnel = stages["addresses"] if stages.get("addresses", {}).get("evaluated") else stages["connect"]
        _same(tunnel, records["connect"])
        assert records["connect"]["interception"] == plan["interception"]["mode"]
    if plan["interception"]["mode"] == "explain":
        # A refused tunnel accepted only to explain: its request carries the tunnel's refusal.
        if "request" in records:
            assert records["request"]["interception"] == "explain"
            _same(tunnel, records["request"])
        return
    if "request" in records:
        request = records["request"]
        _same(stages["request"], request)
        assert request["interception"] == ("intercept" if https else "plain")
        assert request["credential_ids"] == plan["credentials"]
        if body is not None:  # the MCP server governing the path shows on the mcp record
            mcp = env.warden.audit_records(wait_for=lambda rs: any(r.get("event") == "mcp" for r in rs[start:]))
            served = [r for r in mcp[start:] if r.get("event") == "mcp"]
            assert [r["mcp_server"] for r in served] == [plan["mcp_server"]], served
        if not https and stages.get("addresses", {}).get("evaluated"):
            _same(stages["addresses"], request)  # plain http: the record has the address-checked decision
    final = records.get("request") or records["connect"]
    assert (final["decision"], final["reason"], final["rule_id"]) == (
        plan["final"]["decision"], plan["final"]["reason"], plan["final"]["rule_id"])


def test_explain_text_shows_every_stage(env: Env) -> None:
    url = f"https://cred.test:{env.tls.port}/repos/acme"
    out = subprocess.run([WARDEN, "explain", "--rules", str(env.warden.rules_dir), "--agent", "coder", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for needle in ("connect:", "addresses:", "checked 127.0.0.1 (from hosts file)", "TLS intercepted (credentials",
                   "request:", "credentials: injected: gh [", "mcp server: none", "final: allow"):
        assert needle in out.stdout, out.stdout
    assert SECRET not in out.stdout  # offline: the secret is never even read


@pytest.mark.parametrize(("host", "raw"), [("rawtcp.test", True), ("tlsonly.test", False)])
def test_explain_says_whether_a_passthrough_tunnel_may_carry_raw_tcp(env: Env, host: str, raw: bool) -> None:
    """The plan says raw_tcp, and the proxy does what it says with plain HTTP bytes in the tunnel."""
    plan = _explain(env, "coder", "GET", f"https://{host}:{env.plain.port}/")
    assert plan["interception"] == {"mode": "passthrough", "why": [], "raw_tcp": raw}, plan
    text = subprocess.run([WARDEN, "explain", "--rules", str(env.warden.rules_dir), "--agent", "coder",
                           f"https://{host}:{env.plain.port}/"], capture_output=True, text=True, timeout=60).stdout
    assert ("carries: any TCP" if raw else "carries: TLS only") in text, text
    start = len(env.warden.audit_records())
    with open_tunnel(env.warden, "coder", host, env.plain.port, tls=False) as sock:
        sock.sendall(f"GET /raw HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        answer = closed_without_answer(sock)
    if raw:
        assert answer is not None and answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0], answer
        return
    assert answer is None, answer
    records = env.warden.audit_records(
        wait_for=lambda rs: any(r.get("event") == "tunnel_refused" for r in rs[start:]), timeout=10)
    refused = [r for r in records[start:] if r.get("event") == "tunnel_refused"]
    assert refused and "raw_tcp: true allows them" in refused[0]["message"], records[start:]
