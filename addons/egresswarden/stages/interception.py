"""Interception addon: for each allowed tunnel, pass it through or terminate TLS.

Decided in `next_layer`, the first time the client speaks inside the tunnel:

* The client's TLS ClientHello is read (without consuming it) and its SNI compared with the
  CONNECT host. A different SNI is domain fronting: the tunnel is intercepted so the agent
  gets a readable 403 (`sni_mismatch`) on its first request, and the upstream TLS session
  uses the CONNECT host as SNI (set by `upstream.UpstreamGuard`), never the client's.
* A tunnel whose decision does not need interception is relayed as raw bytes by
  `CountingTCPLayer`: no TLS termination, no per-message hooks, just a byte count for the
  `tunnel_close` audit record when the client goes away.
* Everything else is left to mitmproxy's own NextLayer (TLS interception with Warden's CA).

Never auto-passthrough after a client TLS failure: that lets an agent escape inspection by
failing once on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmproxy import connection
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers import tcp
from mitmproxy.proxy.layers.tls import parse_client_hello

from egresswarden.core.hostnames import HostError, normalize_host
from egresswarden.runtime.context import Connections, Tunnel
from egresswarden.runtime.failsafe import fail_closed

TunnelListener = Callable[[Tunnel, str, int], None]  # (tunnel, client ip, client port)


class CountingTCPLayer(tcp.TCPLayer):
    """mitmproxy's raw TCP relay (ignore mode: no flows, no hooks), counting bytes."""

    def __init__(self, context, tunnel: Tunnel) -> None:  # noqa: ANN001 - mitmproxy Context
        super().__init__(context, ignore=True)
        self.tunnel = tunnel

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        # A plain function returning mitmproxy's generator, not a generator itself: one
        # generator frame per relayed chunk instead of two (measurable at 20k requests/s).
        if isinstance(event, events.DataReceived):
            if event.connection is self.context.client:
                self.tunnel.bytes_up += len(event.data)
            else:
                self.tunnel.bytes_down += len(event.data)
        return super().relay_messages(event)


class Interception:
    def __init__(self, connections: Connections) -> None:
        self.connections = connections
        self.tunnel_listeners: list[TunnelListener] = []
        self.active_tunnels = 0

    @fail_closed
    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if nextlayer.layer is not None:
            return
        state = self.connections.peek(nextlayer.context.client)
        if state is None or state.tunnel is None or state.tunnel.layer_decided:
            return
        tunnel = state.tunnel
        data = nextlayer.data_client()
        if not data:
            if nextlayer.data_server() and not tunnel.intercept:
                self._passthrough(nextlayer, tunnel)  # server speaks first: not TLS, nothing to check
            return
        if starts_like_tls_record(data):
            try:
                hello = parse_client_hello(data)
            except ValueError:
                hello = None
                tunnel.layer_decided = True  # not a valid ClientHello: let mitmproxy's TLS layer fail it
                return
            if hello is None:
                return  # need more bytes
            sni = hello.sni
            if sni is not None:
                try:
                    same = normalize_host(sni) == tunnel.host
                except HostError:
                    same = False
                if not same:
                    tunnel.sni_mismatch = sni
                    tunnel.intercept = True
        tunnel.layer_decided = True
        if not tunnel.intercept:
            self._passthrough(nextlayer, tunnel)

    def _passthrough(self, nextlayer: layer.NextLayer, tunnel: Tunnel) -> None:
        tunnel.layer_decided = True
        tunnel.passthrough = True
        tunnel.started = time.monotonic()
        self.active_tunnels += 1
        nextlayer.layer = CountingTCPLayer(nextlayer.context, tunnel)

    def client_disconnected(self, client: connection.Client) -> None:
        state = self.connections.peek(client)
        if state is None or state.tunnel is None or state.tunnel.closed:
            return
        tunnel = state.tunnel
        tunnel.closed = True
        if tunnel.passthrough:
            self.active_tunnels -= 1
            for listener in self.tunnel_listeners:
                listener(tunnel, state.client_ip, state.client_port)
