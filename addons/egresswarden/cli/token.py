"""`warden token ID`: a new random agent token and the `token_sha256` line for the rules."""

from __future__ import annotations

import argparse
import hashlib
import secrets


def cmd_token(args: argparse.Namespace) -> int:
    token = secrets.token_urlsafe(32)
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token for agent {args.agent_id!r} (shown once; give it to the agent, keep it out of the rules):")
    print(f"  {token}")
    print("add to the agent in rules/:")
    print(f'  token_sha256: ["{digest}"]')
    print(f"agent proxy URL: http://{args.agent_id}:{token}@<warden-host>:8080")
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="print a new random token and its token_sha256 line")
    token.add_argument("agent_id", metavar="ID")
    token.set_defaults(func=cmd_token)
