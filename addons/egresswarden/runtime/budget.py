"""Per-agent shares of what request bodies cost Warden: memory held at once (BufferBudget)
and decoding work per second (DecodeMeter).

A request body planned BUFFER is read whole before any stage decides it (up to
`body_scan.max_buffered_bytes`, or `max_mcp_body_bytes` for an MCP endpoint). Each body is
bounded, but their number is not: one agent could open many connections, or one HTTP/2
connection with a hundred streams, send every body but its last byte and hold
hundreds of MiB of Warden's memory, which every other agent shares. The budget bounds the
sum per agent (`body_scan.max_buffered_bytes_per_agent`): a request whose declared length
would take its agent past it is refused (429 `buffer_limit`) before a byte of its body is
read. One request is always admitted when the agent holds nothing, so a limit below a single
allowed body never locks an agent out.

A reservation is released when its flow ends (response or error), and, as a backstop for a
flow that ends without either hook, when its FlowRecord is garbage collected. Counts are
per process (each `--workers` process has its own), and survive reloads: a reload changes
the limit new requests are checked against, not what is held.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable


class Reservation:
    """Bytes one flow holds; release() is idempotent and thread-safe (the GC backstop may
    run on any thread)."""

    __slots__ = ("__weakref__", "_budget", "agent", "nbytes", "released")

    def __init__(self, budget: BufferBudget, agent: str, nbytes: int) -> None:
        self._budget = budget
        self.agent = agent
        self.nbytes = nbytes
        self.released = False

    def release(self) -> None:
        self._budget._release(self)


class BufferBudget:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}

    def held(self, agent: str) -> int:
        with self._lock:
            return self._held.get(agent, 0)

    def snapshot(self) -> dict[str, int]:
        """Bytes held now, by agent (agents holding nothing are absent)."""
        with self._lock:
            return dict(self._held)

    def reserve(self, agent: str, nbytes: int, limit: int, owner: object) -> Reservation | None:
        """Reserve `nbytes` for `agent`, or None if that would exceed `limit` (unless the agent
        holds nothing). The reservation is released when `owner` is garbage collected, if it
        was not released before."""
        with self._lock:
            held = self._held.get(agent, 0)
            if held and held + nbytes > limit:
                return None
            self._held[agent] = held + nbytes
        reservation = Reservation(self, agent, nbytes)
        weakref.finalize(owner, reservation.release)
        return reservation

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation.released:
                return
            reservation.released = True
            left = self._held.get(reservation.agent, 0) - reservation.nbytes
            if left > 0:
                self._held[reservation.agent] = left
            else:
                self._held.pop(reservation.agent, None)


class DecodeMeter:
    """Decoded bytes per agent per second, as a token bucket.

    A compressed body to a host whose bodies are scanned is decoded (up to 16x
    `max_buffered_bytes`) and scanned on the event loop: 16 KB of gzip bought ~0.2 s of CPU, and
    one agent sending 200 of them made another agent's 5-byte request wait 45 s. Each agent may
    decode `rate` bytes per second on average, `burst` at once; while its bucket is empty its
    compressed bodies are refused (429 `scan_limit`) before they are decoded. Uncompressed
    bodies cost no decoding and are not metered. Per process; the event loop is the only caller."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # agent -> (tokens, when)

    def _tokens(self, agent: str, rate: float, burst: float) -> float:
        tokens, when = self._buckets.get(agent, (burst, self._clock()))
        now = self._clock()
        return min(burst, tokens + (now - when) * rate)

    def admit(self, agent: str, rate: float, burst: float) -> bool:
        """May the agent decode one more body now? (Its bucket is not empty.)"""
        tokens = self._tokens(agent, rate, burst)
        self._buckets[agent] = (tokens, self._clock())
        return tokens > 0

    def charge(self, agent: str, nbytes: int, rate: float, burst: float) -> None:
        """The agent decoded `nbytes` (the bucket may go below zero: the next bodies wait)."""
        self._buckets[agent] = (self._tokens(agent, rate, burst) - nbytes, self._clock())
