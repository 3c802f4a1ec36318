"""`warden check RULES_DIR`: validate and lint a rules directory.

Exit status: 0 valid (warnings are printed but do not fail), 1 invalid, or valid with
warnings under `--strict`; warnings a rule accepts (`accept_warnings:`) are printed as
accepted and never fail. `--offline` checks everything except secret values, which
are not read, so CI can lint production rules without production secrets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from egresswarden.core.errors import RuleProblem, WardenError
from egresswarden.core.lint import cidr_name_warnings, cidr_notes, lint
from egresswarden.core.loader import load_ruleset
from egresswarden.core.model import AgentMode


def cmd_check(args: argparse.Namespace) -> int:
    try:
        rules = load_ruleset(Path(args.rules_dir), secrets=not args.offline)
    except WardenError as e:
        print(f"warden: {e}", file=sys.stderr)
        return 1
    m = rules.model
    report = sum(1 for a in m.agents if a.mode is AgentMode.REPORT)
    secrets = "secret values not read (--offline)" if args.offline else f"{len(rules.secrets)} secret values read"
    print(f"ok: {len(m.files)} files, {len(m.agents)} agents ({report} in report mode), {len(m.policies)} policies, "
          f"{rules.rule_count} rules, {len(m.mcp_servers)} MCP servers; {secrets}; policy version {rules.version}")
    warnings = [RuleProblem(a.origin.file, a.origin.line,
                            f"warning: agent {a.id!r} has no policies: everything it sends is denied")
                for a in m.agents if not a.policies]
    linted = lint(rules)
    warnings += linted.warnings
    for problem in sorted(warnings + linted.accepted, key=lambda p: (p.file, p.line)):
        print(problem)
    cidr_warnings = cidr_name_warnings(rules)  # (0.2 cidr semantics; text already holds file:line)
    for text in cidr_warnings:
        print(f"warning: {text}")
    for note in cidr_notes(rules):
        print(f"note: {note}")
    count = len(warnings) + len(cidr_warnings)
    if count and args.strict:
        accepted = f" ({len(linted.accepted)} more accepted by accept_warnings)" if linted.accepted else ""
        print(f"warden: {count} warning(s) and --strict{accepted}", file=sys.stderr)
        return 1
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser("check", help="validate and lint a rules directory (exit 1 with file:line messages)")
    check.add_argument("rules_dir", metavar="RULES_DIR")
    check.add_argument("--offline", action="store_true",
                       help="do not read secret values (CI without production secrets); references are still checked")
    check.add_argument("--strict", action="store_true", help="exit 1 if there are warnings")
    check.set_defaults(func=cmd_check)
