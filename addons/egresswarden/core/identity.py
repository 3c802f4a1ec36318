"""Who is calling: agent identification from Proxy-Authorization and the source address.

Order: credentials if the client sent any (they must be right: no fallback to the source
address, so a wrong token is never silently upgraded to another identity); else an agent
identified by source network alone; else the explicit `anonymous` agent; else nobody.
Tokens are compared as sha256 digests with `hmac.compare_digest`; an unknown agent id still
costs one comparison, so response timing does not reveal which agent ids exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum

from .hostnames import IPAddress, parse_ip
from .ruleset import CompiledAgent, RuleSet

MAX_HEADER_LENGTH = 4096
_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_DUMMY_DIGEST = hashlib.sha256(b"warden: no such agent").digest()


class AuthFailure(StrEnum):
    MISSING = "missing"  # no credentials and no source/anonymous agent fits
    MALFORMED = "malformed"  # not "Basic base64(id:token)"
    UNKNOWN_AGENT = "unknown_agent"
    BAD_TOKEN = "bad_token"
    WRONG_SOURCE = "wrong_source"  # right token, wrong network


class IdentityMethod(StrEnum):
    TOKEN = "token"
    SOURCE = "source"
    ANONYMOUS = "anonymous"
    SANDBOX = "sandbox"  # a `warden sandbox` session token (runtime/admin.py)


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    agent: str
    method: IdentityMethod


@dataclass(frozen=True, slots=True)
class Credentials:
    agent: str
    token: str

    def __repr__(self) -> str:
        return f"Credentials(agent={self.agent!r}, token=<redacted>)"


def parse_basic(header: str) -> Credentials | None:
    """Parse "Basic base64(agent:token)", splitting on the first ':' only. None if malformed."""
    if len(header) > MAX_HEADER_LENGTH:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    agent, sep, token = decoded.partition(":")
    if not sep or not token or not _AGENT_ID.match(agent):
        return None
    return Credentials(agent, token)


def _token_ok(agent: CompiledAgent | None, token: str) -> bool:
    digest = hashlib.sha256(token.encode("utf-8")).digest()
    if agent is None:
        hmac.compare_digest(digest, _DUMMY_DIGEST)
        return False
    ok = False
    for expected in agent.token_hashes:
        ok |= hmac.compare_digest(digest, expected)
    return ok


def identify(rules: RuleSet, proxy_authorization: str | None, client_ip: str | None) -> AgentIdentity | AuthFailure:
    """Identify the caller. Returns an Identity or the reason none could be established."""
    ip: IPAddress | None = parse_ip(client_ip) if client_ip else None
    if proxy_authorization:
        creds = parse_basic(proxy_authorization)
        if creds is None:
            return AuthFailure.MALFORMED
        agent = rules.agents.get(creds.agent)
        if agent is not None and not agent.token_hashes:
            agent = None  # source-only and anonymous agents cannot be claimed with a token
        if not _token_ok(agent, creds.token):
            return AuthFailure.BAD_TOKEN if agent is not None else AuthFailure.UNKNOWN_AGENT
        assert agent is not None
        if not agent.source_ok(ip):
            return AuthFailure.WRONG_SOURCE
        return AgentIdentity(agent.id, IdentityMethod.TOKEN)
    if ip is not None and rules.source_agents:
        matches = rules.source_agents.lookup(ip)
        if len(matches) == 1:
            return AgentIdentity(matches[0].id, IdentityMethod.SOURCE)
    if rules.anonymous is not None and rules.anonymous.source_ok(ip):
        return AgentIdentity(rules.anonymous.id, IdentityMethod.ANONYMOUS)
    return AuthFailure.MISSING
