"""HTTP/1 message heads: a bound on the bytes mitmproxy buffers while it waits for one.

mitmproxy 12.3.1's HTTP/1 layer appends every byte to its receive buffer until the head's
empty line arrives (`_http1.py`: "FIXME: protect against header size DoS"): one connection
sending header lines without end held all of them (red team 7: 256 MiB of one head took the
process to 878 MiB). Warden's own listener bounds the first head of a connection
(runtime/fastconnect.py); this bounds every later one (a kept-alive connection, a request
inside an intercepted tunnel) and every response head from an upstream, at the same
`warden_max_head_bytes` (default 64 KiB; nginx allows 32 KiB, Node.js 16 KiB):

  * a request head: the agent gets `431 Request Header Fields Too Large` and the connection
    is closed; there is no request to decide or record yet, as with mitmproxy's own 400 for
    a malformed head;
  * a response head: the stream gets mitmproxy's protocol-error path (the agent gets 502 and
    the request's record carries the error), and the upstream connection is closed.

Idempotent; applied when the chain is built, so `warden run` and `mitmdump -s` both get it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from egresswarden.runtime.patching import wrap_once

logger = logging.getLogger("warden")

MAX_HEAD_BYTES = 64 * 1024  # default of `warden_max_head_bytes`
_limit = MAX_HEAD_BYTES


def set_limit(limit: int) -> None:
    """`warden_max_head_bytes` (FastConnect.configure): one bound for every HTTP/1 head."""
    global _limit
    if limit < 1024:
        raise ValueError("warden_max_head_bytes must be at least 1024")
    _limit = limit


def limit() -> int:
    return _limit


def install() -> None:
    wrap_once(_http1.Http1Server, "read_headers", _bounded_request_head)
    wrap_once(_http1.Http1Client, "read_headers", _bounded_response_head)


def _still_waiting(conn: Any, reader: Callable[..., Any]) -> bool:
    """After a pass of `read_headers`: no head yet, and more buffered than any head may be."""
    state = getattr(conn, "state", None)
    return getattr(state, "__func__", None) is getattr(reader, "__func__", reader) and len(conn.buf) > _limit


def _bounded_request_head(original: Callable[..., Any]) -> Callable[..., Any]:
    def read_headers(self: Any, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        yield from original(self, event)
        if isinstance(event, events.DataReceived) and _still_waiting(self, type(self).read_headers):
            message = f"the request head is longer than {_limit} bytes; send fewer or shorter headers"
            logger.info("warden: closing a client connection: %s", message)
            yield commands.SendData(self.conn, _http1.make_error_response(431, message))
            yield commands.CloseConnection(self.conn)
            self.state = self.done
    return read_headers


def _bounded_response_head(original: Callable[..., Any]) -> Callable[..., Any]:
    def read_headers(self: Any, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        yield from original(self, event)
        if isinstance(event, events.DataReceived) and _still_waiting(self, type(self).read_headers):
            message = f"the upstream's response head is longer than {_limit} bytes"
            logger.info("warden: closing an upstream connection: %s", message)
            yield commands.CloseConnection(self.conn)
            self.state = self.done
            if self.stream_id is not None:
                yield ReceiveHttp(self.ReceiveProtocolError(self.stream_id, message,
                                                            code=self.ReceiveProtocolError.code))
    return read_headers
