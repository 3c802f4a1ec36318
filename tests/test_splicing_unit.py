"""runtime/splicing.why_not: which passthrough tunnels may leave mitmproxy's relay for the kernel.

A real mitmproxy layer stack and real asyncio streams over real loopback sockets; each case
changes one thing a kernel relay could not honour and must fall back (CountingTCPLayer)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from egresswarden.runtime import relay, splicing
from mitmproxy import options
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import context, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.layers.http import HTTPMode, HttpStream
from mitmproxy.proxy.layers.http._http1 import Http1Server
from mitmproxy.proxy.layers.http._http2 import Http2Server
from mitmproxy.proxy.server import ConnectionIO, TimeoutWatchdog
from mitmproxy.test import tflow

pytestmark = pytest.mark.skipif(not relay.available(), reason="os.splice needs Linux")


@dataclass
class FakeHandler:
    """The parts of mitmproxy's ConnectionHandler that splicing reads."""

    transports: dict[Any, ConnectionIO]
    timeout_watchdog: TimeoutWatchdog
    _server_event_lock: asyncio.Lock


async def stream_pair() -> tuple[ConnectionIO, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    reader, writer = await asyncio.open_connection(sock=accepted)
    return ConnectionIO(reader=reader, writer=writer), peer


def stack() -> tuple[context.Context, layers.HttpLayer]:
    opts = options.Options()
    client, server = tflow.tclient_conn(), tflow.tserver_conn()
    client.alpn = None
    server.state = ConnectionState.OPEN
    ctxt = context.Context(client, opts)
    ctxt.server = server
    modes.HttpProxy(ctxt)
    http = layers.HttpLayer(ctxt, HTTPMode.regular)
    http.connections[client] = Http1Server(ctxt.fork())
    HttpStream(ctxt, 1)
    layers.TCPLayer(ctxt, ignore=True)  # the passthrough layer itself, last
    return ctxt, http


def tls_client(ctxt: context.Context, http: layers.HttpLayer) -> None:
    ctxt.client.tls = True


def tls_server(ctxt: context.Context, http: layers.HttpLayer) -> None:
    ctxt.server.tls = True


def upstream_proxy(ctxt: context.Context, http: layers.HttpLayer) -> None:
    ctxt.server.state = ConnectionState.CLOSED  # mitmproxy sets `via` before it connects
    ctxt.server.via = ("http", ("127.0.0.1", 3128))
    ctxt.server.state = ConnectionState.OPEN


def http2_client(ctxt: context.Context, http: layers.HttpLayer) -> None:
    # not constructed: its __init__ reads HTTP/2 options this bare Options() lacks
    http.connections[ctxt.client] = Http2Server.__new__(Http2Server)


def buffered_client_bytes(ctxt: context.Context, http: layers.HttpLayer) -> None:
    server = http.connections[ctxt.client]
    assert isinstance(server, Http1Server)
    server.buf += b"\x16\x03\x01"  # bytes mitmproxy still holds: a relay from the socket would skip them


def socks_mode(ctxt: context.Context, http: layers.HttpLayer) -> None:
    ctxt.layers[0] = modes.Socks5Proxy(ctxt.fork())


def udp(ctxt: context.Context, http: layers.HttpLayer) -> None:
    ctxt.server.transport_protocol = "udp"


def unchanged(ctxt: context.Context, http: layers.HttpLayer) -> None:
    pass


@pytest.mark.parametrize(("change", "reason"), [
    pytest.param(unchanged, None, id="plain HTTP/1 CONNECT over TCP: spliced"),
    pytest.param(tls_client, "terminates TLS", id="TLS to the proxy itself"),
    pytest.param(tls_server, "terminates TLS", id="TLS to the upstream by mitmproxy"),
    pytest.param(upstream_proxy, "upstream proxy", id="--mode upstream"),
    pytest.param(http2_client, "not a plain HTTP/1 CONNECT", id="HTTP/2 client connection"),
    pytest.param(buffered_client_bytes, "not a plain HTTP/1 CONNECT", id="client bytes buffered in mitmproxy"),
    pytest.param(socks_mode, "unexpected layers", id="a proxy mode Warden does not splice under"),
    pytest.param(udp, "not TCP", id="UDP"),
])
def test_why_not(change: Callable[[context.Context, layers.HttpLayer], None], reason: str | None) -> None:
    async def main() -> None:
        ctxt, http = stack()
        (cio, cpeer), (sio, speer) = await stream_pair(), await stream_pair()
        handler = FakeHandler({ctxt.client: cio, ctxt.server: sio}, TimeoutWatchdog(600, asyncio.sleep),
                              asyncio.Lock())
        change(ctxt, http)
        got = splicing.why_not(ctxt, handler)
        assert got is None if reason is None else (got is not None and reason in got), got
        for io in (cio, sio):
            assert isinstance(io.writer, asyncio.StreamWriter)
            io.writer.close()
            await io.writer.wait_closed()
        cpeer.close()
        speer.close()

    asyncio.run(main())


def test_no_handler_and_foreign_streams_fall_back() -> None:
    async def main() -> None:
        ctxt, _ = stack()
        assert splicing.why_not(ctxt, None) == "no mitmproxy connection handler"
        (cio, cpeer) = await stream_pair()
        foreign = ConnectionIO(reader=object(), writer=object())  # type: ignore[arg-type]  # e.g. mitmproxy_rs
        handler = FakeHandler({ctxt.client: cio, ctxt.server: foreign}, TimeoutWatchdog(600, asyncio.sleep),
                              asyncio.Lock())
        assert splicing.why_not(ctxt, handler) == "not a plain stream socket"
        assert isinstance(cio.writer, asyncio.StreamWriter)
        cio.writer.close()
        await cio.writer.wait_closed()
        cpeer.close()

    asyncio.run(main())
