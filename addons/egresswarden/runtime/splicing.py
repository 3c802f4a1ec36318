"""Hand a decided passthrough tunnel from mitmproxy's transports to the kernel, and back (issue 17).

Once Interception has decided a tunnel is passed through, its bytes need no Python: this
module moves them with `runtime/relay.SpliceRelay` (os.splice socket -> pipe -> socket)
instead of mitmproxy's TCP layer, which costs an event, a layer traversal and a command per
chunk. mitmproxy still owns both connections: it opened them, it closes them, and its hooks
(server_disconnected, client_disconnected -> the tunnel_close audit record) run as before.

How a tunnel is taken over (`KernelTunnel.run`, a task started by `SplicingTCPLayer` once
the upstream connection is open and the tunnel has carried more than a handshake: 16 chunks
or 64 KiB through mitmproxy's relay; idle and one-shot tunnels never spend the descriptors):

1. Nothing is lost or sent twice. Until the take-over completes, mitmproxy's layer relays
   (and counts) as usual: the first client bytes NextLayer held (the ClientHello) and any
   server bytes already read (a server that speaks first) go through it exactly once.
2. Both asyncio transports stop reading (`pause_reading`). The take-over waits until, for
   both connections, mitmproxy holds no byte in flight: its StreamReader is empty with the
   reader task parked in `read()` (so every byte read has passed through the layers), the
   handler's event lock is free (every command has run), and the write buffer is empty
   (every byte mitmproxy wrote reached the kernel). Only then does a byte move in the
   kernel, so the order of bytes on the wire is kept. If that does not happen within
   `HANDOVER_SECONDS` (a peer not reading), or a connection closes first, the transports
   resume reading and mitmproxy's relay carries the tunnel to its end (correct, slower).
3. The relay gets duplicates of the two socket descriptors (the loop refuses to watch a
   descriptor a transport owns; a dup is another descriptor of the same socket) and two
   pipes, and the layer switches to a state that relays nothing. That is six descriptors
   more than mitmproxy's relay needs (EXTRA_FDS): spliced tunnels may hold at most a quarter
   of RLIMIT_NOFILE (`descriptor_budget`), and past it, or when a pipe or dup fails
   (EMFILE), the tunnel is given back to mitmproxy's relay as in step 2, nothing lost.
4. The relay ends (EOF both ways, with half-close in between; a reset; an error), or it is
   stopped (`revoke`: a rule reload cut the tunnel; mitmproxy closed a connection: its
   inactivity timeout, shutdown). Either way the relay's counts are added to the tunnel's
   `bytes_up` / `bytes_down` before mitmproxy runs any hook, the dups are closed, and both
   connections are closed through mitmproxy's handler (`close_connection`), so
   `server_disconnected` and `client_disconnected` run and the tunnel_close record
   carries the exact counts.

Inactivity: mitmproxy's TimeoutWatchdog (`tcp_timeout`, default 600 s) counts layer events,
and a spliced tunnel produces none. The relay calls the watchdog's `register_activity`
after every splice that delivered bytes, so a spliced tunnel times out exactly like one
relayed by mitmproxy: busy is never idle, and one silent both ways for `tcp_timeout` is
closed (the watchdog cancels the client's reader; the layer then stops the relay).

When a tunnel is not taken over (`why_not`): splice unavailable (not Linux), TLS terminated
by mitmproxy on either leg (the transports carry TLS records of mitmproxy's own sessions),
an upstream proxy (`--mode upstream`), a client connection that is not HTTP/1 (an HTTP/2
connection carries other streams) or still has buffered bytes, transports that are not
asyncio TCP/Unix stream sockets (mitmproxy_rs streams: WireGuard, local mode), or mitmproxy
internals this module relies on missing. Those tunnels stay on `CountingTCPLayer`.

Only the event loop thread touches any of this; no exception leaves `run` (a failure
closes both connections, and the tunnel_close record still follows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import weakref
from collections.abc import Callable
from typing import Any

from mitmproxy import connection
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import context, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.proxy.layers.http._http1 import Http1Server

from egresswarden.runtime import relay
from egresswarden.runtime.context import Tunnel

logger = logging.getLogger("warden")

EXTRA_FDS = 6  # per spliced tunnel, beyond mitmproxy's two sockets
HANDOVER_SECONDS = 5.0  # longest wait for mitmproxy's buffers to drain before giving up (peer not reading)
_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)

# client connection -> its kernel relay (being taken over, or relaying); read by sockets.close_client
_ACTIVE: weakref.WeakKeyDictionary[connection.Client, KernelTunnel] = weakref.WeakKeyDictionary()
_TASKS: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
_relaying = 0  # tunnels holding a relay's descriptors now


def descriptor_budget() -> int:
    """How many tunnels may be spliced at once: their extra descriptors (two pipes, two socket
    duplicates: EXTRA_FDS) stay within a quarter of RLIMIT_NOFILE, so the rest is left for
    accepting connections; past it, new tunnels stay on mitmproxy's relay (2 descriptors)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return soft // 4 // EXTRA_FDS


def acquire_relay_slot() -> bool:
    """Reserve one spliced tunnel's descriptors within `descriptor_budget`; False when full."""
    global _relaying
    if _relaying >= descriptor_budget():
        logger.debug("warden: %d tunnels spliced, the descriptor budget; the next is relayed in Python", _relaying)
        return False
    _relaying += 1
    return True


def release_relay_slot() -> None:
    global _relaying
    _relaying -= 1


def revoke(client: connection.Client) -> bool:
    """Stop the kernel relay of `client`'s tunnel now (counts folded into the tunnel). False if none."""
    kernel = _ACTIVE.get(client)
    if kernel is None:
        return False
    kernel.stop("revoked")
    return True


def _stream_socket(io: Any) -> socket.socket | None:
    """The plain TCP/Unix stream socket behind a mitmproxy ConnectionIO, or None."""
    reader, writer = getattr(io, "reader", None), getattr(io, "writer", None)
    if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        return None  # mitmproxy_rs streams (WireGuard, local mode, UDP)
    if not all(hasattr(reader, a) for a in ("_waiter", "_buffer", "_paused")):
        return None  # asyncio's StreamReader changed: the drain check below would be blind
    sock = writer.get_extra_info("socket")
    try:
        if sock is None or sock.type != socket.SOCK_STREAM or sock.family not in _FAMILIES or sock.fileno() < 0:
            return None
    except (AttributeError, OSError):
        return None
    found: socket.socket = sock
    return found


def why_not(ctxt: context.Context, handler: Any) -> str | None:
    """Why this passthrough tunnel must stay on mitmproxy's relay; None when it can be spliced."""
    if not relay.available():
        return "os.splice is not available"
    if handler is None or not hasattr(handler, "_server_event_lock") or not hasattr(handler, "timeout_watchdog"):
        return "no mitmproxy connection handler"
    client, server = ctxt.client, ctxt.server
    if client.transport_protocol != "tcp" or server.transport_protocol != "tcp":
        return "not TCP"
    if client.tls or server.tls:
        return "mitmproxy terminates TLS on the connection"
    if server.via is not None:
        return "an upstream proxy carries the connection"
    below = ctxt.layers[:-1]
    if not all(type(lay) in (modes.HttpProxy, layers.HttpLayer, HttpStream) for lay in below):
        return "unexpected layers: " + ", ".join(type(lay).__name__ for lay in below)
    http = next((lay for lay in below if isinstance(lay, layers.HttpLayer)), None)
    http1 = http.connections.get(client) if http is not None else None
    if not isinstance(http1, Http1Server) or len(http1.buf):
        return "the client connection is not a plain HTTP/1 CONNECT"
    for conn in (client, server):
        if _stream_socket(handler.transports.get(conn)) is None:
            return "not a plain stream socket"
    return None


class KernelTunnel:
    """One passthrough tunnel moved to the kernel: take-over, relay, and the close through mitmproxy."""

    def __init__(self, handler: Any, ctxt: context.Context, tunnel: Tunnel,
                 on_spliced: Callable[[], None]) -> None:
        self.handler = handler
        self.client, self.server = ctxt.client, ctxt.server
        self.tunnel = tunnel
        self.on_spliced = on_spliced
        self.relay: relay.SpliceRelay | None = None
        self.sockets: list[socket.socket] = []
        self.stopped: str | None = None  # why the relay was stopped from outside
        self.folded = False
        self.finished = False

    def start(self) -> None:
        _ACTIVE[self.client] = self
        task = asyncio.get_running_loop().create_task(self.run())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    # -- take-over ----------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            # The layer starts this task from inside mitmproxy's event processing (eager task
            # factory: it runs at once); the commands of that event (the ClientHello's SendData)
            # have not run yet. Let them.
            await asyncio.sleep(0)
            if not await self._take_over():
                self._give_back()
                return
            kernel = self._make_relay()
            if kernel is None:
                self._give_back()
                return
            self.relay = kernel
            self.on_spliced()
            logger.debug("warden: passthrough tunnel to %s:%s relayed in the kernel", self.tunnel.host,
                         self.tunnel.port)
            await kernel.run()
            if kernel.error is not None:
                logger.info("warden: passthrough tunnel to %s:%s ended with %s", self.tunnel.host,
                            self.tunnel.port, kernel.error.__class__.__name__)
        except Exception as e:  # never let the relay crash the proxy: close the tunnel instead
            logger.error("warden: kernel relay failed with %s; closing the tunnel", e.__class__.__name__)
            logger.debug("warden: kernel relay failure", exc_info=True)
            self.stop("error")
        finally:
            self._finish()

    def _make_relay(self) -> relay.SpliceRelay | None:
        """The relay on duplicates of both sockets; None (nothing held) when the budget or the
        process's descriptors are exhausted: mitmproxy's relay needs none of them."""
        client, server = self._sock(self.client), self._sock(self.server)  # may raise: before the slot
        if not acquire_relay_slot():
            return None
        made = splice_sockets(client, server, self.handler.timeout_watchdog.register_activity)
        if made is None:
            release_relay_slot()
            return None
        kernel, self.sockets = made
        return kernel

    def _sock(self, conn: connection.Connection) -> socket.socket:
        sock = _stream_socket(self.handler.transports.get(conn))
        if sock is None:
            raise RuntimeError("the connection's socket went away")
        return sock

    def _ios(self) -> list[Any] | None:
        ios = [self.handler.transports.get(conn) for conn in (self.client, self.server)]
        if any(io is None or io.writer is None or io.writer.transport.is_closing() for io in ios):
            return None
        return ios

    async def _take_over(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOVER_SECONDS
        pause = 0.0
        while True:
            if self.stopped is not None:
                return False
            if any(conn.state is not ConnectionState.OPEN for conn in (self.client, self.server)):
                return False  # a half-close or close is under way: mitmproxy finishes what it started
            ios = self._ios()
            if ios is None:
                return False
            for io in ios:
                # Again on every pass: StreamReader.read() resumes a transport it paused itself.
                io.writer.transport.pause_reading()
            if not self.handler._server_event_lock.locked() and all(_drained(io) for io in ios):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = 0.001  # the transports are paused meanwhile: notice the drain soon

    def _give_back(self) -> None:
        """Take-over abandoned: mitmproxy's layer relays the tunnel, as if never asked."""
        _ACTIVE.pop(self.client, None)
        if self.stopped is not None:
            return  # being closed anyway
        logger.debug("warden: passthrough tunnel to %s:%s stays on mitmproxy's relay", self.tunnel.host,
                     self.tunnel.port)
        for conn in (self.client, self.server):
            io = self.handler.transports.get(conn)
            if io is None or io.writer is None or io.writer.transport.is_closing():
                continue
            if not io.reader._paused:  # paused by the StreamReader itself: it resumes when read
                io.writer.transport.resume_reading()

    # -- the end ---------------------------------------------------------------------------------
    def stop(self, why: str) -> None:
        """Stop relaying at once and fold the counts; `run` then closes both connections."""
        if self.stopped is None:
            self.stopped = why
        if self.relay is not None:
            self.relay.close(abort=True)  # what is queued for either peer is dropped, not delivered
        self._fold()

    def _fold(self) -> None:
        if self.folded or self.relay is None:
            return
        self.folded = True
        self.tunnel.bytes_up += self.relay.bytes_up
        self.tunnel.bytes_down += self.relay.bytes_down

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if _ACTIVE.get(self.client) is self:
            del _ACTIVE[self.client]
        if self.relay is None:
            if self.stopped is not None:
                self._close_connections()
            return
        self.relay.close()  # idempotent: the relay has stopped; SHUT_RDWR is harmless after EOF both ways
        self._fold()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()  # our duplicates only: mitmproxy closes its own descriptors
        release_relay_slot()
        self._close_connections()

    def _close_connections(self) -> None:
        for conn in (self.server, self.client):
            if conn in self.handler.transports and conn.state is not ConnectionState.CLOSED:
                with contextlib.suppress(Exception):
                    self.handler.close_connection(conn)


def splice_sockets(client: Any, server: Any,
                   on_activity: Callable[[], None]) -> tuple[relay.SpliceRelay, list[socket.socket]] | None:
    """A SpliceRelay on duplicates of two sockets (socket.socket or asyncio's TransportSocket) an asyncio transport owns (the loop refuses to
    watch a descriptor a transport owns; a dup is another descriptor of the same socket), and the
    duplicates, which the caller closes when the relay ends. None (nothing held) when the
    process is out of descriptors."""
    socks: list[socket.socket] = []
    try:
        for sock in (client, server):
            socks.append(socket.socket(fileno=os.dup(sock.fileno())))
        return relay.SpliceRelay(socks[0], socks[1], on_activity=on_activity), socks
    except OSError as e:
        for sock in socks:
            sock.close()
        logger.warning("warden: no kernel relay for a passthrough tunnel (%s); it is relayed in Python",
                       e.__class__.__name__)
        return None


def _drained(io: Any) -> bool:
    """mitmproxy holds no byte of this connection: nothing buffered to read, nothing left to write."""
    reader, transport = io.reader, io.writer.transport
    return (reader._waiter is not None and not reader._buffer and not transport.is_reading()
            and transport.get_write_buffer_size() == 0)
