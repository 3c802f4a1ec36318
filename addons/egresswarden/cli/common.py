"""Helpers the `warden` subcommands share: listen-address parsing and rule loading with a readable error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from egresswarden.core.errors import WardenError
from egresswarden.core.loader import load_ruleset
from egresswarden.core.ruleset import RuleSet


def host_port(value: str) -> tuple[str, int]:
    """argparse type for HOST:PORT ("[v6]:port" too). An empty host means all IPv4 addresses."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def format_listen(value: tuple[str, int] | None) -> str:
    if value is None:
        return ""
    host, port = value
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_or_report(rules: str, secrets: bool = True) -> RuleSet | None:
    """Load a rules directory; on failure print every problem (file:line) and return None.
    `secrets=False` loads offline (no secret is read; see `core.compiler.compile_model`)."""
    try:
        return load_ruleset(Path(rules), secrets)
    except WardenError as e:
        print(f"warden: {e}", file=sys.stderr)
        return None
