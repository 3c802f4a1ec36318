"""Interception stage: Warden, not mitmproxy's defaults, chooses every protocol layer of a tunnel.

mitmproxy's NextLayer picks a layer from the first bytes it sees, and falls back to a raw
TCP relay when they are too few (`G`, then the rest) or do not look like HTTP after TLS
without ALPN: a relay nobody decided, that skips every per-request rule. So for every
`next_layer` inside a CONNECT tunnel Warden sets the layer itself, and only to one of:

    passthrough   the policy allowed the tunnel without interception: `SplicingTCPLayer`
                  (raw bytes, counted for the `tunnel_close` record), which hands the tunnel
                  to a kernel relay (runtime/splicing.py) once the upstream is open, or
                  `CountingTCPLayer` (mitmproxy's relay) with `warden_splice` off or where
                  splice cannot be used. A TLS ClientHello whose SNI differs from the CONNECT
                  host turns this into interception (fronting: the agent then gets a
                  readable 403 `sni_mismatch`).
    intercept     TLS with the client and the upstream (`ServerTLSLayer` + `ClientTLSLayer`),
                  then HTTP (`HttpLayer`) once the client's ALPN or its first request line
                  says HTTP/1 or HTTP/2.
    explain       a refused CONNECT accepted to explain itself: TLS with the client only (no
                  upstream connection exists), then HTTP; Policy answers every request 403.
    cleartext     an intercepted tunnel whose client speaks plain HTTP instead of TLS: HTTP,
                  but Policy refuses every request (`cleartext_in_tunnel`); nothing is sent.
    refused       anything else (bytes that are neither TLS nor HTTP, a server that speaks
                  first into an intercepted tunnel, an HTTP/2 preface without ALPN, a third
                  layer decision in one tunnel): the connection is closed and the refusal
                  audited (`tunnel_refused`, reason `not_http`).

Outside tunnels, only the client connection's first layer (the explicit proxy's HTTP layer)
is left to mitmproxy; any later decision there (e.g. a 101 to a protocol mitmproxy would
relay raw) is refused. `rawtcp` is switched off, so mitmproxy never upgrades a connection to
a raw relay on its own after an HTTP 101 either.

Never auto-passthrough after a client TLS failure: that lets an agent escape inspection by
failing once on purpose.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from mitmproxy import connection, ctx, exceptions
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import commands, context, events, layer, layers
from mitmproxy.proxy.layers import modes, tcp
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.tls import HTTP_ALPNS

from egresswarden.core.decision import Reason
from egresswarden.runtime import relay, splicing
from egresswarden.runtime.body_buffers import H2_QUEUE_LIMIT
from egresswarden.runtime.context import Connections, ConnState, Tunnel, TunnelMode
from egresswarden.runtime.sockets import connection_handler
from egresswarden.stages.client_hello import (
    MAX_HELLO_RECORDS,
    FirstBytes,
    HandshakeCut,
    RetryGuard,
    classify_first_bytes,
    starts_like_tls,
    too_many_tls_records,
)

logger = logging.getLogger("warden")

NOT_RAW = "bytes that are not a TLS ClientHello, in a tunnel whose rule carries TLS only (raw_tcp: true allows them)"

MAX_UNDECIDED_BYTES = 64 * 1024
# A passthrough tunnel moves to the kernel relay after this much through mitmproxy's (SplicingTCPLayer).
SPLICE_AFTER_CHUNKS = 16
SPLICE_AFTER_BYTES = 64 * 1024  # a ClientHello or first request line larger than this is refused
_REQUEST_LINE = re.compile(rb"[A-Z][A-Z0-9_-]{0,19} \S+ HTTP/1\.[01]\r?\n")


class CountingTCPLayer(tcp.TCPLayer):
    """mitmproxy's raw TCP relay (ignore mode: no flows, no hooks), counting bytes; for a
    tunnel that began with a ClientHello, through a RetryGuard until the server's first
    handshake message has been seen (a second ClientHello after a HelloRetryRequest is
    checked like the first)."""

    def __init__(self, context: context.Context, tunnel: Tunnel, guard: RetryGuard | None = None) -> None:
        super().__init__(context, ignore=True)
        self.tunnel = tunnel
        self.guard = guard
        self.deferred_close: events.ConnectionClosed | None = None  # the client's FIN, behind held bytes

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        # A plain function returning mitmproxy's generator, not a generator itself: one
        # generator frame per relayed chunk instead of two (measurable at 20k requests/s).
        if isinstance(event, events.DataReceived):
            if event.connection is self.context.client:
                self.tunnel.bytes_up += len(event.data)
            else:
                self.tunnel.bytes_down += len(event.data)
        elif self.guard is None and isinstance(event, events.ConnectionClosed):
            return self._closed(event)
        if self.guard is not None:
            return self._guarded(self.guard, event)
        relayed: layer.CommandGenerator[None] = super().relay_messages(event)  # mitmproxy's @expect is untyped
        return relayed

    def _closed(self, event: events.ConnectionClosed) -> layer.CommandGenerator[None]:
        """The client's FIN half-closes the upstream, and the upstream's answer still reaches the
        client. mitmproxy's relay asks for that half-close, but its HTTP layer, which carries
        every CONNECT tunnel, turns it into a full close ("always full close for now", in
        HttpStream.passthrough): a client that sends its request and then shuts down its
        sending side (`nc -N`, a one-shot request) got nothing back. Done here as mitmproxy's
        own ConnectionHandler.close_connection(half_close=True) does it, without that layer.
        Only this direction: the upstream of a passed-through tunnel is plain TCP to Warden,
        while the client may speak TLS to the proxy itself, whose close_notify mitmproxy's TLS
        layer must write (a server's FIN still closes the whole tunnel, as in mitmproxy)."""
        server = self.context.server
        if event.connection is self.context.client and server.state & ConnectionState.CAN_READ and not server.tls:
            handler = connection_handler(self.context.client)
            if handler is not None and server in handler.transports:
                handler.close_connection(server, half_close=True)
                return
        relayed: layer.CommandGenerator[None] = super().relay_messages(event)
        yield from relayed

    def _guarded(self, guard: RetryGuard, event: events.Event) -> layer.CommandGenerator[None]:
        relay = super().relay_messages
        client = self.context.client
        try:
            if isinstance(event, events.DataReceived) and event.connection is client:
                forward = guard.from_client(event.data)
                if forward:
                    yield from relay(events.DataReceived(client, forward))
            elif isinstance(event, events.DataReceived):
                released = guard.from_server(event.data)  # read first: a cut relays none of it
                yield from relay(event)
                if released:
                    yield from relay(events.DataReceived(client, released))
            elif isinstance(event, events.ConnectionClosed) and event.connection is client:
                if guard.holding:
                    self.deferred_close = event  # forwarded once the guard lets the held bytes go
                else:
                    yield from self._closed(event)  # nothing held back: the server learns at once
            else:
                yield from relay(event)
        except HandshakeCut as cut:
            logger.warning("warden: closing a passthrough tunnel to %s:%s: %s", self.tunnel.host, self.tunnel.port, cut)
            self.tunnel.close_error = f"closed by warden: {cut}"
            self.guard = None
            self._handle_event = self.done
            for conn in (self.context.server, client):
                if conn.state is not ConnectionState.CLOSED:
                    yield commands.CloseConnection(conn)
            return
        if guard.done:
            self.guard = None
            self.tunnel.tls_checked = guard.server_hello_seen  # red team 16: not under raw_tcp junk
            if self.deferred_close is not None:
                yield from self._closed(self.deferred_close)


class SplicingTCPLayer(CountingTCPLayer):
    """CountingTCPLayer until the tunnel has carried a little, then it moves to a kernel relay.

    Only tunnels that carry more than a handshake and a request or two are handed over
    (`SPLICE_AFTER_CHUNKS` chunks or `SPLICE_AFTER_BYTES` bytes through mitmproxy's relay):
    a spliced tunnel holds six more descriptors (two pipes, two socket duplicates), which an
    idle or one-shot tunnel would hold for nothing, and a one-shot tunnel gains nothing from
    the relay (measured: README, "Performance"). The take-over (runtime/splicing.KernelTunnel)
    runs in its own task; until it completes, this layer relays and counts as
    CountingTCPLayer does, so every byte already read (the ClientHello NextLayer replays, a
    server greeting) passes exactly once. Once the kernel relays, the layer relays nothing: a
    ConnectionClosed means mitmproxy closed a connection (inactivity timeout, revocation,
    shutdown, or the relay's own end): stop the relay and close both."""

    def __init__(self, context: context.Context, tunnel: Tunnel, guard: RetryGuard | None = None) -> None:
        super().__init__(context, tunnel, guard)
        self.kernel: splicing.KernelTunnel | None = None
        self.chunks = 0

    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        started: layer.CommandGenerator[None] = super().start(event)  # opens the upstream if needed
        yield from started
        ctxt = self.context
        if not (ctxt.server.connected and ctxt.client.connected):
            return  # the upstream failed: mitmproxy's TCPLayer closed the client
        why = splicing.why_not(ctxt, connection_handler(ctxt.client))
        if why is not None:
            logger.debug("warden: passthrough tunnel on mitmproxy's relay: %s", why)
            self._handle_event = super().relay_messages  # type: ignore[method-assign]  # no counting of chunks

    _handle_event = start

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived) and self.guard is None:  # not during the handshake check
            self.chunks += 1
            carried = self.tunnel.bytes_up + self.tunnel.bytes_down + len(event.data)
            if self.chunks >= SPLICE_AFTER_CHUNKS or carried >= SPLICE_AFTER_BYTES:
                self._hand_over()  # this chunk still goes through mitmproxy, before any spliced byte
        return super().relay_messages(event)

    def _hand_over(self) -> None:
        self._handle_event = super().relay_messages  # type: ignore[method-assign]  # once: no more counting
        handler = connection_handler(self.context.client)
        why = splicing.why_not(self.context, handler)
        if why is not None:
            logger.debug("warden: passthrough tunnel on mitmproxy's relay: %s", why)
            return
        self.kernel = splicing.KernelTunnel(handler, self.context, self.tunnel, self._spliced_now)
        self.kernel.start()

    def _spliced_now(self) -> None:
        self._handle_event = self.spliced  # type: ignore[method-assign]

    def spliced(self, event: events.Event) -> layer.CommandGenerator[None]:
        assert self.kernel is not None
        if isinstance(event, events.DataReceived):  # cannot happen (transports paused): fail closed
            logger.error("warden: bytes reached mitmproxy from a tunnel relayed in the kernel; closing it")
        self.kernel.stop("closed by mitmproxy")
        self._handle_event = self.done  # type: ignore[method-assign]
        for conn in (self.context.server, self.context.client):
            if conn.state is not ConnectionState.CLOSED:
                yield commands.CloseConnection(conn)


class RefusedLayer(layer.Layer):
    """Closes the client connection (and any upstream one) without relaying a byte."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            if self.context.server.connected:
                yield commands.CloseConnection(self.context.server)
            yield commands.CloseConnection(self.context.client)


class Interception:
    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self.active_tunnels = 0
        self.splice = relay.available()

    def load(self, loader: Any) -> None:  # mitmproxy's Loader
        loader.add_option(
            "warden_splice", bool, True,
            "Relay passed-through tunnels in the kernel (os.splice, Linux) instead of through mitmproxy's TCP "
            "layer. Off: every passthrough tunnel uses mitmproxy's relay.")
        loader.add_option(
            "warden_h2_max_queued", int, H2_QUEUE_LIMIT,
            "Bytes one HTTP/2 connection may queue for a peer that grants no flow-control window; past it the "
            "stream is reset (runtime/body_buffers.py). 0: no bound (mitmproxy's behaviour).")

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "warden_splice" in updated:
            self.splice = bool(opts.warden_splice) and relay.available()
        # mitmproxy's raw-TCP fallbacks (NextLayer's "probably not HTTP", HTTP 101 to an unknown
        # protocol) would relay bytes no stage decided. Checked on every configure, not only when
        # "rawtcp" is in `updated`: mitmdump configures only the options the command line set, so
        # the default (on) would never be seen.
        if opts.rawtcp:
            opts.update(rawtcp=False)
        if "ssl_insecure" in updated and opts.ssl_insecure:
            raise exceptions.OptionsError(
                "warden: ssl_insecure would send injected credentials to upstreams whose certificates are not "
                "verified; trust an internal CA with ssl_verify_upstream_trusted_ca instead")
        if "stream_large_bodies" in updated and getattr(opts, "stream_large_bodies", None):
            raise exceptions.OptionsError(
                "warden: stream_large_bodies would stream bodies past Warden's body plan (unscanned); Warden "
                "streams large bodies itself (settings.body_scan.max_buffered_bytes)")

    def running(self) -> None:
        """Under plain `mitmdump -s`, mitmproxy's own NextLayer addon runs after this stage in
        the same hook: when Warden leaves a decision open (waiting for a whole ClientHello or
        request line), it would decide at once from the few bytes there are. Restrict it to the
        explicit proxy's first layer, as `warden run` does with runtime.master.FirstLayerOnly."""
        addon = ctx.master.addons.get("nextlayer")
        if addon is None or getattr(addon, "first_layer_only", False):
            return
        original = addon.next_layer

        def first_layer_only(nextlayer: layer.NextLayer) -> None:
            if is_first_layer(nextlayer.context):
                original(nextlayer)
        addon.next_layer = first_layer_only
        addon.first_layer_only = True

    # -- the layer decision ------------------------------------------------------------------
    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        ctxt = nextlayer.context
        state = self.connections.peek(ctxt.client)
        tunnel = state.tunnel if state is not None else None
        if tunnel is None:
            if is_first_layer(ctxt):
                data = nextlayer.data_client()
                if starts_like_tls(data) and too_many_tls_records(data):  # TLS to the proxy itself
                    self._refuse(nextlayer, self.connections.get(ctxt.client), None,  # audited by Outcomes
                                 f"a ClientHello in more than {MAX_HELLO_RECORDS} TLS records")
                return  # the explicit proxy's own first layer: mitmproxy's HTTP proxy setup
            self._refuse(nextlayer, state, None, "a protocol switch outside a tunnel")
            return
        if tunnel.closed:
            # the client left while this decision waited (client_disconnected ran first, red team
            # 18): a tunnel started now would never be counted down nor get its tunnel_close
            nextlayer.layer = RefusedLayer(ctxt)
        elif ctxt.client.tls_established:
            self._after_tls(nextlayer, state, tunnel)
        elif tunnel.mode is TunnelMode.UNDECIDED:
            self._first_bytes(nextlayer, state, tunnel)
        else:
            self._refuse(nextlayer, state, tunnel, "a second protocol decision in one tunnel")

    def _first_bytes(self, nextlayer: layer.NextLayer, state: ConnState | None, tunnel: Tunnel) -> None:
        data = nextlayer.data_client()
        if not data:
            if nextlayer.data_server():
                if tunnel.decision.allowed and not tunnel.intercept and tunnel.raw_tcp:
                    self._passthrough(nextlayer, tunnel)  # server speaks first (SSH, SMTP...): allowed raw
                elif tunnel.decision.allowed and not tunnel.intercept:
                    self._refuse(nextlayer, state, tunnel, NOT_RAW)
                else:
                    self._refuse(nextlayer, state, tunnel, "the server spoke first into an intercepted tunnel")
            return  # wait for the client
        verdict = classify_first_bytes(data, tunnel.host)
        if verdict.kind is FirstBytes.REFUSE:
            self._refuse(nextlayer, state, tunnel, verdict.why)
            return
        if verdict.kind is FirstBytes.WAIT:
            self._wait(nextlayer, state, tunnel, data)
            return
        if verdict.kind is not FirstBytes.NOT_TLS:  # a whole ClientHello
            if verdict.kind is FirstBytes.OTHER_NAME and tunnel.decision.allowed:
                tunnel.sni_mismatch = verdict.sni
                tunnel.intercept = True
            if not (nextlayer.context.client.state & ConnectionState.CAN_READ) and (
                    tunnel.intercept or not tunnel.decision.allowed):
                # the client sent its FIN after its hello: a handshake with Warden cannot finish,
                # and mitmproxy's TLS layer, started now, crashed on the close (red team 19)
                self._refuse(nextlayer, state, tunnel, "the client closed its side before its TLS handshake ended")
                return
            if not tunnel.decision.allowed:
                tunnel.mode = TunnelMode.EXPLAIN
                nextlayer.layer = layers.ClientTLSLayer(nextlayer.context)  # no upstream: nothing to contact
            elif tunnel.intercept:
                tunnel.mode = TunnelMode.INTERCEPT
                server_tls = layers.ServerTLSLayer(nextlayer.context)
                server_tls.child_layer = layers.ClientTLSLayer(nextlayer.context)
                nextlayer.layer = server_tls
            else:
                self._passthrough(nextlayer, tunnel, tls=True)
            return
        if tunnel.decision.allowed and not tunnel.intercept:
            if not tunnel.raw_tcp:
                self._refuse(nextlayer, state, tunnel, NOT_RAW)
                return
            self._passthrough(nextlayer, tunnel)  # allowed raw (raw_tcp: true): nothing to decide per request
            return
        # Intercepted or explained tunnel, no TLS: only a whole HTTP/1 request line is acceptable.
        if _REQUEST_LINE.match(data):
            tunnel.mode = TunnelMode.EXPLAIN if not tunnel.decision.allowed else TunnelMode.CLEARTEXT
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)
        elif b"\n" in data or not _could_become_request_line(data):
            self._refuse(nextlayer, state, tunnel, "bytes that are neither TLS nor HTTP")
        else:
            self._wait(nextlayer, state, tunnel, data)

    def _after_tls(self, nextlayer: layer.NextLayer, state: ConnState | None, tunnel: Tunnel) -> None:
        if tunnel.mode not in (TunnelMode.INTERCEPT, TunnelMode.EXPLAIN) or _has_http_layer(nextlayer.context):
            self._refuse(nextlayer, state, tunnel, "an unexpected protocol decision after TLS")
            return
        alpn = nextlayer.context.client.alpn
        if alpn:
            if alpn in HTTP_ALPNS:
                nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)
            else:
                self._refuse(nextlayer, state, tunnel, f"TLS with ALPN {alpn[:20]!r}, which is not HTTP")
            return
        data = nextlayer.data_client()
        if not data:
            if nextlayer.data_server():
                self._refuse(nextlayer, state, tunnel, "the server spoke first after TLS")
            return
        if _REQUEST_LINE.match(data):
            nextlayer.layer = layers.HttpLayer(nextlayer.context, HTTPMode.transparent)
        elif b"\n" in data or not _could_become_request_line(data):
            self._refuse(nextlayer, state, tunnel, "bytes after TLS that are not an HTTP/1 request "
                                                   "(HTTP/2 needs ALPN h2)")
        else:
            self._wait(nextlayer, state, tunnel, data)

    def _wait(self, nextlayer: layer.NextLayer, state: ConnState | None, tunnel: Tunnel, data: bytes) -> None:
        """Leave the decision open until more bytes arrive (NextLayer asks again), within bounds."""
        if len(data) > MAX_UNDECIDED_BYTES:
            self._refuse(nextlayer, state, tunnel, f"{len(data)} bytes without a decidable start")

    def _passthrough(self, nextlayer: layer.NextLayer, tunnel: Tunnel, tls: bool = False) -> None:
        tunnel.mode = TunnelMode.PASSTHROUGH
        tunnel.started = time.monotonic()
        self.active_tunnels += 1
        kind = SplicingTCPLayer if self.splice else CountingTCPLayer
        guard = RetryGuard(tunnel.host, strict=not tunnel.raw_tcp) if tls else None
        nextlayer.layer = kind(nextlayer.context, tunnel, guard)

    def _refuse(self, nextlayer: layer.NextLayer, state: ConnState | None, tunnel: Tunnel | None, what: str) -> None:
        if tunnel is not None:
            tunnel.mode = TunnelMode.REFUSED
        logger.info("warden: closing a connection: %s", what)
        nextlayer.layer = RefusedLayer(nextlayer.context)
        if state is not None:  # Outcomes (later in the chain, same hook) audits it
            state.refusal = (Reason.NOT_HTTP, f"connection closed: {what}; Warden carries only HTTP it decided")

    def client_disconnected(self, client: connection.Client) -> None:
        state = self.connections.peek(client)
        if state is None or state.tunnel is None or state.tunnel.closed:
            return
        state.tunnel.closed = True  # Outcomes (later in the chain, same hook) audits passthrough tunnels
        if state.tunnel.passthrough:
            self.active_tunnels -= 1


_VERSION_PREFIX = re.compile(rb"(H(T(T(P(/(1(\.([01]\r?)?)?)?)?)?)?)?)?")
_METHOD = re.compile(rb"[A-Z][A-Z0-9_-]{0,19}")




def _could_become_request_line(data: bytes) -> bool:
    """Could more bytes turn `data` (no newline yet) into an HTTP/1 request line?"""
    parts = data.split(b" ", 2)
    if not (_METHOD.fullmatch(parts[0]) or (len(parts) == 1 and _METHOD.fullmatch(parts[0] or b"X"))):
        return False
    if len(parts) < 3:
        return len(parts) == 1 or b"\r" not in parts[1]
    return parts[1] != b"" and _VERSION_PREFIX.fullmatch(parts[2]) is not None


def is_first_layer(ctxt: context.Context) -> bool:
    """The explicit proxy's own first layer decision (the only one mitmproxy may make)."""
    return len(ctxt.layers) == 1 and isinstance(ctxt.layers[0], (modes.HttpProxy, modes.HttpUpstreamProxy))


def _has_http_layer(ctxt: context.Context) -> bool:
    """Is there already an HTTP layer above this connection's TLS layer (a nested decision)?"""
    tls_at = max((i for i, lay in enumerate(ctxt.layers) if isinstance(lay, layers.ClientTLSLayer)), default=-1)
    return any(isinstance(lay, layers.HttpLayer) for lay in ctxt.layers[tls_at + 1:])
