"""Issue 15 item 5: `warden check` for CI (real CLI): --offline, --strict, error texts, warnings."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from egresswarden.core.errors import RuleSetError
from egresswarden.core.loader import load_ruleset

from .harness import REPO, WARDEN, start_warden

HASH = "ead5244fbd09472e48ee57c4a66cceb184d5b22becbbd4cf40604bfa5c9b11d0"


def check(path: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([WARDEN, "check", *flags, str(path)], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **(env or {})})


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path


@pytest.fixture
def k8s_rules(tmp_path: Path) -> Path:
    """The shipped Kubernetes rules, as the ConfigMap mounts them."""
    data = yaml.safe_load((REPO / "deploy/kubernetes/configmap-rules.yaml").read_text())["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_shipped_kubernetes_rules_lint_offline_without_the_secret(k8s_rules: Path) -> None:
    online = check(k8s_rules)
    assert online.returncode == 1 and "github_token" in online.stderr
    offline = check(k8s_rules, "--offline")
    assert offline.returncode == 0, offline.stderr
    assert "secret values not read (--offline)" in offline.stdout


def test_offline_still_checks_secret_references(tmp_path: Path) -> None:
    rules = write(tmp_path, f"""agents:
  - id: a
    token_sha256: ["{HASH}"]
    policies: [p]
policies:
  p:
    allow: [{{host: api.example.com}}]
    credentials:
      - id: c
        host: api.example.com
        inject: {{Authorization: "Bearer ${{env:GH}}"}}
""")
    r = check(rules, "--offline")
    assert r.returncode == 1 and "only ${secret:NAME} references are supported" in r.stderr


def test_offline_rule_set_holds_no_secret_values(tmp_path: Path) -> None:
    rules = write(tmp_path, f"""agents:
  - id: a
    token_sha256: ["{HASH}"]
    policies: [p]
policies:
  p:
    allow: [{{host: api.example.com}}]
    credentials:
      - id: c
        host: api.example.com
        inject: {{Authorization: "Bearer ${{secret:NOT_SET_ANYWHERE}}"}}
""")
    with pytest.raises(RuleSetError, match="NOT_SET_ANYWHERE"):
        load_ruleset(rules)
    offline = load_ruleset(rules, secrets=False)
    assert offline.secrets == ()
    assert offline.credentials_by_id["c"].headers == (("Authorization", "Bearer ${secret:NOT_SET_ANYWHERE}"),)


def test_pasted_token_is_not_echoed(tmp_path: Path) -> None:
    token = "Zq3xmXH7bH_2f6y8fzYyCqgqgkR0ZC3wJc1B5h0K9lM"
    r = check(write(tmp_path, f"agents:\n  - id: a\n    token_sha256: [\"{token}\"]\n    policies: []\n"))
    assert r.returncode == 1
    assert token not in r.stdout + r.stderr
    assert "rules.yaml:3" in r.stderr and "not a sha256 hex digest" in r.stderr and "warden token" in r.stderr


def test_tab_gets_a_hint(tmp_path: Path) -> None:
    r = check(write(tmp_path, "agents:\n\t- id: a\n"))
    assert r.returncode == 1 and "rules.yaml:2" in r.stderr and "tabs" in r.stderr


def test_wrongly_nested_section_gets_a_sentence(tmp_path: Path) -> None:
    r = check(write(tmp_path, f"""agents:
  - id: a
    token_sha256: ["{HASH}"]
    policies: [github]
policies:
  github:
  allow:
    - host: github.com
"""))
    assert r.returncode == 1
    assert "None is not of type" not in r.stderr
    assert "rules.yaml:6: policies.github is empty, but it must be a mapping" in r.stderr
    assert "indent them further" in r.stderr
    assert "rules.yaml:7: 'allow' is at the level of policy names" in r.stderr


def test_duplicate_key_does_not_hide_other_errors(tmp_path: Path) -> None:
    write(tmp_path, f"""agents:
  - id: a
    token_sha256: ["{HASH}"]
    policies: [p]
    policies: [q]
policies:
  p:
    allow:
      - host: "*.com"
""")
    write(tmp_path, "settings:\n  private_networks: maybe\n", "other.yaml")
    r = check(tmp_path)
    assert r.returncode == 1
    assert "rules.yaml:5: duplicate key 'policies' (first at line 4)" in r.stderr
    assert "rules.yaml:9:" in r.stderr and "public suffix" in r.stderr
    assert "other.yaml:2:" in r.stderr


LINT_RULES = f"""agents:
  - id: coder
    token_sha256: ["{HASH}"]
    policies: [p]
  - id: pilot
    token_sha256: ["{HASH[::-1]}"]
    policies: [p]
    mode: report
policies:
  p:
    allow:
      - id: pages
        host: "*.github.io"
      - id: buckets
        domain: s3.amazonaws.com
      - id: api
        host: api.example.com
      - id: ok-site
        host: acme.github.io
    credentials:
      - id: bound
        host: api.example.com
        inject: {{Authorization: "Bearer ${{secret:T}}"}}
      - id: stranded
        host: api.other.example
        inject: {{Authorization: "Bearer ${{secret:T}}"}}
    mcp:
      - server: crm
        tools: ["*"]
mcp_servers:
  - id: crm
    url: https://mcp.crm.example/mcp
deny:
  - id: no-pages
    host: "*.pages.dev"
"""


def test_warnings_exit_zero_unless_strict(tmp_path: Path) -> None:
    rules = write(tmp_path, LINT_RULES)
    r = check(rules, "--offline")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "rules.yaml:12: warning: allow rule 'pages' (host: '*.github.io')" in out
    assert "rules.yaml:14: warning: allow rule 'buckets' (domain: s3.amazonaws.com)" in out
    assert "warning: credential 'stranded' on api.other.example is never injected for agent(s) coder" in out
    assert "warning: MCP server 'crm' (mcp.crm.example:443) is unreachable for agent(s) coder" in out
    # Neither the bound credential, the exact site, the report-mode agent nor a deny rule is flagged.
    assert "'bound'" not in out and "ok-site" not in out and "pilot" not in out and "pages.dev" not in out
    assert out.count("warning:") == 4
    strict = check(rules, "--offline", "--strict")
    assert strict.returncode == 1 and "4 warning(s) and --strict" in strict.stderr


def _accepting(*pairs: tuple[str, str]) -> str:
    """LINT_RULES with `accept_warnings: [code]` added right after the line `after` (indented alike)."""
    text = LINT_RULES
    for after, code in pairs:
        line = next(x for x in text.splitlines() if x.strip() == after)
        indent = " " * (len(line) - len(line.lstrip()) + (2 if line.lstrip().startswith("- ") else 0))
        text = text.replace(line + "\n", f"{line}\n{indent}accept_warnings: [{code}]\n", 1)
    return text


def test_accepted_warnings_are_listed_and_do_not_fail_strict(tmp_path: Path) -> None:
    """A team that gates CI on --strict and has looked at a warning says so on the rule; the
    rest still fail the gate."""
    rules = write(tmp_path, _accepting(('host: "*.github.io"', "private_suffix"),
                                       ("host: api.other.example", "never_injected"),
                                       ("- server: crm", "unreachable")))
    r = check(rules, "--offline", "--strict")
    assert r.returncode == 1 and "1 warning(s) and --strict (3 more accepted by accept_warnings)" in r.stderr, r.stderr
    out = r.stdout
    assert "warning: allow rule 'buckets' (domain: s3.amazonaws.com)" in out
    assert "accepted (private_suffix, accept_warnings): allow rule 'pages' (host: '*.github.io')" in out
    assert "accepted (never_injected, accept_warnings): credential 'stranded'" in out
    assert "accepted (unreachable, accept_warnings): MCP server 'crm'" in out
    assert out.count("warning:") == 1
    rules = write(tmp_path, _accepting(('host: "*.github.io"', "private_suffix"), ("domain: s3.amazonaws.com", "private_suffix"),
                                       ("host: api.other.example", "never_injected"), ("- server: crm", "unreachable")))
    r = check(rules, "--offline", "--strict")
    assert r.returncode == 0 and "warning:" not in r.stdout and r.stdout.count("accepted (") == 4, r.stdout + r.stderr


def test_an_acceptance_that_no_longer_applies_is_a_warning(tmp_path: Path) -> None:
    rules = write(tmp_path, _accepting(("host: acme.github.io", "private_suffix"), ("- id: bound", "never_injected")))
    r = check(rules, "--offline")
    assert r.returncode == 0
    assert ("rules.yaml:18: warning: allow rule 'ok-site' accepts the warning private_suffix (accept_warnings), "
            "which it no longer raises (hint: remove private_suffix from its accept_warnings)") in r.stdout, r.stdout
    assert "warning: credential 'bound' accepts the warning never_injected" in r.stdout, r.stdout


@pytest.mark.parametrize("where,item,code", [
    ("allow", "{id: x, host: '*.github.io', accept_warnings: [never_injected]}", "never_injected"),
    ("allow", "{id: x, host: '*.github.io', accept_warnings: [over_broad]}", "over_broad"),
    ("deny", "{id: x, host: '*.github.io', accept_warnings: [private_suffix]}", "accept_warnings"),
])
def test_accept_warnings_takes_only_the_codes_of_its_kind(tmp_path: Path, where: str, item: str, code: str) -> None:
    body = (f"    allow: [{item}]\n" if where == "allow" else "    allow: [{host: a.example.com}]\n"
            f"deny: [{item}]\n")
    rules = write(tmp_path, f"agents:\n  - id: a\n    token_sha256: [\"{HASH}\"]\n    policies: [p]\n"
                            f"policies:\n  p:\n{body}")
    r = check(rules, "--offline")
    assert r.returncode == 1 and "rules.yaml:" in r.stderr and code in r.stderr, r.stdout + r.stderr


def test_accept_warnings_cannot_accept_an_error(tmp_path: Path) -> None:
    """Over-broad rules (ICANN suffixes) are errors, not warnings: no key lets them load."""
    rules = write(tmp_path, f"agents:\n  - id: a\n    token_sha256: [\"{HASH}\"]\n    policies: [p]\n"
                            "policies:\n  p:\n    allow:\n      - host: '*.co.uk'\n        accept_warnings: [private_suffix]\n")
    r = check(rules, "--offline")
    assert r.returncode == 1 and "rules.yaml:8:" in r.stderr and "over-broad" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("host", ["compute.amazonaws.com", "amazonaws.com"])
def test_a_wildcard_above_private_suffixes_warns(tmp_path: Path, host: str) -> None:
    """The private section lists `*.compute.amazonaws.com` and s3.amazonaws.com: a wildcard
    above them admits every stranger's instance and bucket."""
    rules = write(tmp_path, f"agents:\n  - id: a\n    token_sha256: [\"{HASH}\"]\n    policies: [p]\n"
                            f"policies:\n  p:\n    allow:\n      - id: aws\n        host: '*.{host}'\n")
    r = check(rules, "--offline", "--strict")
    assert r.returncode == 1
    assert (f"rules.yaml:8: warning: allow rule 'aws' (host: '*.{host}') covers every site under {host}, above "
            ) in r.stdout and " public suffix" in r.stdout, r.stdout + r.stderr


def test_a_deny_rule_over_a_whole_tld_loads_and_denies(tmp_path: Path) -> None:
    """Red team 32: `deny: *.zip` was refused as over-broad; it is stricter, so it loads and wins."""
    rules = write(tmp_path, f"agents:\n  - id: a\n    token_sha256: [\"{HASH}\"]\n    policies: [p]\n"
                            "policies:\n  p:\n    allow:\n      - id: files\n        domain: example.zip\n"
                            "deny:\n  - id: no-zip\n    host: '*.zip'\n")
    assert check(rules, "--strict").returncode == 0
    r = subprocess.run([WARDEN, "explain", "--agent", "a", "--rules", str(rules), "--address", "93.184.216.34",
                        "https://files.example.zip/"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin"})
    assert "connect: deny (deny_listed) rule=no-zip" in r.stdout and "final: deny" in r.stdout, r.stdout + r.stderr


def test_clean_rules_pass_strict(tmp_path: Path) -> None:
    rules = write(tmp_path, f"agents:\n  - id: a\n    token_sha256: [\"{HASH}\"]\n    policies: [p]\n"
                            "policies:\n  p:\n    allow: [{host: acme.github.io}]\n")
    r = check(rules, "--strict")
    assert r.returncode == 0 and "warning" not in r.stdout, r.stdout + r.stderr


def _tldextract_with_snapshot(tmp_path: Path, cut_after: str) -> Path:
    """A copy of the installed tldextract whose bundled list ends after the first line equal to
    `cut_after` (or its first N lines, for a number), importable first through PYTHONPATH."""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("tldextract")
    assert spec is not None and spec.submodule_search_locations
    site = tmp_path / "site"
    package = site / "tldextract"
    shutil.copytree(next(iter(spec.submodule_search_locations)), package)
    snapshot = package / ".tld_set_snapshot"
    lines = snapshot.read_text(encoding="utf-8").splitlines()
    keep = int(cut_after) if cut_after.isdigit() else lines.index(cut_after) + 1
    snapshot.write_text("\n".join(lines[:keep]) + "\n", encoding="utf-8")
    return site


# Red team 30 cut the list before `uk` (2,000 lines); red team 31 just after the uk block, where
# tldextract's API still returned 5,258 entries with com/uk/co.uk/jp and lost `app`, `dev`, `za`
# and every newer gTLD; and inside the private section, which silenced the lint warnings.
@pytest.mark.parametrize("cut_after,rule", [("2000", "host: '*.co.uk'"), ("*.sch.uk", "host: '*.app'"),
                                            ("github.io", "host: '*.vercel.app'")])
def test_a_truncated_public_suffix_list_loads_no_rules(tmp_path: Path, cut_after: str, rule: str) -> None:
    """`warden check` fails and `warden run` refuses to start, saying why; neither lets the
    rule through (an error, or for a private suffix a warning, with the intact list)."""
    site = _tldextract_with_snapshot(tmp_path, cut_after)
    rules = (f"agents:\n  - id: a\n    token_sha256: [\"{HASH}\"]\n    policies: [p]\n"
             f"policies:\n  p:\n    allow:\n      - {rule}\n")
    (tmp_path / "rules").mkdir()
    rules_dir = write(tmp_path / "rules", rules)
    intact = check(rules_dir, "--strict")
    assert intact.returncode == 1 and ("over-broad" in intact.stderr or "warning:" in intact.stdout)
    r = check(rules_dir, env={"PYTHONPATH": str(site)})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "looks truncated" in r.stderr and "reinstall tldextract" in r.stderr and "Traceback" not in r.stderr
    w = start_warden(tmp_path / "w", [("r.yaml", rules)], expect_start=False, env={"PYTHONPATH": str(site)})
    try:
        code = w.proc.wait(30)
    finally:
        w.stop()
    assert code != 0 and "refusing to start" in w.output() and "looks truncated" in w.output(), w.output()
