"""Kernel-side relay for tunnels Warden has decided to pass through (issue 17).

Once a tunnel is decided (passthrough: the bytes are TLS Warden does not read), copying them
through Python costs a read into a bytes object, a write out of it and an event-loop wake-up
per chunk in each direction. `SpliceRelay` moves them inside the kernel instead:
`os.splice(socket -> pipe)` then `os.splice(pipe -> socket)`, one pipe per direction, driven
by the asyncio loop's readiness callbacks, so Python only sees "n bytes moved".

How it works, per direction (src -> dst):
* src readable: splice up to `chunk` bytes from src into the pipe (non-blocking), then flush.
* flush: splice what is in the pipe into dst. If dst cannot take it all, stop reading src
  (backpressure: the pipe holds at most what was read) and wait for dst to be writable.
* src EOF: once the pipe is empty, `shutdown(dst, SHUT_WR)` (half-close, as TCP relays must),
  and the direction is finished. Both finished, or an error on either socket: the relay ends.

Byte counts are exact: `bytes_up` / `bytes_down` count bytes delivered to the other side
(what a tunnel_close audit record reports). `close()` stops the relay at once (no callback
runs after it returns, so the counts are final) and shuts both sockets down;
`close(abort=True)` makes their last close a reset instead (`reset_on_close`): this is how a
tunnel is revoked (rule reload, `control`), so that what is still queued is dropped. The sockets stay owned by the caller, which
closes them. `on_activity`, if given, is called after every splice that delivered bytes
(Warden feeds mitmproxy's inactivity watchdog with it: runtime/splicing.py).

Linux only (`os.splice`, Python 3.10+); `available()` says whether it can be used, and a
caller falls back to its ordinary relay when it is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import sys
from collections.abc import Callable

CHUNK = 1 << 16  # a default pipe holds 64 KiB
_LINGER_RESET = struct.pack("ii", 1, 0)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


def reset_on_close(sock: object) -> None:
    """Make the last close of `sock`'s socket a reset (SO_LINGER on, 0 s) that drops what the
    kernel still queues for the peer. Without it a close, however "aborted", sends every queued
    byte (megabytes on loopback) and then a clean FIN (red team 21: a revoked tunnel went on
    delivering the agent's 4 MB upload to the revoked destination, and a cut download ended in a
    clean EOF). Works on a duplicate descriptor too: the option is the socket's. Quietly does
    nothing for a socket wrapper without setsockopt (uvloop's) or a socket already gone."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return
    with contextlib.suppress(OSError, ValueError):
        setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def available() -> bool:
    return sys.platform == "linux" and hasattr(os, "splice")


class _Direction:
    def __init__(self, relay: SpliceRelay, src: socket.socket, dst: socket.socket) -> None:
        self.relay, self.src, self.dst = relay, src, dst
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.in_pipe = 0
        self.moved = 0
        self.eof = False
        self.read_error: OSError | None = None  # src failed (a reset) while the pipe still held bytes
        self.finished = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading:
            self.relay.loop.add_reader(self.src.fileno(), self.on_readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.relay.loop.remove_reader(self.src.fileno())
            self.reading = False

    def on_readable(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.pipe_w, CHUNK, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            if not self.in_pipe:
                self.relay.fail(e)
                return
            # what src sent before it failed (a reset after a complete answer) still goes to dst
            # first: the pipe is flushed, then the relay fails (red team 23)
            self.read_error, self.eof, n = e, True, 0
            self._read_off()
        if n == 0:
            self.eof = True
            self._read_off()
        self.in_pipe += n
        self.flush()

    def flush(self) -> None:
        before = self.moved
        while self.in_pipe:
            try:
                m = os.splice(self.pipe_r, self.dst.fileno(), self.in_pipe, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self.relay.fail(e)
                return
            self.in_pipe -= m
            self.moved += m
        if self.moved != before and self.relay.on_activity is not None:
            self.relay.on_activity()
        if self.in_pipe:
            self._read_off()  # backpressure: read no more until dst took what we hold
            if not self.writing:
                self.relay.loop.add_writer(self.dst.fileno(), self.flush)
                self.writing = True
            return
        if self.writing:
            self.relay.loop.remove_writer(self.dst.fileno())
            self.writing = False
        if self.eof:
            if self.read_error is not None:
                self.relay.fail(self.read_error)
                return
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            self.finished = True
            self.relay.direction_finished()
        else:
            self._read_on()

    def stop(self) -> None:
        """Idempotent: a pipe fd closed twice could close a descriptor reused meanwhile."""
        self._read_off()
        if self.writing:
            self.relay.loop.remove_writer(self.dst.fileno())
            self.writing = False
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pipe_r = self.pipe_w = -1


class SpliceRelay:
    """Relay two connected sockets (client, server) in the kernel until both sides are done.

    `await relay.run()` returns (bytes_up, bytes_down): client->server, server->client.
    """

    def __init__(self, client: socket.socket, server: socket.socket,
                 on_activity: Callable[[], None] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.on_activity = on_activity
        for s in (client, server):
            s.setblocking(False)
        self.error: OSError | None = None
        self._done: asyncio.Future[None] = self.loop.create_future()
        self._up = _Direction(self, client, server)
        try:
            self._down = _Direction(self, server, client)
        except OSError:  # out of descriptors (EMFILE): leave nothing open
            self._up.stop()
            raise
        self._sockets = (client, server)
        self._aborted = False

    @property
    def bytes_up(self) -> int:
        return self._up.moved

    @property
    def bytes_down(self) -> int:
        return self._down.moved

    async def run(self) -> tuple[int, int]:
        self._up.start()
        self._down.start()
        try:
            await self._done
        finally:
            self._stop()
        return self.bytes_up, self.bytes_down

    def direction_finished(self) -> None:
        if self._up.finished and self._down.finished and not self._done.done():
            self._done.set_result(None)

    def fail(self, error: OSError) -> None:
        self.error = error
        self._stop()  # nothing more moves: the counts are what was delivered before the error
        if not self._done.done():
            self._done.set_result(None)

    def close(self, abort: bool = False) -> None:
        """Stop relaying now (counts final on return). Then shut both sockets down (a relay that
        ended), or, `abort` (a revocation, a timeout), make their last close a reset so nothing
        queued reaches either peer. Once aborted, a later close changes nothing."""
        self._stop()
        if abort:
            self._aborted = True
            for s in self._sockets:
                reset_on_close(s)
        elif not self._aborted:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        if not self._done.done():
            self._done.set_result(None)

    def _stop(self) -> None:
        self._up.stop()
        self._down.stop()
