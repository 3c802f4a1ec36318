"""The `warden` command. Each subcommand lives in a module of its own with an `add_cli(sub)`
that registers its parser; this module only puts them together, in the order `--help` shows.

`warden sandbox` and `warden run` take a fast path: only their own parser is built, so they
do not pay for importing the other subcommands. The sandbox wraps every sandboxed command
(and every sandboxed MCP server): its module and the launcher import only the standard
library and the rule model, not the rule engine or cryptography (~0.5-0.8 s). `warden run`
imports the proxy anyway, but not the MCP, replay, log and CA tooling (~50 ms of every
start, restart and worker spawn).
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from egresswarden import __version__
from egresswarden.cli import run, sandbox

FAST_COMMANDS: dict[str, ModuleType] = {"sandbox": sandbox, "run": run}


def commands() -> tuple[ModuleType, ...]:
    from egresswarden.cli import (
        agent_env,
        audit,
        ca,
        check,
        explain,
        log,
        mcp,
        policytest,
        replay,
        run,
        token,
    )

    return (run, check, explain, policytest, replay, log, token, agent_env, audit, ca, mcp, sandbox)


def build_parser(only: tuple[ModuleType, ...] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warden", description="Egress governance proxy for AI agents.")
    parser.add_argument("--version", action="version", version=f"warden {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in only or commands():
        command.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fast = FAST_COMMANDS.get(argv[0]) if argv else None
    parser = build_parser((fast,) if fast is not None else None)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
