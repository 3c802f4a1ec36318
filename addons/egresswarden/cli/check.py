"""`warden check RULES_DIR`: validate and lint a rules directory."""

from __future__ import annotations

import argparse

from egresswarden.cli.common import load_or_report
from egresswarden.core.lint import cidr_name_warnings, cidr_notes
from egresswarden.core.model import AgentMode


def cmd_check(args: argparse.Namespace) -> int:
    rules = load_or_report(args.rules_dir)
    if rules is None:
        return 1
    m = rules.model
    report = sum(1 for a in m.agents if a.mode is AgentMode.REPORT)
    print(f"ok: {len(m.files)} files, {len(m.agents)} agents ({report} in report mode), {len(m.policies)} policies, "
          f"{rules.rule_count} rules, {len(m.mcp_servers)} MCP servers; policy version {rules.version}")
    for agent in m.agents:
        if not agent.policies:
            print(f"warning: {agent.origin}: agent {agent.id!r} has no policies: everything it sends is denied")
    for warning in cidr_name_warnings(rules):
        print(f"warning: {warning}")
    for note in cidr_notes(rules):
        print(f"note: {note}")
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser("check", help="validate and lint a rules directory (exit 1 with file:line messages)")
    check.add_argument("rules_dir", metavar="RULES_DIR")
    check.set_defaults(func=cmd_check)
