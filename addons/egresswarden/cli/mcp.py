"""`warden mcp ...`: MCP governance tools. Each subcommand module adds itself to the group."""

from __future__ import annotations

import argparse

from egresswarden.cli import mcp_pin, mcp_stdio


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser("mcp", help="MCP governance tools")
    mcp_sub = group.add_subparsers(dest="mcp_command", required=True)
    for command in (mcp_pin, mcp_stdio):
        command.add_cli(mcp_sub)
