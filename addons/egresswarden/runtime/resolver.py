"""Asynchronous name resolution for the SSRF guard: hosts file first, then DNS.

Resolution runs on the event loop's executor (`loop.getaddrinfo`), bounded by
`settings.resolve_timeout_seconds`, so a slow resolver delays only the flow that needs it.
"""

from __future__ import annotations

import asyncio
import socket

from egresswarden.core.hostnames import IPAddress, parse_ip
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
