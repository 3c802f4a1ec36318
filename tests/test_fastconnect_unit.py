"""The fast CONNECT listener's pure part: the strict head parser (the ClientHello checks it shares
with Interception: tests/test_client_hello.py).

End to end (two real `warden run`s compared answer by answer): tests/test_fastconnect_e2e.py.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from egresswarden.runtime import fastconnect
from egresswarden.runtime.fastconnect import ConnectHead, parse_connect_head

AUTH = b"Proxy-Authorization: Basic Y29kZXI6dG9r\r\n"


def test_a_strict_connect_head_is_read() -> None:
    assert parse_connect_head(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n" + AUTH) == \
        ConnectHead("allowed.test", 443, b"HTTP/1.1", "Basic Y29kZXI6dG9r")
    assert parse_connect_head(b"CONNECT [::1]:8443 HTTP/1.0\r\n") == ConnectHead("::1", 8443, b"HTTP/1.0", None)
    assert parse_connect_head(b"CONNECT a.test:1 HTTP/1.1\r\nproxy-authorization:\tBasic x \r\n").authorization \
        == "Basic x"  # type: ignore[union-attr]


@pytest.mark.parametrize("head", [
    b"CONNECT allowed.test:443 HTTP/1.1\r\n" + AUTH + AUTH,  # two credentials: which one counts?
    b"CONNECT allowed.test:443 HTTP/1.1\r\nContent-Length: 5\r\n" + AUTH,  # a body on a CONNECT
    b"CONNECT allowed.test:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nUpgrade: h2c\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nExpect: 100-continue\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: 1\r\n 2\r\n",  # obs-fold
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: a\rb\r\n",  # a lone CR
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: \xff\r\n",  # 8-bit
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: a\x00\r\n",  # NUL
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX A: 1\r\n",  # not a token
    b"CONNECT allowed.test:0 HTTP/1.1\r\n",
    b"CONNECT allowed.test:65536 HTTP/1.1\r\n",
    b"CONNECT allowed.test HTTP/1.1\r\n",  # no port
    b"CONNECT allowed.test:443 HTTP/2.0\r\n",
    b"CONNECT  allowed.test:443 HTTP/1.1\r\n",
    b"connect allowed.test:443 HTTP/1.1\r\n",
    b"CONNECT user@allowed.test:443 HTTP/1.1\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: 1",  # unterminated header line
])
def test_anything_else_is_left_to_mitmproxy(head: bytes) -> None:
    assert parse_connect_head(head) is None


def test_a_closed_transport_whose_peer_stopped_reading_is_aborted_after_its_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Red team 19: asyncio's close() keeps a socket until its write buffer drained, for ever
    when the peer never reads again (an upstream that sent its FIN and stopped reading kept
    its socket in CLOSE-WAIT past tcp_timeout). Real sockets: the peer here never reads."""
    monkeypatch.setattr(fastconnect, "CLOSE_GRACE_SECONDS", 0.2)

    async def run() -> bool:
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        lost = asyncio.Event()

        class Side(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(Side, ours)
        transport.write(b"x" * (4 * 1024 * 1024))  # far more than the socket buffers hold
        assert transport.get_write_buffer_size() > 0
        fastconnect._close(transport, abort=False)
        try:
            await asyncio.wait_for(lost.wait(), 5)
            return True
        finally:
            peer.close()
    assert asyncio.run(run())


def test_a_closed_transport_whose_peer_reads_slowly_gets_every_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """Red team 20: an abort after a fixed grace cut the tail of a slow download behind a clean
    FIN. While the peer reads on, however slowly, nothing is cut; it gets every byte and the
    end of the stream."""
    monkeypatch.setattr(fastconnect, "CLOSE_GRACE_SECONDS", 0.2)

    async def run() -> int:
        ours, peer = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        payload = b"y" * (512 * 1024)
        transport.write(payload)
        fastconnect._close(transport, abort=False)
        peer.setblocking(False)
        got = bytearray()
        deadline = loop.time() + 30
        while loop.time() < deadline:  # about 16 KiB per 0.1 s: each 0.2 s check sees progress
            await asyncio.sleep(0.1)
            try:
                chunk = peer.recv(16384)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
        peer.close()
        return len(got)
    assert asyncio.run(run()) == 512 * 1024
