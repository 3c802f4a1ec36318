"""How many client connections one Warden process holds open, and for whom.

Without a bound, one agent in a loop (or a flood of connections that never send a head)
takes every descriptor of the process: accept() then fails for every agent, upstream
connections fail, and the audit log cannot open its next file (fail_closed then refuses
everything). Two bounds, each refused with a reason an agent can read:

* per process, `warden_max_connections` (default from RLIMIT_NOFILE, `default_max_connections`):
  a client connection past it is answered `503` (`X-Warden-Reason: connection_limit`) and
  closed at accept, before any byte is read (metric
  `warden_connections_refused_total{limit="process"}`; audited in one `connections_refused`
  record per second at most, with counts per client address, not one record per connection:
  a flood must not become a flood of audit lines);
* per agent, `settings.limits.max_connections_per_agent` in the rules: an agent's CONNECT or
  first plain-HTTP request on a new connection past it is denied `429 connection_limit`
  (audited like any denial). A connection counts for the first agent identified on it, from
  then until it closes.

An upstream connection beyond the first of a client connection (plain HTTP to several hosts
on one keep-alive connection) counts like a connection, toward both. At the process bound the
oldest connection no agent was identified on, a second old at least, is closed to make room,
so that unauthenticated connections cannot keep identified agents out. Both bounds are per
process, like the body budget: with `--workers N` the whole host holds N times as many.
Everything here runs on the event loop (no locks).
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable

logger = logging.getLogger("warden")

HANDED_OVER_MAX_AGE = 10.0  # seconds a slot handed to mitmproxy's side may wait to be claimed (then released)
PENDING_MIN_AGE = 1.0  # a connection no agent was identified on may be evicted at the process limit after this
DESCRIPTOR_RESERVE = 512  # audit files, listeners, DNS, metrics, MCP pin store, child processes
NOFILE_CAP = 1 << 20  # the soft limit is raised to the hard one, but no further than this
AUDIT_WINDOW = 1.0  # seconds: refusals at accept and evictions are audited in one record per window
MAX_AUDITED_IPS = 64  # client addresses named in one connections_refused record; the rest are "other"
OTHER_IPS = "other"


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit (at most NOFILE_CAP), as Go's runtime
    and nginx's worker_rlimit_nofile do: systemd starts services at 1024, which would cap Warden
    near 350 connections. (before, after); unchanged when it cannot be raised."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard if hard != resource.RLIM_INFINITY else NOFILE_CAP, NOFILE_CAP)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, target


def default_max_connections() -> int:
    """Client connections the descriptor limit can carry: each holds two (client, upstream), a
    quarter of the limit is the kernel relay's (runtime/splicing.descriptor_budget), and
    DESCRIPTOR_RESERVE stays free for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = NOFILE_CAP
    return max(64, (soft * 3 // 4 - DESCRIPTOR_RESERVE) // 2)


class ConnectionCounts:
    """Open client connections per identified agent, and the process bound (both this process)."""

    def __init__(self) -> None:
        self.max_connections = default_max_connections()
        self.per_agent: dict[str, int] = {}
        self.refused_process = 0  # connections closed at accept: the process bound
        self.refused_agent = 0  # CONNECTs / requests denied: the agent's bound
        self.evicted = 0  # connections closed without an identified agent, to make room
        self.extra_upstreams = 0  # upstream connections beyond the first of their client connection
        # client connections open now (fast doors and mitmproxy's), set by FastConnect
        self.open_clients: Callable[[], int] = lambda: 0
        # closes the oldest mitmproxy connection no agent was identified on (stages/connlimits.py)
        self.evict_unidentified: Callable[[], bool] = lambda: False
        # client (ip, port) -> (agent, when): the agent's slot of a connection the fast listener
        # handed to mitmproxy, until mitmproxy's side claims it (stages/connlimits.py)
        self.handed_over: dict[tuple[str, int], tuple[str, float]] = {}
        # client address -> [refused at accept, evicted] since the last connections_refused record
        self.unaudited: dict[str, list[int]] = {}
        self.unaudited_since = 0.0
        # told of the first unaudited closure of a window (stages/connlimits.py schedules the record)
        self.on_unaudited: Callable[[], None] = lambda: None

    def note_closed(self, client_ip: str, evicted: bool) -> None:
        """A connection closed by the process bound (refused at accept, or evicted): counted for
        the next connections_refused record."""
        first = not self.unaudited
        key = client_ip if client_ip in self.unaudited or len(self.unaudited) < MAX_AUDITED_IPS else OTHER_IPS
        self.unaudited.setdefault(key, [0, 0])[1 if evicted else 0] += 1
        if evicted:
            self.evicted += 1
        else:
            self.refused_process += 1
        if first:
            self.unaudited_since = time.monotonic()
            self.on_unaudited()

    def take_unaudited(self) -> tuple[dict[str, list[int]], float]:
        """The closures counted since the last record, and since when; the count starts over."""
        taken, since = self.unaudited, self.unaudited_since
        self.unaudited = {}
        return taken, since

    def admit_agent(self, agent: str, limit: int) -> bool:
        """Count one more connection for `agent`, unless it already holds `limit`."""
        held = self.per_agent.get(agent, 0)
        if held >= limit:
            return False  # the refusing stage counts it (the fast path hands the connection to that stage)
        self.per_agent[agent] = held + 1
        return True

    def hand_over(self, peer: tuple[str, int], agent: str) -> None:
        """The connection keeps its agent's slot while it moves to mitmproxy's side: releasing
        and taking it again let another connection of the agent take it in between, and the
        handed-over tunnel, already answered 200, was then refused (and closed) at its limit."""
        self.handed_over[peer] = (agent, time.monotonic())

    def claim_handed_over(self, peer: tuple[str, int]) -> str | None:
        held = self.handed_over.pop(peer, None)
        return held[0] if held is not None else None

    def expire_handed_over(self, now: float) -> None:
        """Slots nobody claimed (the connection died before mitmproxy saw it) go back."""
        for peer, (agent, since) in list(self.handed_over.items()):
            if now - since > HANDED_OVER_MAX_AGE:
                del self.handed_over[peer]
                self.release_agent(agent)

    def open_connections(self) -> int:
        """What the process limit counts: client connections, and upstream connections beyond
        the first of their client connection (each about two descriptors)."""
        return self.open_clients() + self.extra_upstreams

    def release_agent(self, agent: str) -> None:
        held = self.per_agent.get(agent, 0) - 1
        if held > 0:
            self.per_agent[agent] = held
        else:
            self.per_agent.pop(agent, None)


def process_limit_text(limit: int) -> str:
    return (f"Warden is holding {limit} client connections, its limit (warden_max_connections); this "
            f"connection was closed before it was read. Retry shortly, and reuse connections (keep-alive).")


def process_limit_answer(limit: int) -> bytes:
    """The HTTP/1.1 503 a connection refused at accept gets (nothing of it was read)."""
    body = process_limit_text(limit).encode()
    return (b"HTTP/1.1 503 Refused by Warden: connection_limit\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"X-Warden-Reason: connection_limit\r\nRetry-After: 1\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def agent_limit_text(agent: str, limit: int) -> str:
    return (f"agent '{agent}' already has {limit} connections open through Warden "
            f"(settings.limits.max_connections_per_agent); close idle connections or reuse them "
            f"(keep-alive), then retry")
