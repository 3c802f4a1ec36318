"""`warden explain`: every stage the proxy would run for an agent and a URL, without any network.

Built on `core.plan.plan()`, the function the proxy's stages share, so explain cannot drift
from the proxy. Rules are loaded offline (no secret is read). `--json` prints
`Plan.to_json()` (keys documented in core/plan.py and the README). Exit status: 0 allowed
(or report), 3 denied, 1 bad input or rules.
"""

from __future__ import annotations

import argparse
import json
import sys

from egresswarden.cli.common import load_or_report
from egresswarden.core.hostnames import IPAddress, parse_ip
from egresswarden.core.plan import AddressSource, Plan, StageName, StageResult, plan_url, rule_origins
from egresswarden.core.ruleset import RuleSet

LABEL = 14


def _decision_line(label: str, stage: StageResult) -> list[str]:
    d = stage.decision
    if d is None:
        return [f"{label:>{LABEL}}: {stage.note}"]
    where = f" [{stage.rule_origin}]" if stage.rule_origin else ""
    return [f"{label:>{LABEL}}: {d.verdict.value} ({d.reason.value}) rule={d.rule_id or '-'}{where}",
            f"{'':>{LABEL}}  {d.message}"]


def render_text(p: Plan, rules: RuleSet) -> str:
    """The human form: one block per stage, in the proxy's order."""
    origins = rule_origins(rules)
    target = f"{p.scheme}://{p.host}:{p.port}{p.path or ''}"
    out = [f"{'request':>{LABEL}}: agent {p.agent}, {p.method or 'CONNECT'} {target}"]
    for stage in p.stages:
        out += _decision_line(stage.stage.value, stage)
        if stage.stage.value == "addresses" and stage.decision is not None:
            source = "IP literal" if p.address_source is AddressSource.LITERAL else p.address_source.value.replace("_", " ")
            out.append(f"{'':>{LABEL}}  checked {', '.join(str(a) for a in p.addresses)} (from {source})")
        if stage.stage.value in ("connect", "addresses") and stage is _tunnel_stage(p):
            out.append(_interception_line(p))
    if p.interception is not None and p.interception.value == "plain":
        out.append(f"{'interception':>{LABEL}}: none (plain HTTP: every request decided; never credentials)")
    request = p.stage(StageName.REQUEST)
    if p.decision.allowed and request is not None and request.decision is not None:
        if p.credentials:
            named = ", ".join(f"{c} [{origins.credentials[c]}]" if c in origins.credentials else c
                              for c in p.credentials)
            out.append(f"{'credentials':>{LABEL}}: injected: {named}")
        else:
            out.append(f"{'credentials':>{LABEL}}: none injected")
        out.append(f"{'mcp server':>{LABEL}}: {p.mcp_server or 'none'}"
                   + (" (its JSON-RPC messages are decided one by one)" if p.mcp_server else ""))
    d = p.decision
    out.append(f"{'final':>{LABEL}}: {d.verdict.value} ({d.reason.value}) at stage {p.final.stage.value}"
               + ("" if p.complete else "; not final: the address check needs DNS (pass --address)"))
    out.append(f"{'policy version':>{LABEL}}: {p.policy_version}")
    return "\n".join(out)


def _tunnel_stage(p: Plan) -> StageResult | None:
    """The stage after which the interception choice is made (https tunnels only)."""
    if p.scheme != "https" or p.interception is None:
        return None
    tunnel = [s for s in p.stages if s.stage.value in ("connect", "addresses")]
    return tunnel[-1] if tunnel else None


def _interception_line(p: Plan) -> str:
    if p.interception is not None and p.interception.value == "intercept":
        why = ", ".join(w.value for w in p.intercept_why)
        return f"{'interception':>{LABEL}}: TLS intercepted ({why}): every request in the tunnel is decided"
    carries = ("any TCP (the rule says raw_tcp: true)" if p.raw_tcp else
               "TLS only: its first bytes must be a ClientHello naming the host (raw_tcp: true allows other TCP)")
    return (f"{'interception':>{LABEL}}: passed through (no interception): requests inside are not seen\n"
            f"{'carries':>{LABEL}}: {carries}")


def _address(value: str) -> IPAddress:
    ip = parse_ip(value)
    if ip is None:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}")
    return ip


def cmd_explain(args: argparse.Namespace) -> int:
    rules = load_or_report(args.rules, secrets=False)
    if rules is None:
        return 1
    try:
        p = plan_url(rules, args.agent, args.method, args.url, args.address or None)
    except ValueError as e:
        print(f"warden: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(p.to_json(), indent=2))
    else:
        print(render_text(p, rules))
    return 0 if p.decision.allowed else 3


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = sub.add_parser("explain", help="show every stage the proxy would run for an agent and URL, "
                                              "without any network (exit 0 allowed, 3 denied)")
    explain.add_argument("--agent", required=True)
    explain.add_argument("--method", default="GET", type=str.upper)
    explain.add_argument("--rules", default="rules", metavar="DIR")
    explain.add_argument("--address", action="append", type=_address, metavar="IP",
                         help="an address the host resolves to (repeatable); default: IP literal or hosts file, "
                              "else the address check is not evaluated")
    explain.add_argument("--json", action="store_true", help="print the plan as JSON (stable keys, see README)")
    explain.add_argument("url")
    explain.set_defaults(func=cmd_explain)
