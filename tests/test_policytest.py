"""`warden test`: rule unit tests in YAML, run by the real CLI on real rule directories."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import yaml

from .harness import REPO, WARDEN, sha256_hex


def _warden_test(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WARDEN, "test", *args], capture_output=True, text=True, timeout=120)


def test_shipped_cases_pass_on_the_example_rules() -> None:
    out = _warden_test(str(REPO / "rules"), str(REPO / "policy-tests"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout


def test_a_broken_rule_is_caught_with_expected_actual_and_file_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules, ignore=shutil.ignore_patterns("schema.json"))
    policies = rules / "policies.yaml"
    text = policies.read_text()
    # The kind of slip a reviewer misses: one '*' instead of '**' stops every nested path.
    broken = text.replace('paths: ["/repos/acme/**", "/user"]', 'paths: ["/repos/acme/*", "/user"]')
    assert broken != text
    policies.write_text(broken)
    line = next(i for i, t in enumerate(broken.splitlines(), 1) if "id: github-api-read" in t)
    junit = tmp_path / "out" / "junit.xml"
    out = _warden_test(str(rules), str(REPO / "policy-tests"), "--junit-xml", str(junit))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL " in out.stdout and "the API may be read for acme repos" in out.stdout
    assert "expected: allow rule=github-api-read" in out.stdout
    assert "actual:   deny (path_not_allowed) rule=github-api-read" in out.stdout
    assert f"{policies}:{line}" in out.stdout  # the deciding rule's file:line
    root = ET.parse(junit).getroot()
    failures = [tc for tc in root.iter("testcase") if tc.find("failure") is not None]
    assert int(root.get("failures", "0")) == len(failures) >= 1
    assert any(tc.get("name") == "the API may be read for acme repos" for tc in failures)


def test_cases_need_no_secrets_and_cover_mcp_credentials_and_addresses(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(yaml.safe_dump({
        "agents": [{"id": "claw", "token_sha256": [sha256_hex("t")], "policies": ["sales"]}],
        "policies": {"sales": {
            "allow": [{"id": "crm", "host": "mcp.crm.test"},
                      {"id": "db", "host": "db.lan.test", "addresses": ["10.9.0.0/16"]}],
            "credentials": [{"id": "crm-token", "host": "mcp.crm.test",
                             "inject": {"Authorization": "Bearer ${secret:NEVER_SET_CRM_TOKEN}"}}],
            "mcp": [{"server": "crm", "tools": ["search", "send_email"], "deny_tools": ["delete"],
                     "arguments": {"send_email": {"properties": {"to": {"type": "string", "pattern": "@acme\\.com$"}}}}}],
        }},
        "mcp_servers": [{"id": "crm", "url": "https://mcp.crm.test/mcp"}],
    }, sort_keys=False))
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "crm.yaml").write_text(yaml.safe_dump({"defaults": {"agent": "claw"}, "cases": [
        {"name": "mail inside the company", "mcp": {"server": "crm", "tool": "send_email",
                                                    "arguments": {"to": "bob@acme.com"}},
         "expect": "allow", "rule": "sales/mcp/crm"},
        {"name": "mail outside", "mcp": {"server": "crm", "tool": "send_email", "arguments": {"to": "x@evil.test"}},
         "expect": "deny", "reason": "mcp_bad_arguments"},
        {"name": "deny list", "mcp": {"server": "crm", "tool": "delete"}, "expect": "deny",
         "reason": "mcp_tool_denied"},
        {"name": "resources need a rule", "mcp": {"server": "crm", "method": "resources/read",
                                                  "params": {"uri": "crm://x"}},
         "expect": "deny", "reason": "mcp_resource_not_allowed"},
        {"name": "the endpoint", "request": "POST https://mcp.crm.test/mcp", "expect": "allow",
         "interception": "intercept", "credentials": ["crm-token"], "mcp_server": "crm"},
        {"name": "the database at its private address", "request": "https://db.lan.test/", "expect": "allow",
         "addresses": ["10.9.1.1"], "rule": "db"},
        {"name": "the name resolving elsewhere inside", "request": "https://db.lan.test/", "expect": "deny",
         "addresses": ["10.10.0.1"], "reason": "private_address"},
    ]}, sort_keys=False))
    out = _warden_test(str(rules), str(cases), "-v")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "7 passed, 0 failed" in out.stdout
    # The same rules cannot start a proxy without the secret: only the offline tools load them.
    check = subprocess.run([WARDEN, "check", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "NEVER_SET_CRM_TOKEN" in check.stderr
    # Without addresses the address check is skipped, and the summary says so.
    (cases / "crm.yaml").write_text(yaml.safe_dump([{"agent": "claw", "request": "https://db.lan.test/",
                                                      "expect": "allow"}]))
    skipped = _warden_test(str(rules), str(cases))
    assert skipped.returncode == 0 and "1 cases did not run the address check" in skipped.stdout


def test_invalid_case_files_name_file_and_line(tmp_path: Path) -> None:
    cases = tmp_path / "bad.yaml"
    cases.write_text("cases:\n  - agent: coder\n    request: GET https://pypi.org/\n    expect: alow\n"
                     "  - agent: coder\n    reqest: GET https://pypi.org/\n    expect: allow\n")
    out = _warden_test(str(REPO / "rules"), str(cases))
    assert out.returncode == 2
    assert f"{cases}:4: expect must be allow, deny or report" in out.stderr
    assert f"{cases}:6: unknown case key 'reqest'" in out.stderr
