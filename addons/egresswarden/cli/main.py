"""The `warden` command. Each subcommand lives in a module of its own with an `add_cli(sub)`
that registers its parser; this module only puts them together, in the order `--help` shows."""

from __future__ import annotations

import argparse
import sys

from egresswarden import __version__
from egresswarden.cli import audit, ca, check, explain, mcp, run, sandbox, token

COMMANDS = (run, check, explain, token, audit, ca, mcp, sandbox)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="warden", description="Egress governance proxy for AI agents.")
    parser.add_argument("--version", action="version", version=f"warden {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
