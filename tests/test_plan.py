"""Table-driven tests of core/plan.py: every stage the proxy runs for one request, offline."""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from egresswarden.core.decision import Interception, Reason, Verdict
from egresswarden.core.errors import RuleSetError
from egresswarden.core.loader import load_ruleset
from egresswarden.core.plan import (
    AddressSource,
    InterceptWhy,
    StageName,
    interception_for,
    plan,
    plan_connect,
    plan_mcp,
    plan_url,
)
from egresswarden.core.ruleset import RuleSet

from .harness import sha256_hex

RULES = {
    "agents": [
        {"id": "coder", "token_sha256": [sha256_hex("t")], "policies": ["p"]},
        {"id": "rep", "token_sha256": [sha256_hex("r")], "policies": ["p"], "mode": "report"},
        {"id": "net", "token_sha256": [sha256_hex("n")], "policies": ["cidrs"]},
    ],
    "policies": {
        "p": {
            "allow": [
                {"id": "api-read", "host": "api.test", "methods": ["GET"], "paths": ["/v1/**"]},
                {"id": "plain-api", "host": "api.test", "ports": [80], "methods": ["GET"]},
                {"id": "web", "host": "web.test"},
                {"id": "cred-host", "host": "cred.test"},
                {"id": "mcp-host", "host": "mcp.test"},
                {"id": "other", "host": "other.test"},
                {"id": "private-host", "host": "internal.test"},
                {"id": "dns-host", "host": "dns.test"},
                {"id": "alias", "host": "alias.test"},
            ],
            "credentials": [{"id": "gh", "host": "cred.test", "paths": ["/repos/**"],
                             "inject": {"Authorization": "Bearer ${secret:PLAN_TEST_TOKEN}"}}],
            "mcp": [{"server": "tools", "tools": ["search"], "deny_tools": ["drop"],
                     "arguments": {"search": {"properties": {"q": {"type": "string", "maxLength": 5}}}}}],
        },
        "cidrs": {"allow": [{"id": "lan", "cidr": "10.40.0.0/16", "ports": [443]}]},
    },
    "deny": [
        {"id": "no-denied", "host": "denied.test"},
        {"id": "no-admin", "host": "other.test", "paths": ["/admin/**"]},
        {"id": "no-metadata", "cidr": "169.254.169.254/32"},
    ],
    "mcp_servers": [{"id": "tools", "url": "https://mcp.test/mcp"}],
    "settings": {"hosts_file": "hosts"},
}
HOSTS = ("93.184.216.34 api.test\n93.184.216.35 web.test\n93.184.216.36 cred.test\n93.184.216.37 mcp.test alias.test\n"
         "93.184.216.38 other.test\n10.0.0.7 internal.test\n10.40.1.2 lan.test\n")


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    d = tmp_path_factory.mktemp("plan-rules")
    (d / "rules.yaml").write_text(yaml.safe_dump(RULES, sort_keys=False))
    (d / "hosts").write_text(HOSTS)
    return load_ruleset(d, secrets=False)  # the secret PLAN_TEST_TOKEN is not set anywhere


@dataclass(frozen=True)
class Case:
    agent: str
    method: str
    url: str
    verdict: Verdict
    reason: Reason
    stage: StageName
    rule: str | None = None
    interception: Interception | None = None
    why: tuple[InterceptWhy, ...] = ()
    credentials: tuple[str, ...] = ()
    mcp_server: str | None = None
    complete: bool = True


CASES = [
    pytest.param(Case("coder", "GET", "https://api.test/v1/x", Verdict.ALLOW, Reason.ALLOWED, StageName.REQUEST,
                      "api-read", Interception.INTERCEPT, (InterceptWhy.METHOD_PATH_RULES,)),
                 id="path rules force interception"),
    pytest.param(Case("coder", "POST", "https://api.test/v1/x", Verdict.DENY, Reason.METHOD_NOT_ALLOWED,
                      StageName.REQUEST, "api-read", Interception.INTERCEPT, (InterceptWhy.METHOD_PATH_RULES,)),
                 id="method denied inside the tunnel"),
    pytest.param(Case("coder", "GET", "https://web.test/anything", Verdict.ALLOW, Reason.ALLOWED, StageName.ADDRESSES,
                      "web", Interception.PASSTHROUGH), id="plain host rule passes through"),
    pytest.param(Case("coder", "GET", "https://denied.test/", Verdict.DENY, Reason.DENY_LISTED, StageName.CONNECT,
                      "no-denied", Interception.EXPLAIN), id="deny list at CONNECT, explained in band"),
    pytest.param(Case("coder", "GET", "https://cred.test/repos/x", Verdict.ALLOW, Reason.ALLOWED, StageName.REQUEST,
                      "cred-host", Interception.INTERCEPT, (InterceptWhy.CREDENTIALS,), ("gh",)),
                 id="credential bound on its path"),
    pytest.param(Case("coder", "GET", "https://cred.test/other", Verdict.ALLOW, Reason.ALLOWED, StageName.REQUEST,
                      "cred-host", Interception.INTERCEPT, (InterceptWhy.CREDENTIALS,)),
                 id="credential not bound off its path"),
    pytest.param(Case("coder", "POST", "https://mcp.test/mcp", Verdict.ALLOW, Reason.ALLOWED, StageName.REQUEST,
                      "mcp-host", Interception.INTERCEPT, (InterceptWhy.MCP_SERVER,), mcp_server="tools"),
                 id="mcp server governs its endpoint"),
    pytest.param(Case("coder", "POST", "https://mcp.test/mc%70/x", Verdict.ALLOW, Reason.ALLOWED, StageName.REQUEST,
                      "mcp-host", Interception.INTERCEPT, (InterceptWhy.MCP_SERVER,), mcp_server="tools"),
                 id="mcp server matched on the canonical path"),
    pytest.param(Case("coder", "POST", "https://mcp.test/mcpx", Verdict.ALLOW, Reason.ALLOWED, StageName.REQUEST,
                      "mcp-host", Interception.INTERCEPT, (InterceptWhy.MCP_SERVER,)),
                 id="a longer segment is not the mcp endpoint"),
    pytest.param(Case("coder", "GET", "https://other.test/admin/x", Verdict.DENY, Reason.DENY_LISTED,
                      StageName.REQUEST, "no-admin", Interception.INTERCEPT, (InterceptWhy.L7_DENY_RULE,)),
                 id="L7 deny rule intercepts and denies"),
    pytest.param(Case("coder", "GET", "https://other.test/ok", Verdict.ALLOW, Reason.ALLOWED, StageName.REQUEST,
                      "other", Interception.INTERCEPT, (InterceptWhy.L7_DENY_RULE,)), id="L7 deny rule elsewhere"),
    pytest.param(Case("coder", "GET", "https://internal.test/", Verdict.DENY, Reason.PRIVATE_ADDRESS,
                      StageName.ADDRESSES, None, Interception.EXPLAIN), id="hosts file pins a private address"),
    pytest.param(Case("coder", "GET", "http://api.test/v9", Verdict.ALLOW, Reason.ALLOWED, StageName.ADDRESSES,
                      "plain-api", Interception.PLAIN), id="plain http request then address check"),
    pytest.param(Case("coder", "DELETE", "http://api.test/v9", Verdict.DENY, Reason.METHOD_NOT_ALLOWED,
                      StageName.REQUEST, "plain-api"), id="plain http denied before the address check"),
    pytest.param(Case("coder", "GET", "http://cred.test/repos/x", Verdict.ALLOW, Reason.ALLOWED, StageName.ADDRESSES,
                      "cred-host", Interception.PLAIN), id="credentials never go into plain http"),
    pytest.param(Case("coder", "GET", "https://cred.test:8443/repos/x", Verdict.DENY, Reason.PORT_NOT_ALLOWED,
                      StageName.CONNECT, "cred-host", Interception.EXPLAIN), id="wrong port"),
    pytest.param(Case("rep", "GET", "https://api.test/v2", Verdict.REPORT, Reason.PATH_NOT_ALLOWED, StageName.REQUEST,
                      "api-read", Interception.INTERCEPT, (InterceptWhy.METHOD_PATH_RULES,)),
                 id="report mode reports the request"),
    pytest.param(Case("coder", "GET", "https://unknown.test/", Verdict.DENY, Reason.NO_MATCHING_RULE,
                      StageName.CONNECT, None, Interception.EXPLAIN), id="no rule"),
    pytest.param(Case("net", "GET", "https://lan.test/", Verdict.DENY, Reason.NO_MATCHING_RULE, StageName.CONNECT,
                      None, Interception.EXPLAIN), id="a cidr rule never allows a name"),
    pytest.param(Case("coder", "GET", "https://dns.test/", Verdict.ALLOW, Reason.ALLOWED, StageName.CONNECT,
                      "dns-host", Interception.PASSTHROUGH, complete=False), id="name needing DNS is incomplete"),
    pytest.param(Case("coder", "POST", "https://alias.test/mcp", Verdict.ALLOW, Reason.ALLOWED, StageName.REQUEST,
                      "alias", Interception.INTERCEPT, (InterceptWhy.GOVERNED_ADDRESS,), mcp_server="tools"),
                 id="another name for the MCP server's address is governed as it"),
    pytest.param(Case("net", "GET", "https://10.40.0.9/", Verdict.ALLOW, Reason.ALLOWED, StageName.ADDRESSES,
                      "lan", Interception.PASSTHROUGH), id="IP literal is its own address"),
    pytest.param(Case("coder", "GET", "https://169.254.169.254/", Verdict.DENY, Reason.DENY_LISTED,
                      StageName.CONNECT, "no-metadata", Interception.EXPLAIN), id="deny cidr on a literal"),
    pytest.param(Case("coder", "GET", "https://93.184.216.37/mcp", Verdict.DENY, Reason.NO_MATCHING_RULE,
                      StageName.CONNECT, None, Interception.EXPLAIN), id="an IP literal needs a cidr rule"),
    pytest.param(Case("ghost", "GET", "https://web.test/", Verdict.DENY, Reason.AUTH_FAILED, StageName.CONNECT),
                 id="unknown agent"),
    pytest.param(Case("coder", "GET", "https://api.test/v1/%2e%2e/x", Verdict.DENY, Reason.INVALID_PATH,
                      StageName.REQUEST, None, Interception.INTERCEPT, (InterceptWhy.METHOD_PATH_RULES,)),
                 id="ambiguous path refused"),
]


@pytest.mark.parametrize("case", CASES)
def test_plan(rules: RuleSet, case: Case) -> None:
    p = plan_url(rules, case.agent, case.method, case.url)
    got = (p.decision.verdict, p.decision.reason, p.final.stage, p.decision.rule_id, p.interception, p.intercept_why,
           p.credentials, p.mcp_server, p.complete)
    want = (case.verdict, case.reason, case.stage, case.rule, case.interception, case.why, case.credentials,
            case.mcp_server, case.complete)
    assert got == want, p.to_json()


def test_stage_order_and_origins(rules: RuleSet) -> None:
    https = plan_url(rules, "coder", "GET", "https://cred.test/repos/x")
    assert [s.stage for s in https.stages] == [StageName.CONNECT, StageName.ADDRESSES, StageName.REQUEST]
    assert https.address_source is AddressSource.HOSTS_FILE
    text = Path(rules.model.files[0]).read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if "id: cred-host" in t)
    assert https.stages[0].rule_origin == f"{rules.model.files[0]}:{line}"
    plain = plan_url(rules, "coder", "GET", "http://api.test/v9")
    assert [s.stage for s in plain.stages] == [StageName.REQUEST, StageName.ADDRESSES]
    passthrough = plan_url(rules, "coder", "GET", "https://web.test/")
    request = passthrough.stage(StageName.REQUEST)
    assert request is not None and request.decision is None and "passed through" in request.note


def test_given_addresses_override_the_hosts_file(rules: RuleSet) -> None:
    public = plan_url(rules, "coder", "GET", "https://internal.test/", [ipaddress.ip_address("93.184.216.34")])
    assert public.decision.allowed and public.address_source is AddressSource.GIVEN
    meta = plan_url(rules, "coder", "GET", "https://web.test/", [ipaddress.ip_address("169.254.169.254")])
    assert meta.decision.reason is Reason.DENY_LISTED and meta.final.stage is StageName.ADDRESSES


def test_tunnel_only_plan(rules: RuleSet) -> None:
    p = plan(rules, "coder", "https", "api.test", 443)
    assert p.interception is Interception.INTERCEPT and p.final.stage is StageName.ADDRESSES
    assert p.stage(StageName.REQUEST) is None
    with pytest.raises(ValueError):
        plan(rules, "coder", "http", "api.test", 80)


@pytest.mark.parametrize(("tool", "arguments", "reason"), [
    ("search", {"q": "ok"}, Reason.ALLOWED),
    ("search", {"q": "too long"}, Reason.MCP_BAD_ARGUMENTS),
    ("drop", {}, Reason.MCP_TOOL_DENIED),
    ("other", {}, Reason.MCP_TOOL_NOT_ALLOWED),
])
def test_plan_mcp(rules: RuleSet, tool: str, arguments: dict[str, str], reason: Reason) -> None:
    msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    p = plan_mcp(rules, "coder", "tools", msg)
    assert p.final.stage is StageName.MCP and p.decision.reason is reason
    assert p.mcp_server == "tools" and p.final.rule_origin is not None
    reported = plan_mcp(rules, "rep", "tools", msg)
    assert reported.decision.verdict is (Verdict.ALLOW if reason is Reason.ALLOWED else Verdict.REPORT)


def test_interception_reasons_explain_every_intercepted_tunnel(rules: RuleSet) -> None:
    """The invariant behind the reasons: a tunnel is intercepted exactly when a reason is given."""
    hosts = ["api.test", "web.test", "cred.test", "mcp.test", "other.test", "internal.test", "lan.test", "10.40.0.9",
             "denied.test", "unknown.test"]
    for agent, host, port in itertools.product(("coder", "rep", "net"), hosts, (443, 80, 8443)):
        connect = plan_connect(rules, agent, host, port)
        if not connect.allowed:
            continue
        mode, why = interception_for(rules, agent, host, port, connect)
        assert (mode is Interception.INTERCEPT) == bool(why) == connect.intercept, (agent, host, port)


def test_offline_load_reads_no_secret(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(RULES))
    (tmp_path / "hosts").write_text(HOSTS)
    with pytest.raises(RuleSetError, match="PLAN_TEST_TOKEN"):
        load_ruleset(tmp_path)
    offline = load_ruleset(tmp_path, secrets=False)
    assert offline.secrets == () and offline.credentials_by_id["gh"].secrets == ()


def test_governed_destinations_by_kind() -> None:
    """MCP servers are governed under any other name; a credential host only under an IP literal
    (credentials are bound to names, and CDNs put many names on one address)."""
    from egresswarden.core.plan import Governed, governs

    mcp = Governed("mcp.test", "MCP server tools", "tools")
    cred = Governed("api.github.com", "credential github")
    assert governs(mcp, "alias.test") and governs(mcp, "93.184.216.37") and not governs(mcp, "mcp.test")
    assert governs(cred, "140.82.112.6") and not governs(cred, "github.com") and not governs(cred, "api.github.com")
