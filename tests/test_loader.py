"""Rule files: every kind of bad input is an error with file and line, and nothing loads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
from egresswarden.core.errors import RuleSetError
from egresswarden.core.loader import load_ruleset

from .harness import REPO, WARDEN

AGENT = "agents:\n  - id: a\n    token_sha256: ['" + "0" * 64 + "']\n    policies: [p]\n"


def _load(tmp_path: Path, text: str, name: str = "r.yaml") -> RuleSetError:
    (tmp_path / name).write_text(text)
    with pytest.raises(RuleSetError) as info:
        load_ruleset(tmp_path)
    return info.value


BAD = [
    pytest.param("agents: [\n", 2, "invalid YAML", id="malformed yaml"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: a.com\n        method: [GET]\n", 9, "unknown key 'method'", id="unknown key"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: '*.com'\n", 8, "public suffix", id="wildcard public suffix"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: '*.co.uk'\n", 8, "public suffix", id="wildcard multi-label public suffix"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - domain: co.uk\n", 8, "public suffix", id="domain public suffix"),
    # names below which the list has suffixes, though they are none: `*.bd`, `*.sch.uk` (wildcard
    # entries), `co.za` (no `za` entry), `bo.nordland.no`, `*.kawasaki.jp` with `!city.kawasaki.jp`
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: '*.bd'\n", 8, "public suffixes lie below 'bd' (*.bd)",
                 id="wildcard over a wildcard-suffix TLD"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: '*.sch.uk'\n", 8, "example.<name>.sch.uk",
                 id="wildcard over a wildcard-suffix second level"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - domain: kawasaki.jp\n", 8, "public suffixes lie below 'kawasaki.jp'",
                 id="domain over a wildcard suffix with an exception"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: '*.za'\n", 8, "public suffixes lie below 'za' (ac.za and",
                 id="wildcard over a TLD the list has only second levels of"),
    pytest.param(AGENT + "policies:\n  p:\n    credentials:\n      - id: c\n        domain: nordland.no\n        inject: {X-A: b}\n", 9,
                 "public suffixes lie below 'nordland.no'",
                 id="credential over a county with municipal suffixes"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: 'a.*.com'\n", 8, "leftmost", id="wildcard in the middle"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: '*'\n", 8, "leftmost", id="bare star"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - cidr: 0.0.0.0/0\n", 8, "every address", id="cidr everything"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - cidr: 10.0.0.1/8\n", 8, "host bits", id="cidr host bits"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: 10.0.0.1\n", 8, "use cidr", id="IP in host"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: a.com\n        domain: b.com\n", 8, "exactly one", id="two targets"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: a.com\n        paths: ['/a/**b']\n", 9, "whole path segment", id="bad glob"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: a.com\n        ports: [70000]\n", 9, "maximum", id="port out of range"),
    pytest.param(AGENT + "deny:\n  - host: a.com\n    raw_tcp: true\n", 7, "unknown key 'raw_tcp'", id="raw_tcp on a deny rule"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - host: a.com\n        raw_tcp: yes please\n", 9, "boolean",
                 id="raw_tcp not a boolean"),
    pytest.param(AGENT + "policies:\n  p:\n    allow:\n      - id: x\n        host: a.com\n      - id: x\n        host: b.com\n", 10, "duplicate rule id", id="duplicate rule id"),
    pytest.param(AGENT + AGENT.replace("agents:\n", "") + "policies:\n  p: {}\n", 5, "duplicate agent id", id="duplicate agent"),
    pytest.param("agents:\n  - id: a\n    token_sha256: ['" + "0" * 64 + "']\n    policies: [nope]\n", 2, "unknown policy", id="unknown policy"),
    pytest.param("agents:\n  - id: a\n    token_sha256: [abc]\n    policies: []\n", 3, "not a sha256 hex digest", id="bad token hash"),
    pytest.param("agents:\n  - id: A_B\n    token_sha256: ['" + "0" * 64 + "']\n    policies: []\n", 2, "does not match", id="bad agent id"),
    pytest.param("agents:\n  - id: a\n    policies: []\n", 2, "neither token_sha256 nor sources", id="agent nobody can be"),
    pytest.param("policies:\n  p: {}\n  p: {}\n", 3, "duplicate key", id="duplicate yaml key"),
    pytest.param("settings:\n  private_networks: maybe\n", 2, "not one of", id="bad enum"),
    pytest.param("a: &a [*a]\n", 1, "unknown or recursive alias '*a'", id="recursive alias"),
]


@pytest.mark.parametrize("text,line,fragment", BAD)
def test_bad_rule_files(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    err = _load(tmp_path, text)
    problem = err.problems[0]
    assert problem.file.endswith("r.yaml")
    assert problem.line == line, str(err)
    assert fragment and fragment in f"{problem.message} {problem.hint}", str(err)


@pytest.mark.parametrize("target", ["host: '*.city.kawasaki.jp'", "domain: www.ck", "host: sch.uk",
                                    "host: '*.myschool.area.sch.uk'", "domain: example.com.bd",
                                    "host: gov.uk", "host: co.uk", "host: github.io"])
def test_names_below_wildcard_suffixes_and_exact_hosts_still_load(tmp_path: Path, target: str) -> None:
    """A registrable domain under a `*.` entry (or its exception), or one exact name (even a
    suffix's own: `host: gov.uk` admits gov.uk and nothing under it): not over-broad."""
    (tmp_path / "r.yaml").write_text(AGENT + f"policies:\n  p:\n    allow:\n      - {target}\n")
    assert load_ruleset(tmp_path).model.policies["p"].allow


@pytest.mark.parametrize("target", ["host: '*.zip'", "domain: mov", "host: '*.za'", "domain: bd", "host: '*.co.uk'"])
def test_deny_rules_may_cover_whole_suffixes(tmp_path: Path, target: str) -> None:
    """Denying all of .zip is stricter, not broader (red team 32: blocking abused TLDs, the only
    tool against report-mode agents, was refused as over-broad)."""
    (tmp_path / "r.yaml").write_text(AGENT + f"policies:\n  p: {{}}\ndeny:\n  - {target}\n")
    assert load_ruleset(tmp_path).model.deny


def test_duplicate_policy_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("policies:\n  p: {}\n")
    err = _load(tmp_path, "policies:\n  p: {}\n", "b.yaml")
    assert "duplicate policy 'p'" in str(err) and "b.yaml:2" in str(err)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    err = _load(tmp_path, AGENT + "policies:\n  p:\n    allow:\n      - host: '*.com'\n      - cidr: 0.0.0.0/0\n")
    assert len(err.problems) == 2


def test_example_rules_load_and_match_schema() -> None:
    rules = load_ruleset(REPO / "rules")
    assert rules.rule_count > 0
    packaged = REPO / "addons" / "egresswarden" / "core" / "rules.schema.json"
    # rules/schema.json is a symlink to the schema the package ships: one file, nothing to keep equal
    assert (REPO / "rules" / "schema.json").resolve() == packaged.resolve()
    shipped = json.loads(packaged.read_text())
    jsonschema.Draft202012Validator.check_schema(shipped)


def test_warden_check_cli(tmp_path: Path) -> None:
    ok = subprocess.run([WARDEN, "check", str(REPO / "rules")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "ok:" in ok.stdout
    (tmp_path / "bad.yaml").write_text(AGENT + "policies:\n  p:\n    allow:\n      - host: '*.com'\n")
    bad = subprocess.run([WARDEN, "check", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert f"{tmp_path / 'bad.yaml'}:8" in bad.stderr and "public suffix" in bad.stderr


def test_warden_explain_cli() -> None:
    out = subprocess.run([WARDEN, "explain", "--rules", str(REPO / "rules"), "--agent", "coder", "--method", "POST",
                          "https://api.github.com/repos/acme/x"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "method_not_allowed" in out.stdout and "github-api-read" in out.stdout and "policies.yaml" in out.stdout
    allowed = subprocess.run([WARDEN, "explain", "--rules", str(REPO / "rules"), "--agent", "coder",
                              "https://github.com/acme/repo"], capture_output=True, text=True, timeout=60)
    assert allowed.returncode == 0 and "passed through" in allowed.stdout


def test_warden_token_cli() -> None:
    import hashlib
    out = subprocess.run([WARDEN, "token", "coder"], capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    token = lines[1].strip()
    assert f'token_sha256: ["{hashlib.sha256(token.encode()).hexdigest()}"]' in out.stdout


def _mutations(doc: object) -> list[object]:
    """Single-point mutations of a valid document: wrong types, unknown keys, bad values."""
    import copy

    out: list[object] = []
    bad_values = [None, 1, -1, 1.5, True, "x", "", [], {}, ["x"], [1, 1], {"zz": 1}, "A" * 300]

    def walk(node: object, setter) -> None:  # noqa: ANN001
        for bad in bad_values:
            setter(bad)
            out.append(copy.deepcopy(root))
        setter(node)
        if isinstance(node, dict):
            for key in list(node):
                value = node[key]
                walk(value, lambda v, k=key: node.__setitem__(k, v))
            node["unknown_key"] = 1
            out.append(copy.deepcopy(root))
            del node["unknown_key"]
        elif isinstance(node, list):
            for i, value in enumerate(list(node)):
                walk(value, lambda v, i=i: node.__setitem__(i, v))

    root = copy.deepcopy(doc)
    for key in list(root):  # type: ignore[union-attr]
        walk(root[key], lambda v, k=key: root.__setitem__(k, v))  # type: ignore[index]
    return out


def test_fast_schema_check_agrees_with_jsonschema() -> None:
    """The fast validator may only say "valid" where jsonschema does (it skips the messages)."""
    import yaml
    from egresswarden.core.validate import _fast_check, _schema_validator

    docs = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "rules").glob("*.yaml"))]
    docs.append({"agents": [{"id": "a", "token_sha256": ["0" * 64], "policies": ["p"], "sources": ["10.0.0.0/8"]}],
                 "policies": {"p": {"allow": [{"id": "r", "host": "a.com", "ports": [443], "methods": ["GET"],
                                               "paths": ["/x/**"], "accept_warnings": ["private_suffix"]}],
                                    "credentials": [{"id": "c", "host": "a.com", "inject": {"A": "${secret:X}"},
                                                     "strip": ["Cookie"], "placeholder": "placeholder-1",
                                                     "accept_warnings": ["private_suffix", "never_injected"]}],
                                    "mcp": [{"server": "s", "tools": ["t"], "arguments": {"t": {"type": "object"}},
                                             "accept_warnings": ["unreachable"]}]}},
                 "mcp_servers": [{"id": "s", "url": "https://m.example/mcp"}],
                 "settings": {"private_networks": "deny", "audit": {"on_failure": "continue", "max_file_bytes": 5000},
                              "alerts": [{"url": "https://h.example/x", "events": ["deny"], "max_per_minute": 5}]}})
    checked = 0
    for doc in docs:
        for candidate in [doc, *_mutations(doc)]:
            fast = _fast_check()(candidate)
            slow = _schema_validator().is_valid(candidate)
            assert fast == slow, candidate
            checked += 1
    assert checked > 1000
