"""`warden mcp stdio`: what an agent's MCP configuration runs instead of a local server's command.

    warden mcp stdio --agent ID --server ID [--rules DIR] [--audit-log PATH]

Starts the server declared as `mcp_servers: [{id: ID, command: ...}]` as a child process and
relays JSON-RPC between the agent (this process's stdin/stdout) and the server, deciding
every message like HTTP MCP (see `egresswarden.mcpstdio.relay`). Exit status: the
server's (128+N if it died of signal N, or if Warden got signal N), 0 when the agent
ended the session, 2 for a usage or rules problem, 127 when the server cannot be started, 1
after an internal error (the server is stopped).
Nothing but JSON-RPC is ever written to stdout; problems go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from egresswarden.cli.common import load_or_report
from egresswarden.core.credentials import Scanner
from egresswarden.core.mcp import PinStore
from egresswarden.mcpstdio.framing import DEFAULT_MAX_LINE
from egresswarden.mcpstdio.launch import LaunchError, build_launch, secrets_credential
from egresswarden.mcpstdio.records import Recorder, default_audit_path
from egresswarden.mcpstdio.relay import Relay

USAGE_ERROR = 2


def _fail(text: str) -> int:
    print(f"warden mcp stdio: {text}", file=sys.stderr, flush=True)
    return USAGE_ERROR


def cmd_stdio(args: argparse.Namespace) -> int:
    rules = load_or_report(args.rules)
    if rules is None:
        return _fail(f"refusing to start: the rules in {args.rules} are invalid")
    server = next((s for s in rules.model.mcp_servers if s.id == args.server), None)
    if server is None:
        declared = ", ".join(s.id for s in rules.model.mcp_servers if s.stdio is not None) or "none"
        return _fail(f"no MCP server {args.server!r} is declared in {args.rules} (stdio servers: {declared}); "
                     f"agents can only start declared servers")
    if rules.agent(args.agent) is None:
        return _fail(f"unknown agent {args.agent!r} (agents are declared under agents: in the rules)")
    try:
        launch = build_launch(rules, server, args.agent)
    except LaunchError as e:
        return _fail(str(e))
    scanner = Scanner([secrets_credential(server, launch.secrets)] if launch.secrets else [])
    try:
        recorder = Recorder(rules, args.audit_log, args.agent, server.id, scanner)
    except OSError as e:
        return _fail(f"cannot open the audit log: {e.__class__.__name__}: {e}")
    recorder.start()
    relay = Relay(rules, server, args.agent, recorder, scanner, max_line=args.max_line,
                  request_timeout=args.request_timeout, pins=PinStore())
    try:
        return asyncio.run(relay.run(launch))
    finally:
        recorder.close()


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1024:
        raise argparse.ArgumentTypeError("must be at least 1024 bytes")
    return n


def _positive_float(value: str) -> float:
    f = float(value)
    if f <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return f


def add_cli(sub: Any) -> None:
    """Register `stdio` in the `warden mcp` group."""
    p = sub.add_parser("stdio", help="run a declared local (stdio) MCP server, governing every message",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent", required=True, help="agent id (as in agents:) whose policies apply")
    p.add_argument("--server", required=True, help="MCP server id (as in mcp_servers:, with command:)")
    p.add_argument("--rules", default=os.environ.get("WARDEN_RULES", "rules"), metavar="DIR",
                   help="rules directory (default: $WARDEN_RULES, else ./rules; use an absolute path in MCP configs)")
    p.add_argument("--audit-log", metavar="PATH",
                   help=f"hash-chained audit log file (default: {default_audit_path()}; "
                   f"a second concurrent session writes PATH-2, -3, ...)")
    p.add_argument("--max-line", type=_positive_int, default=DEFAULT_MAX_LINE, metavar="BYTES",
                   help=f"longest JSON-RPC line accepted from either side (default: {DEFAULT_MAX_LINE})")
    p.add_argument("--request-timeout", type=_positive_float, metavar="SECONDS",
                   help="answer a request with an error when the server has not answered it in this time "
                   "(default: wait as long as the agent does)")
    p.set_defaults(func=cmd_stdio)
