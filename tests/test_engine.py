"""Table-driven tests of the pure engine: decide(), decide_addresses(), identity, paths, addresses."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from egresswarden.core.decide import decide, decide_addresses
from egresswarden.core.decision import Reason, Verdict
from egresswarden.core.facts import RequestFacts
from egresswarden.core.identity import AgentIdentity, AuthFailure, identify, parse_basic
from egresswarden.core.loader import load_ruleset
from egresswarden.core.netaddr import is_private_address
from egresswarden.core.paths import PathError, canonical_path, compile_glob
from egresswarden.core.ruleset import RuleSet

from .harness import sha256_hex

RULES = {
    "agents": [
        {"id": "coder", "token_sha256": [sha256_hex("coder-token"), sha256_hex("second:token")],
         "policies": ["github", "pkgs"]},
        {"id": "dba", "token_sha256": [sha256_hex("dba-token")], "policies": ["db", "github"]},
        {"id": "claw", "token_sha256": [sha256_hex("claw-token")], "policies": ["github"], "mode": "report"},
        {"id": "ci", "sources": ["10.20.0.0/24"], "policies": ["pkgs"]},
        {"id": "bound", "token_sha256": [sha256_hex("bound-token")], "sources": ["10.30.0.0/24"], "policies": ["pkgs"]},
    ],
    "policies": {
        "github": {"allow": [
            {"id": "gh", "host": "github.com"},
            {"id": "gh-content", "host": "*.githubusercontent.com"},
            {"id": "gh-api", "host": "api.github.com", "methods": ["GET", "HEAD"], "paths": ["/repos/acme/**", "/user"]},
        ]},
        "pkgs": {"allow": [{"id": "pyhosted", "domain": "pythonhosted.org"},
                           {"id": "pypi-alt", "host": "pypi.org", "ports": [443, 8443]}]},
        "db": {"allow": [{"id": "db-net", "cidr": "10.40.0.0/16", "ports": [5432]},
                         {"id": "db-name", "host": "db.internal", "ports": [5432]},
                         {"id": "wiki", "host": "wiki.internal", "addresses": ["10.50.0.7/32"]}]},
    },
    "deny": [{"id": "no-paste", "domain": "pastebin.com"},
             {"id": "no-metadata", "cidr": "169.254.169.254/32"},
             {"id": "no-gh-delete", "host": "github.com", "methods": ["DELETE"], "paths": ["/**"]}],
}


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    d = tmp_path_factory.mktemp("rules")
    (d / "rules.yaml").write_text(yaml.safe_dump(RULES))
    return load_ruleset(d)


@dataclass(frozen=True)
class Case:
    facts: RequestFacts
    verdict: Verdict
    reason: Reason
    rule: str | None = None
    intercept: bool | None = None


def C(agent: str, host: str, port: int = 443, method: str | None = None, path: str | None = None,
      scheme: str = "https") -> RequestFacts:
    return RequestFacts(agent, host, port, scheme, method, path)


DECIDE_CASES = [
    pytest.param(Case(C("coder", "github.com"), Verdict.ALLOW, Reason.ALLOWED, "gh", True), id="exact host; L7 deny rule forces interception"),
    pytest.param(Case(C("coder", "GitHub.COM."), Verdict.ALLOW, Reason.ALLOWED, "gh"), id="case and trailing dot normalised"),
    pytest.param(Case(C("coder", "raw.githubusercontent.com"), Verdict.ALLOW, Reason.ALLOWED, "gh-content", False), id="wildcard matches subdomain, passthrough"),
    pytest.param(Case(C("coder", "a.b.githubusercontent.com"), Verdict.ALLOW, Reason.ALLOWED, "gh-content"), id="wildcard matches any depth"),
    pytest.param(Case(C("coder", "githubusercontent.com"), Verdict.DENY, Reason.NO_MATCHING_RULE), id="wildcard does not match apex"),
    pytest.param(Case(C("coder", "evilgithubusercontent.com"), Verdict.DENY, Reason.NO_MATCHING_RULE), id="wildcard is label-aligned"),
    pytest.param(Case(C("coder", "pythonhosted.org"), Verdict.ALLOW, Reason.ALLOWED, "pyhosted"), id="domain matches apex"),
    pytest.param(Case(C("coder", "files.pythonhosted.org"), Verdict.ALLOW, Reason.ALLOWED, "pyhosted"), id="domain matches subdomain"),
    pytest.param(Case(C("coder", "api.github.com"), Verdict.ALLOW, Reason.ALLOWED, "gh-api", True), id="method/path rule forces interception"),
    pytest.param(Case(C("coder", "api.github.com", method="GET", path="/repos/acme/x/pulls?state=open"), Verdict.ALLOW, Reason.ALLOWED, "gh-api"), id="path glob ** any depth, query ignored"),
    pytest.param(Case(C("coder", "api.github.com", method="GET", path="/repos/acme"), Verdict.ALLOW, Reason.ALLOWED, "gh-api"), id="** matches zero segments"),
    pytest.param(Case(C("coder", "api.github.com", method="POST", path="/repos/acme/x"), Verdict.DENY, Reason.METHOD_NOT_ALLOWED, "gh-api"), id="method not allowed"),
    pytest.param(Case(C("coder", "api.github.com", method="GET", path="/repos/other/x"), Verdict.DENY, Reason.PATH_NOT_ALLOWED, "gh-api"), id="path not allowed"),
    pytest.param(Case(C("coder", "api.github.com", method="GET", path="/repos/%61cme/x"), Verdict.ALLOW, Reason.ALLOWED), id="percent-encoding decoded before matching"),
    pytest.param(Case(C("coder", "api.github.com", method="GET", path="/repos/acme/../../orgs"), Verdict.DENY, Reason.INVALID_PATH), id="dot segments refused"),
    pytest.param(Case(C("coder", "api.github.com", method="GET", path="/repos/acme%2f..%2fother"), Verdict.DENY, Reason.INVALID_PATH), id="encoded slash refused"),
    pytest.param(Case(C("coder", "api.github.com", method="GET", path="/user/"), Verdict.DENY, Reason.PATH_NOT_ALLOWED), id="exact path glob is exact"),
    pytest.param(Case(C("coder", "github.com", method="DELETE", path="/acme/repo"), Verdict.DENY, Reason.DENY_LISTED, "no-gh-delete"), id="L7 deny rule beats allow"),
    pytest.param(Case(C("coder", "github.com", method="GET", path="/acme/repo"), Verdict.ALLOW, Reason.ALLOWED, "gh"), id="L7 deny rule only for its methods"),
    pytest.param(Case(C("coder", "pastebin.com"), Verdict.DENY, Reason.DENY_LISTED, "no-paste"), id="global deny"),
    pytest.param(Case(C("claw", "pastebin.com"), Verdict.DENY, Reason.DENY_LISTED, "no-paste"), id="global deny ignores report mode"),
    pytest.param(Case(C("coder", "x.pastebin.com", 8443), Verdict.DENY, Reason.DENY_LISTED), id="deny without ports covers every port"),
    pytest.param(Case(C("coder", "github.com", 22), Verdict.DENY, Reason.PORT_NOT_ALLOWED, "gh"), id="default port only 443"),
    pytest.param(Case(C("coder", "github.com", 80, "GET", "/", "http"), Verdict.ALLOW, Reason.ALLOWED), id="default port 80 for plain http"),
    pytest.param(Case(C("coder", "pypi.org", 8443), Verdict.ALLOW, Reason.ALLOWED, "pypi-alt"), id="explicit ports"),
    pytest.param(Case(C("coder", "example.com"), Verdict.DENY, Reason.NO_MATCHING_RULE), id="default deny"),
    pytest.param(Case(C("claw", "example.com"), Verdict.REPORT, Reason.NO_MATCHING_RULE), id="report mode lets through, logs reason"),
    pytest.param(Case(C("nobody", "github.com"), Verdict.DENY, Reason.AUTH_FAILED), id="unknown agent"),
    pytest.param(Case(C("coder", "169.254.169.254", 80, "GET", "/", "http"), Verdict.DENY, Reason.DENY_LISTED, "no-metadata"), id="metadata IP literal denied"),
    pytest.param(Case(C("dba", "10.40.1.2", 5432), Verdict.ALLOW, Reason.ALLOWED, "db-net", False), id="IP literal matched by cidr rule"),
    pytest.param(Case(C("dba", "10.40.1.2", 443), Verdict.DENY, Reason.PORT_NOT_ALLOWED), id="cidr rule port"),
    pytest.param(Case(C("ci", "140.82.112.3"), Verdict.DENY, Reason.NO_MATCHING_RULE), id="IP literal matches only cidr rules"),
    pytest.param(Case(C("coder", "0x7f.1"), Verdict.DENY, Reason.INVALID_HOST), id="hex IP notation refused"),
    pytest.param(Case(C("coder", "2130706433"), Verdict.DENY, Reason.INVALID_HOST), id="decimal IP notation refused"),
    pytest.param(Case(C("coder", "a..b"), Verdict.DENY, Reason.INVALID_HOST), id="empty label refused"),
    pytest.param(Case(C("coder", "a" * 300 + ".com"), Verdict.DENY, Reason.INVALID_HOST), id="absurdly long host refused"),
    pytest.param(Case(C("coder", "exa mple.com"), Verdict.DENY, Reason.INVALID_HOST), id="space in host refused"),
]


@pytest.mark.parametrize("case", DECIDE_CASES)
def test_decide(rules: RuleSet, case: Case) -> None:
    d = decide(rules, case.facts)
    assert (d.verdict, d.reason) == (case.verdict, case.reason), d.message
    if case.rule is not None:
        assert d.rule_id == case.rule
    if case.intercept is not None:
        assert d.intercept is case.intercept
    assert d.policy_version == rules.version


def test_cidr_rule_never_allows_a_name(rules: RuleSet) -> None:
    """A cidr rule matches IP literals only: a name no host/domain rule allows is refused at the
    name stage, so Warden never resolves it (DNS would otherwise carry data out)."""
    d = decide(rules, C("dba", "exfil-data.attacker.example", 5432))
    assert (d.verdict, d.reason) == (Verdict.DENY, Reason.NO_MATCHING_RULE)


ADDRESS_CASES = [
    pytest.param("db.internal", 5432, "10.40.0.9", Reason.ALLOWED, id="host rule + cidr rule on the port exempts"),
    pytest.param("db.internal", 5432, "10.41.0.9", Reason.PRIVATE_ADDRESS, id="private address outside every cidr rule"),
    pytest.param("wiki.internal", 443, "10.50.0.7", Reason.ALLOWED, id="host rule addresses: exempts that address"),
    pytest.param("wiki.internal", 443, "10.50.0.8", Reason.PRIVATE_ADDRESS, id="addresses: exempts only what it lists"),
    pytest.param("10.40.1.2", 5432, "10.40.1.2", Reason.ALLOWED, id="IP literal inside a cidr rule"),
    pytest.param("10.40.1.2", 443, "10.40.1.2", Reason.PRIVATE_ADDRESS, id="cidr rule exempts only its ports"),
]


@pytest.mark.parametrize("host,port,address,reason", ADDRESS_CASES)
def test_private_address_exemptions(rules: RuleSet, host: str, port: int, address: str, reason: Reason) -> None:
    facts = C("dba", host, port)
    d = decide_addresses(rules, facts, [ipaddress.ip_address(address)], decide(rules, facts).with_verdict(Verdict.ALLOW))
    assert d.reason is reason, d.message


def test_report_mode_never_softens_the_address_guard(rules: RuleSet, tmp_path: Path) -> None:
    """A report-mode agent with a cidr rule on one port may not reach the same address on another."""
    d = tmp_path / "r"
    d.mkdir()
    (d / "r.yaml").write_text(yaml.safe_dump({
        "agents": [{"id": "rep", "token_sha256": [sha256_hex("t")], "policies": ["p"], "mode": "report"}],
        "policies": {"p": {"allow": [{"cidr": "127.0.0.1/32", "ports": [43443]}]}}}))
    report_rules = load_ruleset(d)
    facts = C("rep", "127.0.0.1", 43100)
    prior = decide(report_rules, facts)
    assert prior.verdict is Verdict.REPORT and prior.reason is Reason.PORT_NOT_ALLOWED
    checked = decide_addresses(report_rules, facts, [ipaddress.ip_address("127.0.0.1")], prior)
    assert (checked.verdict, checked.reason) == (Verdict.DENY, Reason.PRIVATE_ADDRESS)


@pytest.mark.parametrize("address,reason", [
    ("127.0.0.1", Reason.PRIVATE_ADDRESS), ("10.0.0.1", Reason.PRIVATE_ADDRESS), ("192.168.1.1", Reason.PRIVATE_ADDRESS),
    ("100.64.0.1", Reason.PRIVATE_ADDRESS), ("169.254.169.254", Reason.DENY_LISTED), ("::1", Reason.PRIVATE_ADDRESS),
    ("fd00::1", Reason.PRIVATE_ADDRESS), ("::ffff:10.0.0.1", Reason.PRIVATE_ADDRESS),
    ("64:ff9b::a00:1", Reason.PRIVATE_ADDRESS), ("140.82.112.3", Reason.ALLOWED),
])
def test_ssrf_guard(rules: RuleSet, address: str, reason: Reason) -> None:
    facts = C("coder", "github.com")
    prior = decide(rules, facts)
    d = decide_addresses(rules, facts, [ipaddress.ip_address(address)], prior)
    assert d.reason is reason


def test_any_private_address_in_answer_refuses(rules: RuleSet) -> None:
    facts = C("coder", "github.com")
    prior = decide(rules, facts)
    addrs = [ipaddress.ip_address("140.82.112.3"), ipaddress.ip_address("127.0.0.1")]
    assert decide_addresses(rules, facts, addrs, prior).reason is Reason.PRIVATE_ADDRESS


def test_ssrf_not_softened_by_report_mode(rules: RuleSet) -> None:
    facts = C("claw", "github.com")
    d = decide_addresses(rules, facts, [ipaddress.ip_address("10.1.1.1")], decide(rules, facts))
    assert d.verdict is Verdict.DENY and d.reason is Reason.PRIVATE_ADDRESS


@pytest.mark.parametrize("host,listed", [
    pytest.param("github.com", "443 (https) / 80 (http)", id="default ports only"),
    pytest.param("pypi.org", "443, 8443", id="explicit ports"),
    pytest.param("both.example", "443 (https) / 80 (http), 8443", id="default and explicit for one host"),
])
def test_port_denial_lists_ports_as_plain_text(tmp_path: Path, host: str, listed: str) -> None:
    # The agent reads this message: it once showed a Python list repr ("['443 (https) / 80 (http)']"),
    # and left out the default ports when another rule for the host named explicit ones.
    doc = {
        "agents": [{"id": "a", "token_sha256": [sha256_hex("t")], "policies": ["one", "two"]}],
        "policies": {
            "one": {"allow": [{"id": "gh", "host": "github.com"}, {"id": "both-default", "host": "both.example"}]},
            "two": {"allow": [{"id": "pypi", "host": "pypi.org", "ports": [8443, 443]},
                              {"id": "both-alt", "host": "both.example", "ports": [8443]}]},
        },
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(doc))
    d = decide(load_ruleset(tmp_path), C("a", host, 22))
    assert d.reason is Reason.PORT_NOT_ALLOWED
    assert d.message == f"{host} is allowed, but not on port 22; allowed ports: {listed}"


def _basic(value: str) -> str:
    return "Basic " + base64.b64encode(value.encode()).decode()


@pytest.mark.parametrize("header,client,expected", [
    (_basic("coder:coder-token"), "127.0.0.1", AgentIdentity("coder", "token")),  # type: ignore[arg-type]
    (_basic("coder:second:token"), "127.0.0.1", AgentIdentity("coder", "token")),  # type: ignore[arg-type]
    (_basic("coder:wrong"), "127.0.0.1", AuthFailure.BAD_TOKEN),
    (_basic("ghost:coder-token"), "127.0.0.1", AuthFailure.UNKNOWN_AGENT),
    (_basic("ci:anything"), "10.20.0.5", AuthFailure.UNKNOWN_AGENT),
    (_basic("bound:bound-token"), "10.30.0.7", AgentIdentity("bound", "token")),  # type: ignore[arg-type]
    (_basic("bound:bound-token"), "10.31.0.7", AuthFailure.WRONG_SOURCE),
    (None, "10.20.0.5", AgentIdentity("ci", "source")),  # type: ignore[arg-type]
    (None, "127.0.0.1", AuthFailure.MISSING),
    ("Basic !!!notbase64", "127.0.0.1", AuthFailure.MALFORMED),
    ("Bearer abc", "127.0.0.1", AuthFailure.MALFORMED),
    (_basic("no-colon"), "127.0.0.1", AuthFailure.MALFORMED),
    (_basic("UPPER:x"), "127.0.0.1", AuthFailure.MALFORMED),
    ("Basic " + "A" * 5000, "127.0.0.1", AuthFailure.MALFORMED),
    ("Basic " + base64.b64encode(b"coder:\xff\xfe").decode(), "127.0.0.1", AuthFailure.MALFORMED),
])
def test_identify(rules: RuleSet, header: str | None, client: str, expected: object) -> None:
    result = identify(rules, header, client)
    if isinstance(expected, AgentIdentity):
        assert isinstance(result, AgentIdentity) and result.agent == expected.agent and result.method == expected.method
    else:
        assert result == expected


def test_credentials_repr_hides_token() -> None:
    creds = parse_basic(_basic("coder:s3cr3t-value"))
    assert creds is not None and "s3cr3t" not in repr(creds)


@pytest.mark.parametrize("raw,expected", [
    ("/a/b", "/a/b"), ("/a/b/", "/a/b/"), ("/a%20b", "/a b"), ("", "/"), ("*", "/"), ("/a?x=1", "/a"),
])
def test_canonical_path(raw: str, expected: str) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize("raw", ["/a/../b", "/a/./b", "/a//b", "/a%2Fb", "/a%5cb", "/a\\b", "a/b", "/a%00b", "/%ff",
                                 "/a?x=1#f", "/public/x#/../../private"])  # a fragment is never sent
def test_canonical_path_refuses(raw: str) -> None:
    with pytest.raises(PathError):
        canonical_path(raw)


@pytest.mark.parametrize("glob,path,matches", [
    ("/repos/*", "/repos/x", True), ("/repos/*", "/repos/x/y", False), ("/repos/**", "/repos", True),
    ("/repos/**", "/repos/x/y/z", True), ("/a/**/z", "/a/z", True), ("/a/**/z", "/a/b/c/z", True),
    ("/a/*.git", "/a/x.git", True), ("/a/*.git", "/a/xgit", False), ("/v1.0/*", "/v1x0/a", False),
])
def test_globs(glob: str, path: str, matches: bool) -> None:
    assert bool(compile_glob(glob).fullmatch(path)) is matches


def test_private_address_forms() -> None:
    assert is_private_address(ipaddress.ip_address("2002:a00:1::1"))  # 6to4 of 10.0.0.1
    assert not is_private_address(ipaddress.ip_address("2606:4700::1111"))


def test_lookup_cost_independent_of_rule_count(tmp_path: Path) -> None:
    """Structural check (not timing): a lookup probes one dict per host label, whatever the rule count."""
    from egresswarden.core.index import HostIndex
    from egresswarden.core.model import TargetKind

    index: HostIndex[int] = HostIndex()
    for i in range(20000):
        index.add(TargetKind.HOST, f"h{i}.example.com", i)
        index.add(TargetKind.WILDCARD, f"w{i}.example.org", i)
    assert index.lookup("h123.example.com") == [123]
    assert index.lookup("a.w5.example.org") == [5]
    assert index.lookup("w5.example.org") == []


@pytest.mark.parametrize("name", ["com", "co.uk", "uk", "example.com", "githubusercontent.com", "github.io",
                                  "x.ck", "www.ck", "city.kawasaki.jp", "kawasaki.jp", "a.b.kawasaki.jp",
                                  "xn--fiqs8s", "xn--55qx5d.cn", "pythonhosted.org", "s3.amazonaws.com"])
def test_public_suffix_set_agrees_with_tldextract(name: str) -> None:
    from egresswarden.core.hostnames import _extractor, is_public_suffix

    ext = _extractor()(name)
    assert is_public_suffix(name) == (not ext.domain and ext.suffix == name)


def test_public_suffix_list_is_the_bundled_snapshot_only() -> None:
    """tldextract must never download the list: no URLs, no cache directory."""
    from egresswarden.core.hostnames import _extractor

    extractor = _extractor()
    assert tuple(extractor.suffix_list_urls) == ()
    assert extractor.include_psl_private_domains is False


def _tldextract_lists() -> tuple[set[str], set[str]]:
    import tldextract

    lists = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None,
                                  include_psl_private_domains=True)._get_tld_extractor()
    return set(lists.tlds_excl_private), set(lists.tlds_incl_private) - set(lists.tlds_excl_private)


def test_snapshot_read_directly_matches_tldextracts_parse() -> None:
    """Warden reads tldextract's bundled list itself (start-up cost); the entries must be
    exactly the ones tldextract's own parser yields, section by section."""
    from egresswarden.core.hostnames import _snapshot_text, _suffix_lists

    assert _snapshot_text() is not None  # the direct read is the path in use, not the fallback
    icann, private = _suffix_lists()
    want_icann, want_private = _tldextract_lists()
    assert set(icann) == want_icann and len(want_icann) > 5000
    assert set(private) == want_private and "github.io" in want_private


@pytest.fixture
def suffix_lists(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """hostnames with its cached list read afresh in the test (and again after it): a test
    patches `_snapshot_text` / `_extractor` on the module it gets."""
    from egresswarden.core import hostnames

    hostnames._read_suffix_lists.cache_clear()
    yield hostnames
    monkeypatch.undo()
    hostnames._read_suffix_lists.cache_clear()


def test_suffix_lists_fall_back_to_tldextract_when_the_file_is_not_where_we_look(
        monkeypatch: pytest.MonkeyPatch, suffix_lists: Any) -> None:
    """A future tldextract that keeps its list elsewhere: its API decides, with the same lists."""
    monkeypatch.setattr(suffix_lists, "_snapshot_text", lambda: None)
    icann, private = suffix_lists._suffix_lists()
    assert (set(icann), set(private)) == _tldextract_lists()


@pytest.mark.parametrize("found,why", [
    ("com\nnet\n// ===BEGIN PRIVATE DOMAINS===\ngithub.io\n", "2 ICANN and 1 private entries"),
    ("com\nnet\n", "no private section"),
])
def test_a_short_snapshot_loads_no_rules(monkeypatch: pytest.MonkeyPatch, suffix_lists: Any, found: str,
                                         why: str) -> None:
    """tldextract's API would read the same file: a short one is an error, not a fallback."""
    from egresswarden.core.errors import SuffixListError

    monkeypatch.setattr(suffix_lists, "_snapshot_text", lambda: found)
    with pytest.raises(SuffixListError, match=why):
        suffix_lists._suffix_lists()


def test_no_list_at_all_loads_no_rules(monkeypatch: pytest.MonkeyPatch, suffix_lists: Any) -> None:
    """No file where we look and tldextract's API failing too (not installed, unreadable): an
    error naming the cause, never an empty list that would let every suffix pass."""
    from egresswarden.core.errors import SuffixListError

    def broken() -> None:
        raise ModuleNotFoundError("No module named 'tldextract'")

    monkeypatch.setattr(suffix_lists, "_snapshot_text", lambda: None)
    monkeypatch.setattr(suffix_lists, "_extractor", broken)
    with pytest.raises(SuffixListError, match=r"could not read its bundled Public Suffix List "
                                              r"\(ModuleNotFoundError\); reinstall tldextract"):
        suffix_lists._suffix_lists()


def test_a_short_list_from_the_fallback_too_loads_no_rules(monkeypatch: pytest.MonkeyPatch,
                                                           suffix_lists: Any) -> None:
    """tldextract's API reads the same file and checks nothing: a list still short after the
    fallback is an error (red team 30: `*.co.uk` loaded from a snapshot cut before `uk`),
    computed once and raised for every caller."""
    from egresswarden.core.errors import SuffixListError

    class Short:
        tlds_excl_private = ("com", "net")
        tlds_incl_private = ("com", "net", "github.io")

    class Extractor:
        calls = 0

        def _get_tld_extractor(self) -> Short:
            Extractor.calls += 1
            return Short()

    monkeypatch.setattr(suffix_lists, "_snapshot_text", lambda: None)
    monkeypatch.setattr(suffix_lists, "_extractor", lambda: Extractor())
    for _ in range(3):
        with pytest.raises(SuffixListError, match=r"looks truncated \(2 ICANN and 1 private entries; missing "):
            suffix_lists._suffix_lists()
    assert Extractor.calls == 1


def test_loading_rules_imports_neither_tldextract_nor_requests() -> None:
    """The download stack tldextract carries (requests, urllib3, filelock) is ~0.15 s of every
    start; the offline snapshot needs none of it."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from egresswarden.core.loader import load_ruleset; "
            f"rs = load_ruleset(Path({str(Path(__file__).resolve().parents[1] / 'rules')!r})); "
            "from egresswarden.core.hostnames import is_public_suffix, is_private_suffix; "
            "assert is_public_suffix('co.uk') and is_private_suffix('github.io'); "
            "print(sorted(m for m in ('tldextract', 'requests', 'urllib3', 'filelock') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_check_warns_on_rule_sets_that_relied_on_cidr_names(tmp_path: Path) -> None:
    """`warden check` names the rule sets the 0.2 cidr change breaks (a hosts-file name reached
    only through a cidr rule), with the rule's file:line and what to write instead."""
    import subprocess
    import sys

    (tmp_path / "hosts").write_text("10.40.0.9 db.internal\n10.40.0.10 named.internal\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "agents": [{"id": "dba", "token_sha256": [sha256_hex("t")], "policies": ["db"]}],
        "policies": {"db": {"allow": [{"id": "db-net", "cidr": "10.40.0.0/16", "ports": [5432]},
                                      {"id": "named", "host": "named.internal", "ports": [5432]}]}},
        "settings": {"hosts_file": "hosts"}}))
    warden = Path(sys.executable).parent / "warden"
    out = subprocess.run([str(warden), "check", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, out.stdout
    assert "db.internal" in warnings[0] and "db-net" in warnings[0] and "r.yaml:" in warnings[0]
    assert "add a host rule" in warnings[0]


def test_only_a_raw_tcp_rule_lets_a_passthrough_tunnel_carry_bytes_that_are_not_tls(tmp_path: Path) -> None:
    from egresswarden.core.plan import plan_connect, plan_raw_tcp

    (tmp_path / "r.yaml").write_text(
        "agents:\n  - id: a\n    token_sha256: ['" + "0" * 64 + "']\n    policies: [p]\n"
        "policies:\n  p:\n    allow:\n      - host: tls.test\n      - host: ssh.test\n        ports: [22]\n"
        "        raw_tcp: true\n")
    rules = load_ruleset(tmp_path)
    assert not plan_raw_tcp(rules, plan_connect(rules, "a", "tls.test", 443))
    assert plan_raw_tcp(rules, plan_connect(rules, "a", "ssh.test", 22))
    assert not plan_raw_tcp(rules, plan_connect(rules, "a", "ssh.test", 443))  # denied: port_not_allowed
