"""The `warden` command: run, check, explain, token, audit verify, ca."""

from __future__ import annotations

import argparse
import hashlib
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

from egresswarden.core.decide import decide, decide_addresses
from egresswarden.core.errors import WardenError
from egresswarden.core.facts import RequestFacts
from egresswarden.core.hostnames import HostError, normalize_host, parse_ip
from egresswarden.core.loader import load_ruleset
from egresswarden.core.model import AgentMode

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _load_or_report(rules: str) -> object | None:
    try:
        return load_ruleset(Path(rules))
    except WardenError as e:
        print(f"warden: {e}", file=sys.stderr)
        return None


# -- run -----------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    if _load_or_report(args.rules) is None:
        print("warden: refusing to start with invalid rules", file=sys.stderr)
        return 2
    if args.workers > 1 and args.worker_index is None:
        from egresswarden.runtime.workers import run_workers

        return run_workers(args)
    return run_proxy(args)


def _format_listen(value: tuple[str, int] | None) -> str:
    if value is None:
        return ""
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def mitmproxy_arguments(args: argparse.Namespace) -> list[str]:
    host, port = args.listen
    margs = [
        "--listen-host", host, "--listen-port", str(port),
        "--set", f"confdir={args.confdir}",
        "--set", f"warden_rules={args.rules}",
        "--set", f"warden_audit_log={args.audit_log}",
        "--set", f"warden_metrics_listen={_format_listen(args.metrics_listen)}",
        "--set", "termlog_verbosity=warn" if not args.verbose else "termlog_verbosity=info",
    ]
    for item in args.set or []:
        margs += ["--set", item]
    return margs


def run_proxy(args: argparse.Namespace) -> int:
    from mitmproxy.tools import cmdline, main

    from egresswarden.runtime.master import WardenMaster

    if args.worker_index is not None:
        from egresswarden.runtime.workers import enable_reuse_port

        enable_reuse_port()

    Path(args.confdir).mkdir(parents=True, exist_ok=True)
    main.run(WardenMaster, cmdline.mitmdump, mitmproxy_arguments(args))
    return 0


# -- check ---------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    rules = _load_or_report(args.rules_dir)
    if rules is None:
        return 1
    m = rules.model  # type: ignore[attr-defined]
    report = sum(1 for a in m.agents if a.mode is AgentMode.REPORT)
    print(f"ok: {len(m.files)} files, {len(m.agents)} agents ({report} in report mode), {len(m.policies)} policies, "
          f"{rules.rule_count} rules, {len(m.mcp_servers)} MCP servers; policy version {rules.version}")  # type: ignore[attr-defined]
    for agent in m.agents:
        if not agent.policies:
            print(f"warning: {agent.origin}: agent {agent.id!r} has no policies: everything it sends is denied")
    return 0


# -- explain -------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    rules = _load_or_report(args.rules)
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
        connect = decide(rules, RequestFacts(args.agent, host, port, "https"))  # type: ignore[arg-type]
        stages.append(("CONNECT", connect))
        if connect.allowed and connect.intercept:
            stages.append((f"{args.method} (intercepted)",
                           decide(rules, RequestFacts(args.agent, host, port, "https", args.method, path))))  # type: ignore[arg-type]
    else:
        stages.append((f"{args.method} (plain http)",
                       decide(rules, RequestFacts(args.agent, host, port, "http", args.method, path))))  # type: ignore[arg-type]
    last = stages[-1][1]
    try:
        name = normalize_host(host)
    except HostError:
        name = host
    addresses = [parse_ip(name)] if parse_ip(name) else list(rules.hosts_file.get(name, ()))  # type: ignore[attr-defined]
    if last.allowed and addresses:
        stages.append(("address check", decide_addresses(rules, RequestFacts(args.agent, name, port, scheme),  # type: ignore[arg-type]
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
    print(f"{'policy version':>22}: {rules.version}")  # type: ignore[attr-defined]
    final = [d for _, d in stages if d is not None][-1]
    return 0 if final.allowed else 3


def _rule_origins(rules: object) -> dict[str, str]:
    m = rules.model  # type: ignore[attr-defined]
    out = {r.id: str(r.origin) for p in m.policies.values() for r in p.allow}
    out.update({r.id: str(r.origin) for r in m.deny})
    return out


# -- token ---------------------------------------------------------------------------------
def cmd_token(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token for agent {args.agent_id!r} (shown once; give it to the agent, keep it out of the rules):")
    print(f"  {token}")
    print("add to the agent in rules/:")
    print(f'  token_sha256: ["{digest}"]')
    print(f"agent proxy URL: http://{args.agent_id}:{token}@<warden-host>:8080")
    return 0


# -- audit ---------------------------------------------------------------------------------
def cmd_audit_verify(args: argparse.Namespace) -> int:
    from egresswarden.record.journal import verify_chain

    result = verify_chain(args.files)
    if result.ok:
        print(result.message)
        return 0
    print(f"{result.file}:{result.line}: {result.message} (after {result.records} good records)")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warden", description="Egress governance proxy for AI agents.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--rules", default="rules", metavar="DIR", help="rules directory (default: rules)")
    run.add_argument("--listen", type=_host_port, default=_host_port(DEFAULT_LISTEN), metavar="HOST:PORT",
                     help=f"proxy listen address (default: {DEFAULT_LISTEN})")
    run.add_argument("--metrics-listen", type=_host_port, default=_host_port(DEFAULT_METRICS_LISTEN),
                     metavar="HOST:PORT", help=f"/metrics and /healthz listen address (default: {DEFAULT_METRICS_LISTEN})")
    run.add_argument("--audit-log", default="audit.jsonl", metavar="PATH",
                     help="audit log file, or '-' for stdout (default: audit.jsonl)")
    run.add_argument("--confdir", default="certs", metavar="DIR",
                     help="mitmproxy confdir holding the interception CA (default: certs)")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="run N proxy processes on one port (SO_REUSEPORT); metrics merged, one audit chain "
                          "per worker in <audit>.w<i>.jsonl (default: 1)")
    run.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--set", action="append", metavar="NAME=VALUE", help="set a mitmproxy option (repeatable)")
    run.add_argument("-v", "--verbose", action="store_true", help="log mitmproxy's info messages too")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate and lint a rules directory (exit 1 with file:line messages)")
    check.add_argument("rules_dir", metavar="RULES_DIR")
    check.set_defaults(func=cmd_check)

    explain = sub.add_parser("explain", help="show the decision for an agent and URL, without any network")
    explain.add_argument("--agent", required=True)
    explain.add_argument("--method", default="GET", type=str.upper)
    explain.add_argument("--rules", default="rules", metavar="DIR")
    explain.add_argument("url")
    explain.set_defaults(func=cmd_explain)

    token = sub.add_parser("token", help="print a new random token and its token_sha256 line")
    token.add_argument("agent_id", metavar="ID")
    token.set_defaults(func=cmd_token)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="verify the hash chain of audit files (oldest first)")
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.set_defaults(func=cmd_audit_verify)

    try:
        from egresswarden.cli import ca
    except ImportError:
        ca = None  # type: ignore[assignment]
    if ca is not None and hasattr(ca, "add_cli"):
        ca.add_cli(sub)
    from egresswarden.cli import mcp_pin as mcp_cli
    mcp_cli.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
