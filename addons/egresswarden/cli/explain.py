"""`warden explain`: the decision at each stage for an agent and a URL, without any network."""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlsplit

from egresswarden.cli.common import load_or_report
from egresswarden.core.decide import decide, decide_addresses
from egresswarden.core.facts import RequestFacts
from egresswarden.core.hostnames import HostError, normalize_host, parse_ip


def cmd_explain(args: argparse.Namespace) -> int:
    rules = load_or_report(args.rules)
    if rules is None:
        return 1
    url = args.url if "://" in args.url else f"https://{args.url}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        print(f"warden: invalid port in {args.url!r}", file=sys.stderr)
        return 1
    host = parts.hostname or ""
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    stages = []
    if scheme == "https":
        connect = decide(rules, RequestFacts(args.agent, host, port, "https"))
        stages.append(("CONNECT", connect))
        if connect.allowed and connect.intercept:
            stages.append((f"{args.method} (intercepted)",
                           decide(rules, RequestFacts(args.agent, host, port, "https", args.method, path))))
    else:
        stages.append((f"{args.method} (plain http)",
                       decide(rules, RequestFacts(args.agent, host, port, "http", args.method, path))))
    last = stages[-1][1]
    try:
        name = normalize_host(host)
    except HostError:
        name = host
    addresses = [parse_ip(name)] if parse_ip(name) else list(rules.hosts_file.get(name, ()))
    if last.allowed and addresses:
        stages.append(("address check", decide_addresses(rules, RequestFacts(args.agent, name, port, scheme),
                                                         addresses, last)))
    elif last.allowed and not addresses:
        stages.append(("address check", None))
    origins = _rule_origins(rules)
    for label, d in stages:
        if d is None:
            print(f"{label:>22}: not evaluated (no network here): at run time {name} is resolved and every address "
                  f"must be public or covered by a cidr allow rule")
            continue
        where = f" [{origins[d.rule_id]}]" if d.rule_id in origins else ""
        extra = " -> TLS intercepted" if label == "CONNECT" and d.allowed and d.intercept else (
            " -> passed through (no interception)" if label == "CONNECT" and d.allowed else "")
        print(f"{label:>22}: {d.verdict.value} ({d.reason.value}) rule={d.rule_id or '-'}{where}{extra}")
        print(f"{'':>22}  {d.message}")
    print(f"{'policy version':>22}: {rules.version}")
    final = [d for _, d in stages if d is not None][-1]
    return 0 if final.allowed else 3


def _rule_origins(rules: object) -> dict[str, str]:
    m = rules.model
    out = {r.id: str(r.origin) for p in m.policies.values() for r in p.allow}
    out.update({r.id: str(r.origin) for r in m.deny})
    return out


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explain = sub.add_parser("explain", help="show the decision for an agent and URL, without any network")
    explain.add_argument("--agent", required=True)
    explain.add_argument("--method", default="GET", type=str.upper)
    explain.add_argument("--rules", default="rules", metavar="DIR")
    explain.add_argument("url")
    explain.set_defaults(func=cmd_explain)
