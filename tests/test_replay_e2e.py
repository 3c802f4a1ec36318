"""`warden replay` on real audit logs: the replay of traffic recorded under rules A, decided
again under stricter rules B, must report exactly what a second Warden running B denies
when the same traffic is sent through it (the equality from issue 16).

Warden A writes small rotating audit files (one gzip-compressed afterwards, as logrotate
would), so replay reads a real rotated, compressed chain.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from egresswarden.cli.auditread import Reader

from .bypass_helpers import open_tunnel, read_until_closed
from .harness import ORIGIN_NAMES, WARDEN, Warden, curl, hosts_file, run_origin, sha256_hex, start_warden

pytestmark = pytest.mark.e2e


def rules_a(tls: int, plain: int, hosts: Path) -> dict[str, Any]:
    return {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex("tok-coder")], "policies": ["p"]}],
        "policies": {"p": {
            "allow": [
                {"id": "api-any", "host": "api.test", "ports": [tls], "methods": ["GET", "POST", "DELETE"]},
                {"id": "other-any", "host": "other.test", "ports": [tls], "paths": ["/**"]},
                {"id": "allowed-any", "host": "allowed.test", "ports": [tls]},
                {"id": "plain-api", "host": "api.test", "ports": [plain]},
                {"id": "mcp-host", "host": "mcp.test", "ports": [tls]},
            ],
            "mcp": [{"server": "tools", "tools": ["*"]}],
        }},
        "mcp_servers": [{"id": "tools", "url": f"https://mcp.test:{tls}/mcp"}],
        # Loopback origins: the SSRF guard is off here so that host rules alone decide (this test
        # is about replay, not about which addresses a name may resolve to).
        "settings": {"hosts_file": str(hosts), "private_networks": "allow", "audit": {"max_file_bytes": 4096}},
    }


def rules_b(tls: int, plain: int, hosts: Path) -> dict[str, Any]:
    return {
        "agents": [{"id": "coder", "token_sha256": [sha256_hex("tok-coder")], "policies": ["p"]}],
        "policies": {"p": {
            "allow": [
                {"id": "api-read", "host": "api.test", "ports": [tls], "methods": ["GET"], "paths": ["/v1/**"]},
                {"id": "other-any", "host": "other.test", "ports": [tls], "paths": ["/**"]},
                {"id": "allowed-any", "host": "allowed.test", "ports": [tls]},
                {"id": "plain-read", "host": "api.test", "ports": [plain], "methods": ["GET"]},
                {"id": "mcp-host", "host": "mcp.test", "ports": [tls]},
                {"id": "front-new", "host": "front.test", "ports": [tls]},
            ],
            "mcp": [{"server": "tools", "tools": ["search"], "deny_tools": ["drop"]}],
        }},
        "deny": [{"id": "no-other", "host": "other.test"}, {"id": "no-allowed", "host": "allowed.test"}],
        "mcp_servers": [{"id": "tools", "url": f"https://mcp.test:{tls}/mcp"}],
        "settings": {"hosts_file": str(hosts), "private_networks": "allow"},
    }


def _mcp(tool: str, n: int) -> str:
    if tool == "tools/list":
        return json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools/list"})
    return json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                       "params": {"name": tool, "arguments": {"q": "x"}}})


def traffic(tls: int, plain: int) -> list[tuple[str, str, str | None]]:
    """(method, url, JSON-RPC body) in order; each is its own curl, so its own tunnel."""
    t = f"https://{{}}:{tls}"
    return [
        ("GET", t.format("api.test") + "/v1/a", None),
        ("POST", t.format("api.test") + "/v1/a", None),
        ("GET", t.format("api.test") + "/v2/b?token=abc", None),
        ("DELETE", t.format("api.test") + "/v1/c", None),
        ("GET", t.format("other.test") + "/x", None),
        ("GET", t.format("allowed.test") + "/", None),
        ("GET", f"http://api.test:{plain}/v1", None),
        ("DELETE", f"http://api.test:{plain}/v1", None),
        ("GET", t.format("front.test") + "/", None),
        ("POST", t.format("mcp.test") + "/mcp", _mcp("search", 1)),
        ("POST", t.format("mcp.test") + "/mcp", _mcp("drop", 2)),
        ("POST", t.format("mcp.test") + "/mcp", _mcp("other", 3)),
        ("POST", t.format("mcp.test") + "/mcp", _mcp("tools/list", 4)),
    ]


def send(w: Warden, bundle: Path, steps: list[tuple[str, str, str | None]]) -> None:
    proxy = w.proxy_url("coder")
    for method, url, body in steps:
        args = ["-o", "/dev/null", "--cacert", str(bundle), "-X", method, url]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "-H", "Accept: application/json, text/event-stream",
                     "--data", body]
        curl(args, env={"HTTPS_PROXY": proxy, "http_proxy": proxy}, timeout=10)


def all_records(directory: Path) -> list[dict[str, Any]]:
    files = [str(p) for p in directory.iterdir() if p.name.startswith("audit.jsonl")]
    return [line.record for line in Reader(files)]


def key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["event"], r.get("agent"), r.get("host"), r.get("port"), r.get("method"), r.get("path"),
            r.get("mcp_method"), r.get("mcp_tool"))


def denied(records: list[dict[str, Any]], explained: bool = False) -> Counter[tuple[Any, ...]]:
    """Denials as the proxy decided them. HTTP requests to the MCP endpoint are represented by
    their mcp records, and the requests answered inside a refused tunnel (`explain_denials:
    in_band`, interception `explain`) by the CONNECT refusal they deliver: replay counts both
    that way (the second as requests_in_refused_tunnels)."""
    return Counter(key(r) for r in records if r["event"] in ("connect", "request", "mcp") and r["decision"] == "deny"
                   and not (r["event"] == "request" and r.get("host") == "mcp.test" and r.get("path") == "/mcp")
                   and (explained or not (r["event"] == "request" and r.get("interception") == "explain")))


def test_replay_reports_exactly_what_the_stricter_rules_deny(
        origin_ca, origin_ca_file: Path, shared_confdir: Path, tmp_path: Path) -> None:
    hosts = hosts_file(tmp_path / "hosts")
    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        steps = traffic(tls.port, plain.port)
        a = start_warden(tmp_path / "a", rules_a(tls.port, plain.port, hosts), upstream_ca=origin_ca_file,
                         confdir=shared_confdir, agents={"coder": "tok-coder"})
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(a.ca_cert.read_text() + origin_ca_file.read_text())
        try:
            send(a, bundle, steps)
            _wait_for_mcp(a, 4)
        finally:
            assert a.stop() == 0, a.output()
        recorded = all_records(a.workdir)
        rotated = sorted(p for p in a.workdir.iterdir() if p.name.startswith("audit.jsonl."))
        assert rotated, "expected the small max_file_bytes to rotate the audit log"
        with rotated[0].open("rb") as src, gzip.open(f"{rotated[0]}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        rotated[0].unlink()

        proposed = tmp_path / "proposed"
        proposed.mkdir()
        (proposed / "rules.yaml").write_text(yaml.safe_dump(rules_b(tls.port, plain.port, hosts), sort_keys=False))
        files = [str(p) for p in a.workdir.iterdir() if p.name.startswith("audit.jsonl")]
        out = subprocess.run([WARDEN, "replay", "--rules", str(proposed), "--json", "--examples", "1000", *files],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)

        b = start_warden(tmp_path / "b", rules_b(tls.port, plain.port, hosts), upstream_ca=origin_ca_file,
                         confdir=shared_confdir, agents={"coder": "tok-coder"})
        try:
            send(b, bundle, steps)
            _wait_for_mcp(b, 2)  # search and tools/list reach the server; drop/other Warden answers itself
        finally:
            assert b.stop() == 0, b.output()
        actual = all_records(b.workdir)

    examples = lambda kind: Counter(  # noqa: E731
        key(ex) for g in report["changes"][kind]["groups"] for ex in g["examples"])
    assert report["read_errors"] == [] and report["unparsable_lines"] == 0
    expected_denied = denied(actual) - denied(recorded)
    assert expected_denied, "the stricter rules should deny something"
    assert examples("newly_denied") == expected_denied
    # ... and the other direction: what B allows that A denied (a request A answered inside a
    # refused tunnel is made, and allowed, under B).
    a_denied = denied(recorded, explained=True)
    b_allowed = Counter(key(r) for r in actual if r["event"] in ("connect", "request", "mcp")
                        and r["decision"] != "deny" and key(r) in a_denied)
    assert examples("newly_allowed") == b_allowed and b_allowed
    # Requests inside the tunnels B refuses are not second denials: B answers them with the
    # tunnel's refusal. (allowed.test was intercepted under A too: it shares the MCP server's
    # address, so the proxy governs it as that destination.)
    inside = [r for r in recorded if r["event"] == "request" and r["host"] in ("other.test", "allowed.test")]
    assert report["requests_in_refused_tunnels"] == len(inside) >= 1
    assert report["not_replayed"] == []
    # Every newly denied group names B's rule and reason the way B's audit does.
    by_key = {key(r): (r["reason"], r["rule_id"]) for r in actual if r.get("decision") == "deny"}
    for g in report["changes"]["newly_denied"]["groups"]:
        for ex in g["examples"]:
            assert by_key[key(ex)] == (g["new"]["reason"], g["new"]["rule_id"])
    assert "chain_start" in report["skipped_events"]


def _wait_for_mcp(w: Warden, n: int) -> None:
    def enough(_: list[dict[str, Any]]) -> bool:
        return sum(r["event"] == "mcp" for r in all_records(w.workdir)) >= n
    w.audit_records(wait_for=enough, timeout=10)
    assert enough([]), all_records(w.workdir)


def test_replay_text_report_and_what_cannot_be_replayed(tmp_path: Path) -> None:
    """Records whose decisions depend on unrecorded inputs are listed, not guessed."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(yaml.safe_dump({
        "agents": [{"id": "coder", "token_sha256": [sha256_hex("t")], "policies": ["p"]}],
        "policies": {"p": {"allow": [{"id": "web", "host": "web.test"}, {"id": "far", "host": "far.test"}]}},
    }))
    base = {"agent": "coder", "identity": "token", "client_ip": "10.0.0.1", "client_port": 1, "scheme": "https",
            "port": 443, "policy_version": "x", "status": 403, "bytes_up": 0, "bytes_down": 0, "duration_ms": 1,
            "credential_ids": []}
    lines = [
        {"event": "chain_start", "time": "2026-12-01T00:00:00Z", "file": "audit.jsonl"},
        {"event": "checkpoint", "time": "2026-12-01T00:00:00Z", "signature": "..."},  # a type this reader does not know
        {**base, "event": "request", "time": "2026-12-01T00:00:01Z", "method": "POST", "host": "web.test",
         "path": "/x", "decision": "deny", "reason": "secret_leak", "rule_id": "cred", "interception": "intercept"},
        {**base, "event": "connect", "time": "2026-12-01T00:00:02Z", "method": "CONNECT", "host": "far.test",
         "path": None, "decision": "deny", "reason": "no_matching_rule", "rule_id": None, "interception": None,
         "upstream_ip": None},
        {**base, "event": "connect", "time": "2026-12-01T00:00:03Z", "method": "CONNECT", "host": "web.test",
         "path": None, "decision": "allow", "reason": "allowed", "rule_id": "web", "interception": "passthrough",
         "upstream_ip": "93.184.216.34"},
        # refused for load, not by the rules: not decided again (it would read "newly allowed")
        {**base, "event": "connect", "time": "2026-12-01T00:00:04Z", "method": "CONNECT", "host": "web.test",
         "path": None, "decision": "deny", "reason": "connection_limit", "rule_id": None, "interception": None,
         "upstream_ip": None},
    ]
    log = tmp_path / "captured.log"
    # A captured stdout stream: a log shipper's prefix and a line that is not a record.
    log.write_text("".join(f"warden-1  | {json.dumps(r)}\n" for r in lines) + "warden: started\n")
    out = subprocess.run([WARDEN, "replay", "--rules", str(rules), str(log)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "leak-guard denials" in out.stdout  # secret_leak: bodies and headers are not recorded
    assert "never checked" in out.stdout  # far.test: the new rules would need DNS
    assert "refusals for load" in out.stdout  # connection_limit
    assert "no changes" in out.stdout and "1 lines were not audit records" in out.stdout


def test_replay_finds_the_raw_tunnels_a_rule_without_raw_tcp_would_refuse(
        origin_ca, origin_ca_file: Path, shared_confdir: Path, tmp_path: Path) -> None:
    """A tunnel_close record says whether its tunnel carried TLS (carried_tls). Replay under
    rules whose allow rule lost `raw_tcp: true` lists exactly the tunnels that carried raw
    bytes; a second Warden running those rules refuses exactly those."""
    hosts = hosts_file(tmp_path / "hosts", [*ORIGIN_NAMES, "rawtcp.test"])

    def rules(raw: bool) -> dict[str, Any]:
        return {"agents": [{"id": "coder", "token_sha256": [sha256_hex("tok-coder")], "policies": ["p"]}],
                "policies": {"p": {"allow": [
                    {"id": "raw", "host": "rawtcp.test", "ports": [plain.port], **({"raw_tcp": True} if raw else {})},
                    {"id": "tls", "host": "allowed.test", "ports": [tls.port]}]}},
                "settings": {"hosts_file": str(hosts), "private_networks": "allow"}}

    def traffic(w: Warden, bundle: Path) -> None:
        for _ in range(2):
            with open_tunnel(w, "coder", "rawtcp.test", plain.port, tls=False) as sock:
                sock.sendall(b"GET /raw HTTP/1.1\r\nHost: rawtcp.test\r\nConnection: close\r\n\r\n")
                read_until_closed(sock)
        curl(["-o", "/dev/null", "--cacert", str(bundle), f"https://allowed.test:{tls.port}/"],
             env={"HTTPS_PROXY": w.proxy_url("coder")}, timeout=10)

    with run_origin(ca=origin_ca) as tls, run_origin() as plain:
        a = start_warden(tmp_path / "a", rules(True), upstream_ca=origin_ca_file, confdir=shared_confdir,
                         agents={"coder": "tok-coder"})
        bundle = tmp_path / "bundle.pem"
        bundle.write_text(origin_ca_file.read_text())
        try:
            traffic(a, bundle)
            a.audit_records(lambda rs: sum(r["event"] == "tunnel_close" for r in rs) >= 3)
        finally:
            assert a.stop() == 0, a.output()
        closes = [r for r in all_records(a.workdir) if r["event"] == "tunnel_close"]
        assert sorted((r["host"], r["carried_tls"]) for r in closes) == [
            ("allowed.test", True), ("rawtcp.test", False), ("rawtcp.test", False)], closes

        proposed = tmp_path / "proposed"
        proposed.mkdir()
        (proposed / "rules.yaml").write_text(yaml.safe_dump(rules(False), sort_keys=False))
        files = [str(p) for p in a.workdir.iterdir() if p.name.startswith("audit.jsonl")]
        out = subprocess.run([WARDEN, "replay", "--rules", str(proposed), "--json", *files],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        text = subprocess.run([WARDEN, "replay", "--rules", str(proposed), *files],
                              capture_output=True, text=True, timeout=120).stdout

        b = start_warden(tmp_path / "b", rules(False), upstream_ca=origin_ca_file, confdir=shared_confdir,
                         agents={"coder": "tok-coder"})
        try:
            traffic(b, bundle)
            b.audit_records(lambda rs: sum(r["event"] in ("tunnel_refused", "tunnel_close") for r in rs) >= 3)
        finally:
            assert b.stop() == 0, b.output()
        refused = [r for r in all_records(b.workdir) if r["event"] == "tunnel_refused"]

    groups = report["changes"]["raw_tcp_removed"]["groups"]
    assert [(g["agent"], g["host"], g["count"], g["old"]["rule_id"], g["new"]["rule_id"]) for g in groups] == [
        ("coder", "rawtcp.test", 2, "raw", "raw")], groups
    assert [r["host"] for r in refused] == ["rawtcp.test"] * 2 and all(
        "raw_tcp: true allows them" in r["message"] for r in refused), refused
    assert all(not report["changes"][k]["groups"] for k in report["changes"] if k != "raw_tcp_removed"), report
    assert "TUNNELS THAT CARRIED RAW TCP, NOW TLS ONLY" in text and "rawtcp.test" in text, text
