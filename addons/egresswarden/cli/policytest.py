"""`warden test RULES_DIR CASES...`: rule unit tests in YAML, the way `opa test` works for Rego.

A case file (any *.yaml / *.yml; directories are searched recursively) is a list of cases,
or a mapping with `cases:` and optional `defaults:` merged into every case of the file:

    defaults: {agent: coder}
    cases:
      - name: coder reads the acme repos           # optional; default "<file>:<line>"
        request: GET https://api.github.com/repos/acme/x   # "METHOD URL", "URL" (GET) or {method, url}
        expect: allow                              # allow | deny | report
        reason: allowed                            # optional: a reason code
        rule: github-api-read                      # optional: the deciding rule id ("-" for none)
        addresses: [140.82.112.3]                  # optional: what the name resolves to
        interception: intercept                    # optional: intercept | passthrough | plain
        credentials: []                            # optional: credential ids injected
        mcp_server: null                           # optional: governing MCP server id
      - agent: claw
        mcp: {server: crm, tool: send_email, arguments: {to: a@acme.com}}   # a tools/call
        # or mcp: {server: crm, method: resources/read, params: {uri: "crm://x"}}
        expect: deny
        reason: mcp_bad_arguments

Each case runs `core.plan` (the stage function the proxy uses) offline: rules are loaded
without secrets, names resolve only through `addresses:` or the rules' hosts file; where
neither is known the address check is skipped (counted in the summary: it can only turn an
allow into a deny, for a private address or a deny cidr). Exit 0 all
passed, 1 a case failed, 2 the rules or a case file are invalid.
"""

from __future__ import annotations

import argparse
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egresswarden.cli.common import load_or_report
from egresswarden.core.decision import Reason, Verdict
from egresswarden.core.errors import RuleError
from egresswarden.core.hostnames import IPAddress, parse_ip
from egresswarden.core.plan import Plan, plan_mcp, plan_url, rule_origins
from egresswarden.core.ruleset import RuleSet
from egresswarden.core.yamlsource import LineMap, load_yaml

CASE_KEYS = frozenset({"name", "description", "agent", "request", "mcp", "expect", "reason", "rule", "addresses",
                       "interception", "credentials", "mcp_server"})
MCP_KEYS = frozenset({"server", "tool", "arguments", "method", "params"})
INTERCEPTIONS = ("intercept", "passthrough", "plain")
_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class Case:
    file: str
    line: int
    name: str
    agent: str
    expect: Verdict
    method: str = "GET"
    url: str | None = None
    mcp_server_id: str | None = None
    mcp_message: dict[str, Any] | None = None
    reason: Reason | None = None
    rule: Any = _UNSET  # str, None ("-"), or unset
    addresses: tuple[IPAddress, ...] = ()
    interception: Any = _UNSET
    credentials: Any = _UNSET
    mcp_server: Any = _UNSET

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def describe(self) -> str:
        if self.mcp_message is not None:
            m = self.mcp_message
            params = m.get("params") or {}
            what = f"{m['method']} {params.get('name') or params.get('uri') or ''}".strip()
            return f"agent {self.agent}, MCP {what} on server {self.mcp_server_id}"
        return f"agent {self.agent}, {self.method} {self.url}"


@dataclass(slots=True)
class Result:
    case: Case
    problems: list[str] = field(default_factory=list)
    plan: Plan | None = None
    seconds: float = 0.0
    skipped_address_check: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


class CaseFileError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def case_files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file())
        else:
            out.append(p)
    return out


def _parse_case(raw: Any, path: tuple[str | int, ...], lines: LineMap, defaults: dict[str, Any]) -> Case:
    where_line = lines.line_of(path)

    def err(key: str | None, message: str, hint: str = "") -> RuleError:
        return lines.error((*path, key) if key else path, message, hint)

    if not isinstance(raw, dict):
        raise err(None, "a case is a mapping (agent, request or mcp, expect)")
    item = {**defaults, **raw}
    unknown = sorted(set(item) - CASE_KEYS)
    if unknown:
        raise err(unknown[0], f"unknown case key {unknown[0]!r}", f"known keys: {', '.join(sorted(CASE_KEYS))}")
    agent = item.get("agent")
    if not isinstance(agent, str) or not agent:
        raise err("agent", "a case needs agent: <id>")
    try:
        expect = Verdict(str(item.get("expect")))
    except ValueError:
        raise err("expect", f"expect must be allow, deny or report, not {item.get('expect')!r}") from None
    fields: dict[str, Any] = {}
    if "reason" in item:
        try:
            fields["reason"] = Reason(str(item["reason"]))
        except ValueError:
            raise err("reason", f"unknown reason code {item['reason']!r}",
                      "see `warden explain` output or the README for the codes") from None
    if "rule" in item:
        rule = item["rule"]
        if rule is not None and not isinstance(rule, str):
            raise err("rule", "rule is a rule id (or '-' / null for no rule)")
        fields["rule"] = None if rule in (None, "-") else rule
    addresses = []
    for i, value in enumerate(item.get("addresses") or ()):
        ip = parse_ip(str(value))
        if ip is None:
            raise lines.error((*path, "addresses", i), f"not an IP address: {value!r}")
        addresses.append(ip)
    if "interception" in item:
        if item["interception"] not in INTERCEPTIONS:
            raise err("interception", f"interception is one of {', '.join(INTERCEPTIONS)}")
        fields["interception"] = item["interception"]
    if "credentials" in item:
        creds = item["credentials"]
        if not isinstance(creds, list) or not all(isinstance(c, str) for c in creds):
            raise err("credentials", "credentials is a list of credential ids")
        fields["credentials"] = tuple(creds)
    if "mcp_server" in item:
        fields["mcp_server"] = item["mcp_server"]
    has_request, has_mcp = "request" in item, "mcp" in item
    if has_request == has_mcp:
        raise err(None, "a case has exactly one of request: or mcp:")
    if has_request:
        request = item["request"]
        if isinstance(request, str):
            words = request.split()
            if len(words) == 1:
                method, url = "GET", words[0]
            elif len(words) == 2:
                method, url = words[0].upper(), words[1]
            else:
                raise err("request", f"request is 'METHOD URL' or 'URL', got {request!r}")
        elif isinstance(request, dict) and isinstance(request.get("url"), str):
            method, url = str(request.get("method", "GET")).upper(), request["url"]
        else:
            raise err("request", "request is 'METHOD URL', 'URL' or {method: M, url: U}")
        fields.update(method=method, url=url)
    else:
        mcp = item["mcp"]
        if not isinstance(mcp, dict) or not isinstance(mcp.get("server"), str):
            raise err("mcp", "mcp needs server: <id> and tool: <name> (or method: and params:)")
        bad = sorted(set(mcp) - MCP_KEYS)
        if bad:
            raise lines.error((*path, "mcp", bad[0]), f"unknown mcp key {bad[0]!r}",
                              f"known keys: {', '.join(sorted(MCP_KEYS))}")
        if "tool" in mcp:
            message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": mcp["tool"], "arguments": mcp.get("arguments", {})}}
        elif isinstance(mcp.get("method"), str):
            message = {"jsonrpc": "2.0", "id": 1, "method": mcp["method"], "params": mcp.get("params", {})}
        else:
            raise err("mcp", "mcp needs tool: <name> or method: <JSON-RPC method>")
        fields.update(mcp_server_id=mcp["server"], mcp_message=message)
    name = item.get("name") or f"{Path(lines.file).name}:{where_line}"
    return Case(lines.file, where_line, str(name), agent, expect, addresses=tuple(addresses), **fields)


def load_cases(path: Path) -> list[Case]:
    """Parse one case file; raises CaseFileError listing every problem with file:line."""
    try:
        doc, lines = load_yaml(path)
    except RuleError as e:
        raise CaseFileError([str(e)]) from None
    defaults: dict[str, Any] = {}
    base: tuple[str | int, ...] = ()
    if isinstance(doc, dict):
        extra = sorted(set(doc) - {"cases", "defaults"})
        if extra:
            raise CaseFileError([str(lines.error((extra[0],), f"unknown top-level key {extra[0]!r}",
                                                 "a case file has cases: and optional defaults:"))])
        defaults = doc.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise CaseFileError([str(lines.error(("defaults",), "defaults is a mapping of case keys"))])
        doc, base = doc.get("cases"), ("cases",)
    if not isinstance(doc, list):
        raise CaseFileError([f"{path}: expected a list of cases (or cases: [...])"])
    cases, problems = [], []
    for i, raw in enumerate(doc):
        try:
            cases.append(_parse_case(raw, (*base, i), lines, defaults))
        except RuleError as e:
            problems.append(str(e))
    if problems:
        raise CaseFileError(problems)
    return cases


def run_case(rules: RuleSet, case: Case) -> Result:
    started = time.perf_counter()
    result = Result(case)
    try:
        if case.mcp_message is not None:
            assert case.mcp_server_id is not None
            p = plan_mcp(rules, case.agent, case.mcp_server_id, case.mcp_message, case.addresses or None)
        else:
            assert case.url is not None
            p = plan_url(rules, case.agent, case.method, case.url, case.addresses or None)
    except KeyError:
        declared = ", ".join(s.id for s in rules.model.mcp_servers) or "none"
        result.problems.append(f"unknown MCP server {case.mcp_server_id!r} (declared: {declared})")
        return result
    except ValueError as e:
        result.problems.append(f"invalid request: {e}")
        return result
    result.plan = p
    result.skipped_address_check = not p.complete
    d = p.decision
    if d.verdict is not case.expect:
        result.problems.append(f"expected {case.expect.value}, got {d.verdict.value}")
    if case.reason is not None and d.reason is not case.reason:
        result.problems.append(f"expected reason {case.reason.value}, got {d.reason.value}")
    if case.rule is not _UNSET and d.rule_id != case.rule:
        result.problems.append(f"expected rule {case.rule or '-'}, got {d.rule_id or '-'}")
    mode = p.interception.value if p.interception else None
    if case.interception is not _UNSET and mode != case.interception:
        result.problems.append(f"expected interception {case.interception}, got {mode or 'none (refused)'}")
    if case.credentials is not _UNSET and tuple(p.credentials) != case.credentials:
        result.problems.append(f"expected credentials {list(case.credentials)}, got {list(p.credentials)}")
    if case.mcp_server is not _UNSET and p.mcp_server != case.mcp_server:
        result.problems.append(f"expected mcp_server {case.mcp_server}, got {p.mcp_server}")
    result.seconds = time.perf_counter() - started
    return result


def failure_text(result: Result, rules: RuleSet) -> str:
    case = result.case
    out = [f"FAIL {case.where} {case.name}", f"  request:  {case.describe()}"]
    want = [case.expect.value]
    if case.reason is not None:
        want.append(f"({case.reason.value})")
    if case.rule is not _UNSET:
        origin = rule_origins(rules).rules.get(case.rule) if case.rule else None
        want.append(f"rule={case.rule or '-'}" + (f" [{origin}]" if origin else ""))
    out.append(f"  expected: {' '.join(want)}")
    p = result.plan
    if p is not None:
        d = p.decision
        where = f" [{p.final.rule_origin}]" if p.final.rule_origin else ""
        mode = p.interception.value if p.interception else "-"
        out.append(f"  actual:   {d.verdict.value} ({d.reason.value}) rule={d.rule_id or '-'}{where} "
                   f"at stage {p.final.stage.value}; interception={mode} credentials={list(p.credentials)} "
                   f"mcp_server={p.mcp_server}")
        out.append(f"            {d.message}")
    out += [f"  - {problem}" for problem in result.problems]
    return "\n".join(out)


def write_junit(path: Path, results: list[Result], rules: RuleSet, seconds: float) -> None:
    suites = ET.Element("testsuites", name="warden test", tests=str(len(results)),
                        failures=str(sum(not r.ok for r in results)), time=f"{seconds:.3f}")
    by_file: dict[str, list[Result]] = {}
    for r in results:
        by_file.setdefault(r.case.file, []).append(r)
    for file, group in by_file.items():
        suite = ET.SubElement(suites, "testsuite", name=file, tests=str(len(group)),
                              failures=str(sum(not r.ok for r in group)),
                              time=f"{sum(r.seconds for r in group):.6f}")
        for r in group:
            tc = ET.SubElement(suite, "testcase", classname=Path(file).stem, name=r.case.name, file=file,
                               line=str(r.case.line), time=f"{r.seconds:.6f}")
            if not r.ok:
                failure = ET.SubElement(tc, "failure", message="; ".join(r.problems))
                failure.text = failure_text(r, rules)
    tree = ET.ElementTree(suites)
    ET.indent(tree)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree.write(path, encoding="utf-8", xml_declaration=True)


def cmd_test(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    rules = load_or_report(args.rules_dir, secrets=False)
    if rules is None:
        return 2
    files = case_files(args.cases)
    if not files:
        print("warden: no case files (*.yaml, *.yml) found in " + " ".join(args.cases), file=sys.stderr)
        return 2
    cases: list[Case] = []
    problems: list[str] = []
    for f in files:
        try:
            cases += load_cases(f)
        except CaseFileError as e:
            problems += e.problems
    if problems:
        for problem in problems:
            print(f"warden: {problem}", file=sys.stderr)
        return 2
    results = [run_case(rules, case) for case in cases]
    seconds = time.perf_counter() - started
    failed = [r for r in results if not r.ok]
    for r in results:
        if not r.ok:
            print(failure_text(r, rules) + "\n")
        elif args.verbose:
            print(f"ok   {r.case.where} {r.case.name}")
    skipped = sum(r.skipped_address_check for r in results)
    summary = (f"{len(results) - len(failed)} passed, {len(failed)} failed ({len(results)} cases in {len(files)} "
               f"files, {seconds:.2f} s); policy version {rules.version}")
    if skipped:
        summary += (f"\nnote: {skipped} cases did not run the address check (the name is neither an IP, in the "
                    f"hosts file, nor given addresses:)")
    print(summary)
    if args.junit_xml:
        write_junit(Path(args.junit_xml), results, rules, seconds)
    return 1 if failed else 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    test = sub.add_parser("test", help="run rule unit tests (YAML cases) offline; exit 1 on any failure")
    test.add_argument("rules_dir", metavar="RULES_DIR")
    test.add_argument("cases", nargs="+", metavar="CASES", help="case files or directories (*.yaml, recursively)")
    test.add_argument("--junit-xml", metavar="PATH", help="also write a JUnit XML report (for CI)")
    test.add_argument("-v", "--verbose", action="store_true", help="list passing cases too")
    test.set_defaults(func=cmd_test)
