"""Asynchronous name resolution for the SSRF guard: hosts file first, then DNS.

Resolution runs on the event loop's executor (`loop.getaddrinfo`), bounded by
`settings.resolve_timeout_seconds`, so a slow resolver delays only the flow that needs it.
"""

from __future__ import annotations

import asyncio
import socket

from egresswarden.core.hostnames import IPAddress, parse_ip
from egresswarden.core.plan import Governed, governed_destinations
from egresswarden.core.ruleset import RuleSet


class ResolveError(Exception):
    """The name could not be resolved; the text is safe to show to the agent."""


async def resolve(rules: RuleSet, host: str, port: int) -> list[IPAddress]:
    """All addresses for `host` (a normalised name or IP literal), deduplicated, in order."""
    literal = parse_ip(host)
    if literal is not None:
        return [literal]
    pinned = rules.hosts_file.get(host)
    if pinned:
        return list(pinned)
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
            timeout=rules.settings.resolve_timeout_seconds,
        )
    except TimeoutError:
        raise ResolveError(f"resolving {host} timed out") from None
    except OSError as e:
        raise ResolveError(f"{host} does not resolve ({e.strerror or e.__class__.__name__})") from None
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = parse_ip(str(sockaddr[0]).split("%", 1)[0])
        if ip is not None and ip not in out:
            out.append(ip)
    if not out:
        raise ResolveError(f"{host} resolved to no usable address")
    return out


# -- addresses that belong to governed destinations ---------------------------------------
GOVERNED_TTL_SECONDS = 60.0


class GovernedAddresses:
    """The addresses of declared MCP servers and exact-host credential destinations.

    A connection whose checked upstream address is one of these, reached by an IP literal or
    another name, would otherwise reach an MCP server (or a credential host) without its
    governance. Policy therefore intercepts every such connection and governs requests to
    the MCP endpoint path as that server's MCP traffic (catalog, arguments, audit); the
    leak guard sees everything sent to a credential host's address. (Refusing instead would
    break every other site sharing the address, as on CDNs.) Names are resolved like any
    other (hosts file, then DNS), once per rule-set version and then every
    GOVERNED_TTL_SECONDS; a name that does not resolve governs nothing (nothing to reach).
    """

    def __init__(self) -> None:
        self._version: str | None = None
        self._expires = 0.0
        self._owners: dict[tuple[IPAddress, int], Governed] = {}
        self._lock = asyncio.Lock()

    async def owners(self, rules: RuleSet) -> dict[tuple[IPAddress, int], Governed]:
        loop = asyncio.get_running_loop()
        if self._version == rules.version and loop.time() < self._expires:
            return self._owners
        async with self._lock:
            if self._version == rules.version and loop.time() < self._expires:
                return self._owners
            owners: dict[tuple[IPAddress, int], Governed] = {}
            for (host, port), governed in governed_destinations(rules).items():
                try:
                    for ip in await resolve(rules, host, port):
                        owners.setdefault((ip, port), governed)
                except ResolveError:
                    continue
            self._owners, self._version = owners, rules.version
            self._expires = loop.time() + GOVERNED_TTL_SECONDS
            return owners
