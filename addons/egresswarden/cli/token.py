"""`warden token ID`: a new random agent token and the `token_sha256` line for the rules.

The id is checked against the rules' agent id pattern first, so a token is never made for
an agent the rules would reject. Tokens never start with '-': pasted after a command-line
flag (`--token -abc`) one would be read as an option.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sys
from typing import Any

from egresswarden.core.model import ANONYMOUS_AGENT
from egresswarden.core.validate import rule_schema


def _id_schema() -> dict[str, Any]:
    schema: dict[str, Any] = rule_schema()["properties"]["agents"]["items"]["properties"]["id"]
    return schema


def agent_id_problem(agent: str) -> str | None:
    """Why the rules would reject `agent` as an agent id (checked against the schema itself), or None."""
    schema = _id_schema()
    if not re.fullmatch(schema["pattern"].strip("^$"), agent):
        return (f"{agent!r} is not a valid agent id: ids match [a-z0-9][a-z0-9_-]* "
                "(lowercase letters, digits, '_' and '-', not starting with '_' or '-')")
    if len(agent) > schema.get("maxLength", 64):
        return f"{agent!r} is not a valid agent id: at most {schema.get('maxLength', 64)} characters"
    return None


def new_token() -> str:
    """A URL-safe token (256 bits) that does not begin with '-'."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def cmd_token(args: argparse.Namespace) -> int:
    agent = args.agent_id
    problem = agent_id_problem(agent)
    if problem:
        print(f"warden token: {problem}", file=sys.stderr)
        return 2
    if agent == ANONYMOUS_AGENT:
        print("warden token: the 'anonymous' agent takes no tokens (it serves clients that send none)",
              file=sys.stderr)
        return 2
    token = new_token()
    digest = hashlib.sha256(token.encode()).hexdigest()
    print(f"token for agent {agent!r} (shown once; give it to the agent, keep it out of the rules):")
    print(f"  {token}")
    print("add to the agent in rules/:")
    print(f'  token_sha256: ["{digest}"]')
    print(f"agent proxy URL: http://{agent}:{token}@<warden-host>:8080")
    print(f"agent shell: eval \"$(warden agent-env --agent {agent} --token {token})\"")
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="print a new random token and its token_sha256 line")
    token.add_argument("agent_id", metavar="ID")
    token.set_defaults(func=cmd_token)
