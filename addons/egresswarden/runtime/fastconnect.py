"""Fast CONNECT: allowed passthrough tunnels without mitmproxy's per-connection machinery (issue 17).

A new passthrough tunnel through mitmproxy costs ~3 ms of CPU before a byte is relayed
(a connection handler, two stream readers, a layer stack, a timeout watchdog, a dozen
hooks); squid spends ~0.3 ms. Most of Warden's traffic by count is exactly that: `pip
install`, `git clone`, API calls from CI agents, each on its own connection to a host the
rules allow without interception. So Warden's listener (`FrontDoor`, one asyncio Protocol per
client connection) reads the first request head itself and keeps the tunnel only when ALL
of these hold; anything else is handed to mitmproxy untouched:

    * the connection starts with a complete, strictly formed `CONNECT host:port HTTP/1.x`
      head (CRLF line ends, token header names, printable ASCII values, no body framing,
      Upgrade or Expect headers, exactly one Proxy-Authorization): a subset of what
      mitmproxy accepts, so both parsers read such a head the same way;
    * mitmproxy's `block_global` / `block_private` would let the client in;
    * Identity would identify the agent (same function: `stages.identity.identify_client`);
    * the audit gate admits new work (`record.audit.AuditGate.admits`);
    * Policy allows the tunnel without interception, after name resolution, the address
      checks and the governed-address check (same functions: `core.plan.plan_connect`,
      `stages.policy.Policy.check_addresses`);
    * the upstream accepts the connection to the checked address.

Every refusal, interception, explanation, failure and plain-HTTP request therefore takes the
mitmproxy path exactly as before, decided again there from scratch (the few microseconds of
a second decision are paid only off the fast path). Until the `200 Connection established`
is written nothing has been consumed: the hand-over replays the bytes read so far into the
StreamReader mitmproxy's handler reads from, as if it had accepted the connection itself.

After the 200 the client's first bytes are checked as Interception checks them: a TLS
ClientHello whose SNI differs from the CONNECT host, or an invalid one, must be intercepted
(the agent gets the readable 403 `sni_mismatch`). That tunnel is handed over too, with the
CONNECT head replayed and mitmproxy's own 200 (byte-identical) swallowed on the way out; had
mitmproxy answered anything else (the rules changed in between), the connection is closed.
Otherwise the tunnel is committed: the `connect` record is written (same `Outcome`, same
fields as mitmproxy's path), the bytes are relayed by this Protocol and, after 16 chunks or
64 KiB, by the kernel (`runtime/relay.SpliceRelay`, within the same descriptor budget as
runtime/splicing.py); the end writes the `tunnel_close` record with exact byte counts.

Kept as on mitmproxy's path: half-close (better: what the origin sends after the client's FIN
still reaches the client), backpressure both ways, `tcp_timeout` (no byte
either way for that long closes the tunnel; spliced bytes count as activity), revocation on
reload (`Revocation.add_tunnel_source`), `warden_active_tunnels`, `warden_splice`. New here:
a connection that sends no complete first head (any method; for TLS to the proxy itself,
no complete ClientHello) within `warden_head_timeout` seconds (default 60) is closed; through
mitmproxy it held its descriptors for `tcp_timeout` (600 s). A first head still unfinished at
`warden_max_head_bytes` (64 KiB) is answered 431 (runtime/http1_heads.py bounds every later head).
On shutdown every open fast tunnel gets its `tunnel_close` record (error `warden shutting down`).

Off (`--set warden_fast_connect=false`, or `connection_strategy=lazy`, or any mode but
regular): mitmproxy's listener, as before. Only the event loop thread touches any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from enum import Enum, auto
from typing import TYPE_CHECKING, Any, cast

from mitmproxy import ctx, exceptions
from mitmproxy.net.free_port import get_free_port
from mitmproxy.proxy import mode_servers
from mitmproxy.proxy.layers.tls import parse_client_hello

from egresswarden.core.decision import Decision, Interception
from egresswarden.core.facts import RequestFacts
from egresswarden.core.hostnames import normalize_host
from egresswarden.core.identity import AuthFailure
from egresswarden.core.plan import plan_connect, plan_raw_tcp
from egresswarden.record.journal import utc_now
from egresswarden.record.outcome import Outcome, tunnel_close_outcome
from egresswarden.runtime import http1_heads, relay, splicing
from egresswarden.runtime.connlimits import PENDING_MIN_AGE, ConnectionCounts, process_limit_answer
from egresswarden.runtime.context import ConnState, Tunnel, TunnelMode, new_request_id
from egresswarden.runtime.patching import wrap_once
from egresswarden.runtime.workers import reuse_port_enabled
from egresswarden.stages.client_hello import (
    FirstBytes,
    HandshakeCut,
    RetryGuard,
    classify_first_bytes,
    too_many_tls_records,
)
from egresswarden.stages.identity import identify_client

if TYPE_CHECKING:
    from egresswarden.record.audit import AuditGate
    from egresswarden.record.outcome import Outcomes
    from egresswarden.runtime.rulestore import RuleStore
    from egresswarden.stages.interception import Interception as InterceptionStage  # noqa: F401 - typing
    from egresswarden.stages.policy import Policy

logger = logging.getLogger("warden")

MAX_HELD = 64 * 1024  # bytes held while deciding, or while waiting for a whole ClientHello
SPLICE_AFTER_CHUNKS = 16  # as stages/interception.SplicingTCPLayer
SPLICE_AFTER_BYTES = 64 * 1024
HANDOVER_SECONDS = 5.0  # longest wait for our write buffers to drain before splicing (peer not reading)
HEAD_TIMEOUT = 60
STREAM_LIMIT = 2 ** 16  # asyncio.start_server's StreamReader limit, which mitmproxy's listener uses
SHUTDOWN_ERROR = "warden shutting down"
CLOSE_GRACE_SECONDS = 10.0  # a closed transport whose unsent bytes did not shrink for this long is reset
CLOSE_MAX_SECONDS = 600.0  # and one still draining after this long (as tcp_timeout's default)
LINGER_SECONDS = 1.0  # a connection refused at accept is read (and dropped) this long at most
MAX_LINGERING = 256  # beyond this many at once, refused connections are closed at once

_CONNECT = b"CONNECT "
_REQUEST_LINE = re.compile(rb"CONNECT ([A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5}) (HTTP/1\.[01])\r\n")
_HEADER = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?[ \t]*")
_NOT_FOR_A_TUNNEL = frozenset({b"content-length", b"transfer-encoding", b"upgrade", b"expect"})


@dataclass(frozen=True, slots=True)
class ConnectHead:
    host: str  # as sent (brackets removed from an IPv6 literal); Policy normalises it
    port: int
    version: bytes  # b"HTTP/1.1" or b"HTTP/1.0": mitmproxy answers in the client's version
    authorization: str | None


def parse_connect_head(head: bytes) -> ConnectHead | None:
    """A CONNECT head (request line and header lines, each ending CRLF, without the final
    empty line) in the strict form the fast path keeps; None for anything else."""
    line = _REQUEST_LINE.match(head)
    if line is None:
        return None
    port = int(line.group(2))
    if not 0 < port < 65536:
        return None
    authorization: str | None = None
    rest = head[line.end():]
    if rest and not rest.endswith(b"\r\n"):
        return None
    for raw in rest.split(b"\r\n")[:-1] if rest else ():
        if b"\r" in raw or b"\n" in raw:
            return None  # a lone CR or LF: parsers disagree about where the line ends
        header = _HEADER.fullmatch(raw)
        if header is None:
            return None
        name = header.group(1).lower()
        if name in _NOT_FOR_A_TUNNEL:
            return None
        if name == b"proxy-authorization":
            if authorization is not None:
                return None
            authorization = (header.group(2) or b"").decode("ascii")
    host = line.group(1).decode("ascii")
    if host.startswith("["):
        host = host[1:-1]
    return ConnectHead(host, port, line.group(3), authorization)


class Phase(Enum):
    HEAD = auto()  # reading the request head
    DECIDING = auto()  # identity, policy, upstream connection; nothing written to the client yet
    FIRST_BYTES = auto()  # 200 written; waiting for the client's first bytes (the SNI check)
    RELAY = auto()  # committed passthrough, relayed by this Protocol
    SPLICED = auto()  # committed passthrough, relayed by the kernel
    DONE = auto()  # closed, or handed to mitmproxy


class FastConnect:
    """The chain part: options, the open fast tunnels, timeouts, shutdown."""

    def __init__(self, store: RuleStore, gate: AuditGate, policy: Policy, outcomes: Outcomes,
                 interception: InterceptionStage, counts: ConnectionCounts) -> None:
        self.store = store
        self.counts = counts
        counts.open_clients = self.open_connections
        self.gate = gate
        self.policy = policy
        self.outcomes = outcomes
        self.interception = interception
        self.doors: set[FrontDoor] = set()
        self.pending: dict[FrontDoor, None] = {}  # doors still waiting for their first head, oldest first
        self.lingering = 0  # connections refused at accept, answered, not closed yet
        self.tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps weak ones
        self.tcp_timeout = 600.0
        self.head_timeout = float(HEAD_TIMEOUT)
        self.block_global = True
        self.block_private = False
        # metric warden_front_door_connections_total{path}
        self.fast_tunnels = 0  # kept on the fast path
        self.handed_over = 0  # handed to mitmproxy
        self.head_timeouts = 0  # closed: no request head within warden_head_timeout
        self.heads_refused = 0  # answered 431: a first head longer than warden_max_head_bytes
        self.no_head = 0  # the client closed or reset before its first head was complete
        self._sweeper: asyncio.TimerHandle | None = None
        self._admitted: dict[str, bool] = {}

    # -- mitmproxy hooks ---------------------------------------------------------------------
    def load(self, loader: Any) -> None:
        loader.add_option(
            "warden_fast_connect", bool, True,
            "Keep allowed passthrough CONNECT tunnels out of mitmproxy's per-connection machinery "
            "(runtime/fastconnect.py). Off: every connection goes through mitmproxy, as in 0.1.")
        loader.add_option(
            "warden_head_timeout", int, HEAD_TIMEOUT,
            "Seconds a new client connection may take to send its first complete request head; past "
            "it the connection is closed (fast CONNECT listener only).")
        loader.add_option(
            "warden_max_head_bytes", int, http1_heads.MAX_HEAD_BYTES,
            "Longest HTTP/1 request or response head Warden buffers (runtime/http1_heads.py); a longer "
            "request head is answered 431, a longer response head 502.")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        self.tcp_timeout = float(opts.tcp_timeout)
        self.head_timeout = float(opts.warden_head_timeout)
        self.block_global = bool(opts.block_global)
        self.block_private = bool(opts.block_private)
        self._admitted.clear()
        if "warden_max_head_bytes" in updated:
            try:
                http1_heads.set_limit(int(opts.warden_max_head_bytes))
            except ValueError as e:
                raise exceptions.OptionsError(f"warden: {e}") from None

    def active(self) -> bool:
        """Does the listener opened now take the fast path (read when mitmproxy listens)?"""
        opts = ctx.options
        return bool(opts.warden_fast_connect) and opts.connection_strategy == "eager"

    def running(self) -> None:
        self._schedule_sweep()

    def done(self) -> None:
        """Every open fast tunnel gets its record before the audit log closes (this part runs
        before Audit in the chain), then its connections are aborted."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for door in list(self.doors):
            door.end(SHUTDOWN_ERROR)

    # -- shared by the doors -----------------------------------------------------------------
    def evict_pending(self) -> bool:
        """At the process limit: close the connection that has waited longest for its first
        head, if it has waited PENDING_MIN_AGE, else the oldest of mitmproxy's connections that
        no agent was identified on (ConnectionCounts.evict_unidentified), to make room for a
        new one. Connections that never identify (a flood, or an agent dodging its own limit by
        never authenticating) then cannot keep agents out; identified ones are never evicted."""
        for door in self.pending:  # oldest first
            if time.monotonic() - door.opened < PENDING_MIN_AGE:
                break
            self.counts.note_closed(door.state.client_ip if door.state is not None else "", evicted=True)
            door.end(None, abort=True, reset=False)  # nothing was written to it; leaves `pending`
            return True
        return self.counts.evict_unidentified()  # mitmproxy's, after a 407 or a refusal

    def open_connections(self) -> int:
        """Client connections open in this process: fast doors, and mitmproxy's (handed over)."""
        proxyserver = ctx.master.addons.get("proxyserver")
        return len(self.doors) + len(getattr(proxyserver, "connections", ()))

    def admits_client(self, ip: str) -> bool:
        """What mitmproxy's block addon would let in (block_global, block_private); remembered
        per address (cleared when the options change), since agents connect from few."""
        admitted = self._admitted.get(ip)
        if admitted is None:
            if len(self._admitted) >= 4096:
                self._admitted.clear()
            admitted = self._admitted[ip] = self._admits(ip)
        return admitted

    def _admits(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if self.block_private and address.is_private:
            return False
        return not (self.block_global and address.is_global)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def open_tunnels(self) -> Iterator[tuple[Callable[[], bool], ConnState, Tunnel]]:
        """For Revocation: (close it now, state, tunnel) of every tunnel past its 200."""
        for door in list(self.doors):
            if door.tunnel is not None and door.state is not None and door.phase in (
                    Phase.FIRST_BYTES, Phase.RELAY, Phase.SPLICED):
                yield door.revoke, door.state, door.tunnel

    def _schedule_sweep(self) -> None:
        interval = max(0.25, min(5.0, self.tcp_timeout / 4, self.head_timeout / 4))
        with contextlib.suppress(RuntimeError):  # no running loop (shutdown)
            self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        self.counts.expire_handed_over(now)
        for door in list(self.doors):
            if door.phase is Phase.HEAD:
                if now - door.opened > self.head_timeout:
                    door.abort_silently()
            elif door.phase is not Phase.DECIDING and now - door.last_activity > self.tcp_timeout:
                door.end(f"no bytes for {self.tcp_timeout:g} s (tcp_timeout)", abort=True)
        self._schedule_sweep()


class UpstreamSide(asyncio.Protocol):
    """The upstream leg of a fast tunnel; every event goes to its FrontDoor."""

    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # asyncio's, or uvloop's (not a subclass)

    def data_received(self, data: bytes) -> None:
        try:
            self.door.from_server(data)
        except Exception as e:
            self.door.failed(e)

    def eof_received(self) -> bool:
        return self.door.server_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.server_lost(exc)

    def pause_writing(self) -> None:
        self.door.set_reading(self.door.transport, False, "client")

    def resume_writing(self) -> None:
        self.door.set_reading(self.door.transport, True, "client")


class FrontDoor(asyncio.Protocol):
    """One client connection on Warden's listener: a fast tunnel, or handed to mitmproxy."""

    def __init__(self, part: FastConnect, instance: Any) -> None:
        self.part = part
        self.instance = instance  # mitmproxy's RegularInstance: handle_stream(reader, writer)
        self.phase = Phase.HEAD
        self.buf = bytearray()
        self.head_bytes = b""
        self.head: ConnectHead | None = None
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamSide | None = None
        self.state: ConnState | None = None
        self.tunnel: Tunnel | None = None
        self.decision: Decision | None = None
        self.identity_method: str | None = None
        self.opened = self.last_activity = time.monotonic()
        self.request_id = new_request_id()
        self.engine_seconds = 0.0
        self.connect_time: str | None = None  # when the 200 was written (the connect record's time)
        self.connect_duration = 0.0
        self.committed = False
        self.client_eof = self.server_eof_seen = False
        self.held_from_server: list[bytes] = []
        self.chunks = 0
        self.splice_tried = False
        self.guard: RetryGuard | None = None  # a TLS tunnel's second ClientHello, if any, is checked too
        self.counted_agent: str | None = None  # this connection counts toward the agent's connection limit
        self.linger: asyncio.TimerHandle | None = None  # refused at accept: closed when this fires
        self.eof_deferred = False  # the client's FIN waits for bytes the guard holds
        self.kernel: relay.SpliceRelay | None = None
        # transport id -> why its reading is paused ("client"/"server" backpressure, "held", "splice")
        self.paused: dict[int, set[str]] = {}
        self.server_gone = False
        self.task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    # -- client events -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # asyncio's, or uvloop's (not a subclass)
        part = self.part
        peer = transport.get_extra_info("peername") or ("", 0)
        if part.counts.open_connections() >= part.counts.max_connections and not part.evict_pending():
            part.counts.note_closed(str(peer[0]), evicted=False)
            self._refuse_at_accept()
            return
        self.state = ConnState(str(peer[0]), int(peer[1]) if len(peer) > 1 else 0)
        part.doors.add(self)
        part.pending[self] = None

    def _refuse_at_accept(self) -> None:
        """Past warden_max_connections (runtime/connlimits.py): the 503, then a FIN. What the
        client already sent is read and dropped until it closes, for at most LINGER_SECONDS:
        closing with unread bytes would reset the connection and lose the answer. Past
        MAX_LINGERING such connections (a flood), the connection is closed at once."""
        transport, part = self.transport, self.part
        assert transport is not None
        self.phase = Phase.DONE
        transport.write(process_limit_answer(part.counts.max_connections))
        if part.lingering >= MAX_LINGERING:
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the client reset already (ENOTCONN): nothing to linger for
            transport.abort()
            return
        part.lingering += 1
        self.linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.abort)

    def data_received(self, data: bytes) -> None:
        try:
            self._from_client(data)
        except Exception as e:
            self.failed(e)

    def failed(self, error: Exception) -> None:
        """A bug of ours in a transport callback: the connection is cut (never left hanging or open)."""
        logger.error("warden: fast CONNECT tunnel failed with %s; closing it", error.__class__.__name__)
        logger.debug("warden: fast CONNECT failure", exc_info=error)
        self.end("internal error" if self.committed else None, abort=True)

    def _from_client(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        phase = self.phase
        if phase is Phase.RELAY:
            assert self.tunnel is not None
            self.tunnel.bytes_up += len(data)
            self._to_upstream(data)
            self._count_chunk()
        elif phase is Phase.HEAD:
            self.buf += data
            self._read_head()
        elif phase is Phase.DECIDING:
            self.buf += data  # a client that does not wait for the 200 (kept for the hand-over or the tunnel)
            if len(self.buf) > MAX_HELD:
                self.set_reading(self.transport, False, "held")
        elif phase is Phase.FIRST_BYTES:
            self.buf += data
            self._first_bytes()

    def eof_received(self) -> bool:
        self.client_eof = True
        if self.linger is not None:
            return False  # refused at accept: the client read the answer and closed; asyncio closes too
        if self.phase is Phase.HEAD:
            if self.buf:
                self._hand_over(after_200=False)  # mitmproxy answers a partial head as it always did
                return True
            self.part.no_head += 1
            self.end(None)
            return False
        if self.phase in (Phase.FIRST_BYTES, Phase.RELAY):
            self._client_finished()
            return not self.done  # keep the transport half-open while the other direction runs
        return True  # DECIDING: looked at after the 200; SPLICED: the kernel sees the EOF itself

    def _client_finished(self) -> None:
        """The client sent its FIN (now, or before the 200 and seen after it)."""
        if self.phase is Phase.FIRST_BYTES:
            assert self.tunnel is not None
            verdict = classify_first_bytes(bytes(self.buf), self.tunnel.host)
            if verdict.kind is FirstBytes.REFUSE:
                self._hand_over(after_200=True)  # Interception refuses it (and audits why)
                return
            if verdict.kind is FirstBytes.NOT_TLS:
                if not self._raw_allowed():
                    return
                self._commit()  # not TLS, and all the client will send: relay it, then the EOF
                self._relay_held()
            else:
                self.end(None)  # nothing, or an unfinished ClientHello: no tunnel was used
                return
        if self.phase is Phase.RELAY:
            self._forward_eof_up()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
            self.part.lingering -= 1
            return
        if self.phase is Phase.HEAD:
            self.part.no_head += 1
        elif self.phase is Phase.DECIDING:
            self.part.fast_tunnels += 1  # decided here; its connect record says the client left
        if self.phase is not Phase.DONE:
            # a peer's reset ends the other side with a close that first delivers what it was
            # sent (red team 23: dropping it cut a complete download to 31%); resets are for
            # Warden's own cuts. A peer that then stops reading is reset by _close's stall check.
            self.end("client connection reset" if exc is not None and self.committed else None)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.set_reading(self.upstream.transport, False, "server")

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.set_reading(self.upstream.transport, True, "server")

    # -- the head and the decision -----------------------------------------------------------
    def _read_head(self) -> None:
        """Wait for the first request head, whatever it is (so `warden_head_timeout` bounds every
        connection, not only CONNECTs), then keep it (a strict CONNECT) or hand it over."""
        buf, limit = self.buf, http1_heads.limit()
        if buf[:1] == b"\x16":  # TLS to the proxy itself: mitmproxy's, once the ClientHello is whole
            if too_many_tls_records(bytes(buf)) or self._hello_is_whole(bytes(buf)):
                self._hand_over(after_200=False)
            elif len(buf) > limit:
                self._refuse_head()
            return
        ends = [at + 2 for at in (buf.find(b"\n\n"),) if at >= 0] + \
               [at + 3 for at in (buf.find(b"\n\r\n"),) if at >= 0]
        if not ends or min(ends) > limit:
            if len(buf) > limit:  # the head alone is too long; a body after a short head is fine
                self._refuse_head()
            return  # no end of head yet, by either reading of line ends
        end = buf.find(b"\r\n\r\n")
        # The head must end at the same byte for a CRLF-only reader and for mitmproxy (which also
        # ends lines at a bare LF), hold no bare LF, and be a CONNECT; anything else is mitmproxy's.
        if not buf.startswith(_CONNECT) or end < 0 or end + 4 != min(ends) \
                or buf.count(b"\n", 0, end + 4) != buf.count(b"\r\n", 0, end + 4):
            self._hand_over(after_200=False)
            return
        assert self.state is not None
        head = parse_connect_head(bytes(buf[:end + 2]))
        if head is None or not self.part.admits_client(self.state.client_ip):
            self._hand_over(after_200=False)
            return
        self.head, self.head_bytes = head, bytes(buf[:end + 4])
        del self.buf[:end + 4]
        self.phase = Phase.DECIDING
        self.part.pending.pop(self, None)
        self.task = self.part.spawn(self._decide())

    @staticmethod
    def _hello_is_whole(data: bytes) -> bool:
        try:
            return parse_client_hello(data) is not None
        except ValueError:
            return True  # not one: mitmproxy says so

    def _refuse_head(self) -> None:
        """An unfinished first head past `warden_max_head_bytes`: mitmproxy's HTTP/1 reader would buffer it
        without bound (red team 7: 256 MiB of one header block took Warden to 878 MiB)."""
        assert self.transport is not None
        self.part.heads_refused += 1
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
        self.end(None)

    async def _decide(self) -> None:
        try:
            opened = await self._open()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # decided again, from scratch, on mitmproxy's path: it fails closed there
            logger.error("warden: fast CONNECT failed with %s; handing the connection to mitmproxy",
                         e.__class__.__name__)
            logger.debug("warden: fast CONNECT failure", exc_info=True)
            opened = False
        if self.phase is not Phase.DECIDING:
            self._close_upstream(abort=True)
            return
        if not opened:
            self._hand_over(after_200=False)
            return
        assert self.transport is not None and self.head is not None
        self.transport.write(self.head.version + b" 200 Connection established\r\n\r\n")
        self.connect_time = utc_now()
        self.connect_duration = time.monotonic() - self.opened
        self.phase = Phase.FIRST_BYTES
        self.set_reading(self.transport, True, "held")
        if self.server_gone:
            self.end(None)  # the upstream closed while the 200 was on its way
        elif self.buf:
            self._first_bytes()
        elif self.held_from_server:
            # The server spoke first, before the 200 (on uvloop its bytes can arrive before the
            # task resumes from create_connection: red team 17): raw_tcp rules only, as below
            if self._raw_allowed():
                self._commit()
                self._relay_held()
        elif self.server_eof_seen:
            self.end(None)
        if self.client_eof and self.phase is not Phase.DONE:
            self._client_finished()

    async def _open(self) -> bool:
        """Identity, audit gate, policy and the upstream connection, as mitmproxy's path does them;
        False: hand the connection over (nothing written yet)."""
        part, head, state = self.part, self.head, self.state
        assert head is not None and state is not None
        rules = part.store.current
        if rules is None:
            return False
        who, sandbox_id = identify_client(rules, head.authorization, state.client_ip, state.client_port)
        if isinstance(who, AuthFailure) or not part.gate.admits():
            return False
        # counted before anything that may wait (DNS, the upstream connect), not after: a
        # connection waiting for a slow name counted neither here nor as evictable (red team 19)
        if not part.counts.admit_agent(who.agent, rules.settings.max_connections_per_agent):
            return False  # mitmproxy's path answers 429 connection_limit, and audits it
        self.counted_agent = who.agent
        started = time.perf_counter()
        decision = plan_connect(rules, who.agent, head.host, head.port)
        self.engine_seconds = time.perf_counter() - started
        if not decision.allowed or decision.intercept:
            return False
        decision, seconds = await part.policy.check_addresses(
            rules, RequestFacts(who.agent, head.host, head.port, "https"), decision, state)
        self.engine_seconds += seconds
        if not decision.allowed or decision.intercept:
            return False
        host = normalize_host(head.host)
        address = state.pinned.get((host, head.port))
        if address is None or self.phase is not Phase.DECIDING:
            return False
        state.agent, state.identity_method = who.agent, who.method.value
        self.identity_method = who.method.value
        self.tunnel = Tunnel(agent=who.agent, host=host, port=head.port, decision=decision,
                             request_id=self.request_id, address=address, intercept=False, sandbox_id=sandbox_id,
                             raw_tcp=plan_raw_tcp(rules, decision))
        self.decision = decision
        upstream = self.upstream = UpstreamSide(self)
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: upstream, str(address), head.port)
        except OSError:
            self.upstream = None
            self.tunnel = None
            return False  # mitmproxy's path connects again and answers 502 with its record
        # the rules changed while we resolved or connected: decided again, from scratch, by mitmproxy
        return part.store.current is rules

    # -- after the 200: the first bytes --------------------------------------------------------
    def _first_bytes(self) -> None:
        assert self.tunnel is not None
        data = bytes(self.buf)
        verdict = classify_first_bytes(data, self.tunnel.host)
        if verdict.kind is FirstBytes.WAIT:
            if len(data) > MAX_HELD:
                self._hand_over(after_200=True)
            return
        if verdict.kind in (FirstBytes.REFUSE, FirstBytes.OTHER_NAME):
            # Interception reads the same verdict: it refuses the tunnel, or intercepts a
            # fronting hello (a readable 403 sni_mismatch), and audits either
            self._hand_over(after_200=True)
            return
        if verdict.kind is FirstBytes.NAMES_HOST:
            self.guard = RetryGuard(self.tunnel.host, strict=not self.tunnel.raw_tcp)
        elif not self._raw_allowed():  # NOT_TLS
            return
        self._commit()
        self._relay_held()

    def _raw_allowed(self) -> bool:
        """Bytes that are not TLS pass only where the rule says raw_tcp: true; otherwise the
        tunnel goes to mitmproxy's path, which refuses it and audits why."""
        assert self.tunnel is not None
        if self.tunnel.raw_tcp:
            return True
        self._hand_over(after_200=True)
        return False

    def _commit(self) -> None:
        """The tunnel is a passthrough tunnel from here on: the connect record is written."""
        tunnel, state = self.tunnel, self.state
        assert tunnel is not None and state is not None
        self.phase = Phase.RELAY
        self.committed = True
        tunnel.mode = TunnelMode.PASSTHROUGH
        tunnel.started = time.monotonic()
        self.part.interception.active_tunnels += 1
        self.part.fast_tunnels += 1
        self.part.outcomes.emit(self._connect_outcome())

    def _connect_outcome(self) -> Outcome:
        tunnel, state = self.tunnel, self.state
        assert tunnel is not None and state is not None
        return Outcome(
            event="connect", time=self.connect_time or utc_now(), request_id=tunnel.request_id,
            decision=tunnel.decision, agent=tunnel.agent, identity=self.identity_method,
            sandbox_id=tunnel.sandbox_id, client_ip=state.client_ip, client_port=state.client_port,
            method="CONNECT", scheme="https", host=tunnel.host, port=tunnel.port,
            interception=Interception.PASSTHROUGH, status=200, duration_seconds=self.connect_duration,
            engine_seconds=self.engine_seconds, upstream_address=str(tunnel.address) if tunnel.address else None,
        )

    def _relay_held(self) -> None:
        assert self.tunnel is not None and self.upstream is not None and self.upstream.transport is not None
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            self.tunnel.bytes_up += len(data)
            self._to_upstream(data)
            if self.phase is not Phase.RELAY:
                return  # cut by the guard
        held, self.held_from_server = self.held_from_server, []
        for data in held:
            self.from_server(data)
        self.set_reading(self.upstream.transport, True, "held")
        if self.server_eof_seen:
            self.server_eof()  # the server finished while its bytes were held

    # -- server events -----------------------------------------------------------------------
    def from_server(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.phase is Phase.RELAY:
            assert self.tunnel is not None and self.transport is not None
            if self.guard is not None:
                # read before it goes on: a server that is not TLS is cut before its first read
                # reaches the client (red team 20: up to 128 KB of it did)
                self._guarded(self.guard.from_server, data)
                if self.phase is not Phase.RELAY:
                    return
            self.tunnel.bytes_down += len(data)
            self.transport.write(data)
            self._count_chunk()
        elif self.phase is Phase.FIRST_BYTES:
            if not self.buf:
                if not self._raw_allowed():  # the server speaks first (SSH, SMTP): raw_tcp rules only
                    return  # mitmproxy's path connects again, sees the same and refuses it
                self._commit()  # allowed raw, as on mitmproxy's path
                self._relay_held()
                self.from_server(data)
            else:  # half a ClientHello is pending: hold the server until the client's bytes decide
                self._hold_from_server(data)
        elif self.phase is Phase.DECIDING:
            self._hold_from_server(data)  # connected, 200 not yet written

    def _to_upstream(self, data: bytes) -> None:
        if self.guard is not None:
            self._guarded(self.guard.from_client, data)
        else:
            assert self.upstream is not None and self.upstream.transport is not None
            self.upstream.transport.write(data)

    def _guarded(self, step: Callable[[bytes], bytes], data: bytes) -> None:
        """One step of the RetryGuard: forward the client bytes it releases, or cut the tunnel."""
        guard = self.guard
        assert guard is not None and self.upstream is not None and self.upstream.transport is not None
        try:
            forward = step(data)
        except HandshakeCut as cut:
            assert self.tunnel is not None
            logger.warning("warden: closing a passthrough tunnel to %s:%s: %s", self.tunnel.host, self.tunnel.port, cut)
            self.end(f"closed by warden: {cut}", abort=True)
            return
        if forward:
            self.upstream.transport.write(forward)
        if guard.done:
            self.guard = None
            assert self.tunnel is not None
            self.tunnel.tls_checked = guard.server_hello_seen  # red team 16: not under raw_tcp junk
            if self.eof_deferred:
                self._forward_eof_up()

    def _hold_from_server(self, data: bytes) -> None:
        self.held_from_server.append(data)
        assert self.upstream is not None
        self.set_reading(self.upstream.transport, False, "held")

    def server_eof(self) -> bool:
        self.server_eof_seen = True
        if self.phase is Phase.RELAY:
            assert self.transport is not None
            if self.client_eof or self.guard is not None:
                # both sides are done; or the server closed before the answer the retry guard
                # waits for, which can no longer come: its held bytes have nowhere to go, and a
                # client FIN would wait for them for ever (red team 18: the tunnel, and its place
                # in the agent's connection limit, stayed until tcp_timeout)
                self.end(None)
                return False
            if self.transport.can_write_eof():
                self.transport.write_eof()
            return True
        if self.phase is Phase.FIRST_BYTES:
            self.end(None)  # closed before the tunnel was used
            return False
        return True  # DECIDING: looked at after the 200

    def server_lost(self, exc: Exception | None) -> None:
        if self.phase in (Phase.RELAY, Phase.FIRST_BYTES):
            self.end("upstream connection reset" if exc is not None and self.committed else None)  # as client_lost
        elif self.phase is Phase.DECIDING:
            self.server_gone = True

    def _forward_eof_up(self) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        if self.guard is not None and self.guard.holding:
            self.eof_deferred = True  # after the bytes the guard still holds, if it lets them go
            return
        if self.server_eof_seen:
            self.end(None)
        elif self.upstream.transport.can_write_eof():
            self.upstream.transport.write_eof()

    # -- flow control ------------------------------------------------------------------------
    def set_reading(self, transport: asyncio.Transport | None, on: bool, why: str) -> None:
        """Pause or resume reading one transport for one reason; it reads when no reason is left."""
        if transport is None or transport.is_closing():
            return
        reasons = self.paused.setdefault(id(transport), set())
        if on:
            reasons.discard(why)
        else:
            reasons.add(why)
        reading = not reasons
        if reading != transport.is_reading():
            (transport.resume_reading if reading else transport.pause_reading)()

    # -- the kernel relay --------------------------------------------------------------------
    def _count_chunk(self) -> None:
        self.chunks += 1
        if self.splice_tried or self.guard is not None:
            return  # the kernel relay starts only after the handshake check
        assert self.tunnel is not None
        if self.chunks >= SPLICE_AFTER_CHUNKS or self.tunnel.bytes_up + self.tunnel.bytes_down >= SPLICE_AFTER_BYTES:
            self.splice_tried = True
            if (self.part.interception.splice and not (self.client_eof or self.server_eof_seen)
                    and splicing.acquire_relay_slot()):
                self.set_reading(self.transport, False, "splice")
                assert self.upstream is not None
                self.set_reading(self.upstream.transport, False, "splice")
                self.part.spawn(self._splice())

    async def _splice(self) -> None:
        try:
            await self._run_kernel_relay()
        except Exception as e:
            logger.error("warden: kernel relay failed with %s; closing the tunnel", e.__class__.__name__)
            self.end("kernel relay failed", abort=True, reset=False)
        finally:
            splicing.release_relay_slot()  # taken by _count_chunk: given back once, on every path

    async def _run_kernel_relay(self) -> None:
        transports = [self.transport, self.upstream.transport if self.upstream else None]
        deadline = time.monotonic() + HANDOVER_SECONDS
        while any(t is not None and t.get_write_buffer_size() for t in transports):
            if self.phase is not Phase.RELAY or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.001)  # the peer is still reading what we wrote
        socks = [t.get_extra_info("socket") if t is not None and not t.is_closing() else None for t in transports]
        made = None
        client_sock, server_sock = socks
        if self.phase is Phase.RELAY and not any(t.get_write_buffer_size() for t in transports if t) \
                and client_sock is not None and server_sock is not None and not (self.client_eof or self.server_eof_seen):
            made = splicing.splice_sockets(client_sock, server_sock, self._touch)
        if made is None:
            for transport in transports:
                self.set_reading(transport, True, "splice")  # stays on this Protocol's relay
            return
        kernel, dups = made
        self.kernel = kernel
        self.phase = Phase.SPLICED
        try:
            await kernel.run()
        finally:
            self._fold_kernel()
            for sock in dups:
                sock.close()  # our duplicates only: the transports close their own descriptors
        if kernel.error is not None and self.tunnel is not None:
            logger.info("warden: passthrough tunnel to %s:%s ended with %s", self.tunnel.host, self.tunnel.port,
                        kernel.error.__class__.__name__)
        self.end("connection reset" if kernel.error is not None else None)  # a peer's reset: as client_lost

    def _touch(self) -> None:
        self.last_activity = time.monotonic()

    def _fold_kernel(self, abort: bool = False) -> None:
        kernel, self.kernel = self.kernel, None
        if kernel is not None and self.tunnel is not None:
            kernel.close(abort)  # idempotent; the counts are final once it returns
            self.tunnel.bytes_up += kernel.bytes_up
            self.tunnel.bytes_down += kernel.bytes_down

    # -- the end -----------------------------------------------------------------------------
    def revoke(self) -> bool:
        """A reload denied this tunnel: cut it now (Revocation writes `tunnel_revoked`)."""
        if self.phase is Phase.DONE:
            return False
        self.end(None, abort=True, record_soon=True)  # Revocation's tunnel_revoked comes first
        return True

    def abort_silently(self) -> None:
        """No request head in time: nothing was decided, nothing to record; nothing was sent
        either, so a plain close (FIN) is the clearest end for the client."""
        self.part.head_timeouts += 1
        self.end(None, abort=True, reset=False)

    def end(self, error: str | None, abort: bool = False, record_soon: bool = False,
            reset: bool = True) -> None:
        """Close both legs (once) and write what is owed: `tunnel_close` for a committed tunnel,
        the `connect` record for one accepted but never used (now, or right after the caller's).
        `abort`: without waiting for anything to drain, and, unless `reset` is False, with a
        reset, so that what is queued is dropped and no peer takes the cut for an end (`reset`
        means nothing without `abort`)."""
        if self.phase is Phase.DONE:
            return
        was = self.phase
        self._leave_part()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._fold_kernel(abort and reset)
        if self.transport is not None:
            _close(self.transport, abort, reset)
        self._close_upstream(abort, reset)
        if record_soon:
            asyncio.get_running_loop().call_soon(self._records, was, error)
        else:
            self._records(was, error)

    def _records(self, was: Phase, error: str | None) -> None:
        if self.committed:
            assert self.state is not None and self.tunnel is not None
            self.part.interception.active_tunnels -= 1
            self.tunnel.closed = self.tunnel.audited = True
            self.part.outcomes.emit(tunnel_close_outcome(self.state, self.tunnel, error))
        elif was is Phase.FIRST_BYTES:
            # accepted, closed before a byte moved: the connect record only, as on mitmproxy's path
            # (where such a tunnel never left `undecided`, so it has no tunnel_close)
            assert self.tunnel is not None
            self.tunnel.closed = self.tunnel.audited = True
            self.part.fast_tunnels += 1
            self.part.outcomes.emit(self._connect_outcome())
        elif was is Phase.DECIDING and self.head is not None:
            self._unfinished_connect_record(error or "client disconnected before the tunnel opened")

    def _unfinished_connect_record(self, error: str) -> None:
        head, state = self.head, self.state
        assert head is not None and state is not None
        tunnel = self.tunnel
        self.part.outcomes.emit(Outcome(
            event="connect", time=utc_now(), request_id=self.request_id, decision=self.decision,
            agent=state.agent, identity=self.identity_method, sandbox_id=tunnel.sandbox_id if tunnel else None,
            client_ip=state.client_ip, client_port=state.client_port, method="CONNECT", scheme="https",
            host=tunnel.host if tunnel else head.host[:256], port=head.port,
            duration_seconds=time.monotonic() - self.opened, engine_seconds=self.engine_seconds, error=error,
        ))

    def _close_upstream(self, abort: bool, reset: bool = True) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None and not upstream.transport.is_closing():
            _close(upstream.transport, abort, reset)

    # -- to mitmproxy ------------------------------------------------------------------------
    def _leave_part(self, handing_over: bool = False) -> None:
        """The door is done (ended, or handed to mitmproxy): out of every count it was in. A
        handed-over connection keeps its agent's slot for mitmproxy's side to claim."""
        self.phase = Phase.DONE
        self.part.doors.discard(self)
        self.part.pending.pop(self, None)
        if self.counted_agent is not None:
            if handing_over and self.state is not None:
                self.part.counts.hand_over((self.state.client_ip, self.state.client_port), self.counted_agent)
            else:
                self.part.counts.release_agent(self.counted_agent)
            self.counted_agent = None

    def _hand_over(self, after_200: bool) -> None:
        """mitmproxy takes the connection as if it had accepted it and read every byte the client
        sent so far. After our 200, it gets the CONNECT head first and everything after it (the
        ClientHello, more bytes, the FIN) only once it has answered with the same 200, which is
        not sent twice: the order of events mitmproxy sees is the one it would have seen."""
        transport = self.transport
        assert transport is not None
        self._leave_part(handing_over=True)  # mitmproxy's ConnectionLimits claims its slot
        self.part.handed_over += 1
        self._close_upstream(abort=True)
        later, self.buf = bytes(self.buf), bytearray()
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        if self.head is None:  # no complete CONNECT head read: mitmproxy gets it all as it came
            protocol = asyncio.StreamReaderProtocol(reader, self.instance.handle_stream, loop=loop)
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
            if later:
                protocol.data_received(later)
            if self.client_eof:
                protocol.eof_received()
        elif not after_200:
            # The whole head (and what followed) now, a FIN only once mitmproxy has answered:
            # given both at once, mitmproxy drops a CONNECT it is still deciding, unrecorded.
            held = HeldUntilAnswered(transport, b"", self.client_eof)
            held.inner = asyncio.StreamReaderProtocol(reader, _watching_answer(self.instance.handle_stream, held, None),
                                                      loop=loop)
            transport.set_protocol(held)
            held.inner.connection_made(transport)
            held.inner.data_received(self.head_bytes + later)
        else:
            held = HeldUntilAnswered(transport, later, self.client_eof)
            ours = self.head.version + b" 200 Connection established\r\n\r\n"
            held.inner = asyncio.StreamReaderProtocol(reader, _watching_answer(self.instance.handle_stream, held, ours),
                                                      loop=loop)
            transport.set_protocol(held)
            held.inner.connection_made(transport)
            held.inner.data_received(self.head_bytes)
        if not transport.is_closing() and not transport.is_reading():
            transport.resume_reading()


def _close(transport: asyncio.Transport, abort: bool, reset: bool = True) -> None:
    """Close a transport; one whose peer stopped reading is aborted, with a reset.

    asyncio's close() waits until the write buffer drained, for ever if the peer never reads
    again (red team 19: an upstream that sent its FIN and stopped reading kept ten sockets in
    CLOSE-WAIT with 4 MB queued each, counted by no limit, past tcp_timeout). A peer that reads
    on, however slowly, gets every byte (red team 20: aborting after a fixed grace cut the tail
    of a slow download behind a clean FIN): the transport is aborted only when a
    CLOSE_GRACE_SECONDS check finds its buffer no smaller than at the last one, or after
    CLOSE_MAX_SECONDS in all. The abort resets the connection, so that a peer that did not get
    everything cannot take the end for a complete answer.

    `abort` (a revocation, a timeout, an error): at once, and with `reset` the kernel's queue
    is dropped too (relay.reset_on_close); `reset=False` where nothing was written (a head
    timeout, an eviction) or nothing should be dropped (our own relay failed)."""
    if abort:
        if reset:  # abort() alone still sends the kernel's queue, then a FIN
            relay.reset_on_close(transport.get_extra_info("socket"))
        transport.abort()
        return
    transport.close()
    left = transport.get_write_buffer_size()
    if left:
        loop = asyncio.get_running_loop()
        loop.call_later(CLOSE_GRACE_SECONDS, _abort_if_stalled, transport, left, loop.time() + CLOSE_MAX_SECONDS)


def _abort_if_stalled(transport: asyncio.Transport, left: int, deadline: float) -> None:
    now_left = transport.get_write_buffer_size()
    if not now_left:
        return  # drained: asyncio closed it
    loop = asyncio.get_running_loop()
    if now_left < left and loop.time() < deadline:
        loop.call_later(CLOSE_GRACE_SECONDS, _abort_if_stalled, transport, now_left, deadline)
        return
    logger.warning("warden: a closed tunnel's peer stopped reading with %d bytes unsent; resetting it", now_left)
    relay.reset_on_close(transport.get_extra_info("socket"))
    transport.abort()


class HeldUntilAnswered(asyncio.Protocol):
    """Between a handed-over client transport and mitmproxy's StreamReaderProtocol: what the
    client sent after our 200 waits until mitmproxy has answered the replayed CONNECT, as it
    would have waited for mitmproxy's own 200. Bounded: past MAX_HELD the client is not read."""

    def __init__(self, transport: asyncio.Transport, pending: bytes, eof: bool) -> None:
        self.transport = transport
        self.inner: asyncio.StreamReaderProtocol | None = None
        self.pending = bytearray(pending)
        self.eof = eof
        self.released = False

    def release(self) -> None:
        if self.released or self.inner is None:
            return
        self.released = True
        data, self.pending = bytes(self.pending), bytearray()
        if data:
            self.inner.data_received(data)
        if self.eof:
            self.inner.eof_received()
        if not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.released and self.inner is not None:
            self.inner.data_received(data)
            return
        self.pending += data
        if len(self.pending) > MAX_HELD:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.released and self.inner is not None:
            return bool(self.inner.eof_received())
        self.eof = True
        return True  # half-closed: mitmproxy sees the FIN once released

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def _watching_answer(handle: Callable[..., Any], held: HeldUntilAnswered, ours: bytes | None) -> Callable[..., Any]:
    """mitmproxy's handler, releasing what `held` keeps back once mitmproxy answers the CONNECT.
    With `ours` (the 200 the client already has), that answer must be the same 200 and is
    dropped; any other answer closes the connection: the client believes the tunnel open, and
    what mitmproxy decided instead cannot reach it in a readable form."""
    async def handle_after_200(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        original = writer.write
        seen = bytearray()

        def write(data: bytes | bytearray | memoryview) -> None:
            if ours is None:  # the first bytes of mitmproxy's answer: it has decided
                del writer.write
                original(data)
                held.release()
                return
            seen.extend(data)
            if len(seen) < len(ours) and ours.startswith(seen):
                return
            del writer.write  # the instance attribute: StreamWriter.write from now on
            if seen.startswith(ours):
                if len(seen) > len(ours):
                    original(bytes(seen[len(ours):]))
                held.release()
                return
            logger.warning("warden: a tunnel changed its decision while it was handed to mitmproxy; closing it")
            writer.transport.abort()

        writer.write = write  # type: ignore[method-assign]
        await handle(reader, writer)
    return handle_after_200


_PART: FastConnect | None = None


def install(part: FastConnect) -> None:
    """`warden run`'s regular-mode listener: FrontDoor per connection instead of mitmproxy's
    StreamReaderProtocol (which a FrontDoor hands the connection to when it is not fast)."""
    global _PART
    _PART = part
    wrap_once(mode_servers.RegularInstance, "listen", _listen_with_front_door)


def _listen_with_front_door(original: Callable[..., Any]) -> Callable[..., Any]:
    async def listen(self: Any, host: str, port: int) -> list[Any]:
        part = _PART
        if part is None or not part.active() or self.mode.transport_protocol != "tcp":
            result: list[Any] = await original(self, host, port)
            return result
        if port == 0:
            port = get_free_port()  # as mitmproxy: one port for IPv4 and IPv6
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: FrontDoor(part, self), host, port,
                                          reuse_port=True if reuse_port_enabled() else None)
        return [server]
    return listen
