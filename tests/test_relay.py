"""runtime/relay.SpliceRelay on real loopback sockets: exact bytes both ways, half-close,
backpressure and revocation (issue 17)."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from egresswarden.runtime import relay

pytestmark = pytest.mark.skipif(not relay.available(), reason="os.splice needs Linux")


async def pair() -> tuple[socket.socket, socket.socket]:
    """(the relay's end, the peer's end) of one loopback TCP connection."""
    loop = asyncio.get_running_loop()
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    peer = socket.socket()
    peer.setblocking(False)
    connecting = loop.sock_connect(peer, srv.getsockname())
    (mine, _), _ = await asyncio.gather(loop.sock_accept(srv), connecting)
    srv.close()
    return mine, peer


async def read_all(sock: socket.socket) -> bytes:
    loop, out = asyncio.get_running_loop(), bytearray()
    while data := await loop.sock_recv(sock, 1 << 16):
        out += data
    return bytes(out)


async def send_and_eof(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


def test_exact_bytes_both_ways_and_half_close() -> None:
    up_data, down_data = os.urandom(3_000_001), os.urandom(777_777)

    async def main() -> None:
        (c_mine, client), (s_mine, server) = await pair(), await pair()
        r = relay.SpliceRelay(c_mine, s_mine)
        task = asyncio.create_task(r.run())
        # client finishes sending first (half-close) and must still get the whole answer
        _, at_server, _, at_client = await asyncio.wait_for(asyncio.gather(
            send_and_eof(client, up_data), read_all(server), send_and_eof(server, down_data), read_all(client)), 30)
        assert at_server == up_data and at_client == down_data
        assert await asyncio.wait_for(task, 10) == (len(up_data), len(down_data))
        assert (r.bytes_up, r.bytes_down, r.error) == (len(up_data), len(down_data), None)
        for s in (c_mine, s_mine, client, server):
            s.close()

    asyncio.run(main())


def test_backpressure_holds_at_most_a_pipe_and_then_delivers_everything() -> None:
    data = os.urandom(8 << 20)

    async def main() -> None:
        (c_mine, client), (s_mine, server) = await pair(), await pair()
        r = relay.SpliceRelay(c_mine, s_mine)
        task = asyncio.create_task(r.run())
        sending = asyncio.create_task(send_and_eof(client, data))
        await asyncio.sleep(0.3)  # the server reads nothing yet: every buffer fills up
        stalled = r.bytes_up
        assert stalled < len(data), "a reader that does not read must stall the relay"
        got = await asyncio.wait_for(read_all(server), 30)
        await sending
        server.shutdown(socket.SHUT_WR)
        assert got == data and await asyncio.wait_for(task, 10) == (len(data), 0)
        for s in (c_mine, s_mine, client, server):
            s.close()

    asyncio.run(main())


def test_close_revokes_a_live_tunnel() -> None:
    async def main() -> None:
        (c_mine, client), (s_mine, server) = await pair(), await pair()
        r = relay.SpliceRelay(c_mine, s_mine)
        task = asyncio.create_task(r.run())
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"hello")
        assert await asyncio.wait_for(loop.sock_recv(server, 5), 10) == b"hello"
        r.close()  # e.g. the rule allowing it was removed by a reload
        assert await asyncio.wait_for(task, 10) == (5, 0)
        # both peers see the tunnel end
        assert await asyncio.wait_for(read_all(client), 10) == b""
        assert await asyncio.wait_for(read_all(server), 10) == b""
        for s in (c_mine, s_mine, client, server):
            s.close()

    asyncio.run(main())
