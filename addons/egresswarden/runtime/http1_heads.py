"""HTTP/1: a bound on the bytes mitmproxy holds unparsed on one connection, heads included.

mitmproxy 12.3.1's HTTP/1 layer appends every byte it receives to the connection's receive
buffer, in every state, and takes bytes out only as it parses them (`_http1.py`: "FIXME:
protect against header size DoS"). So one connection could make it hold any amount of memory
(red teams 7 and 8): a head whose empty line never comes (256 MiB of it: 878 MiB of RSS), a
chunk-size line or trailer section that never ends, bytes pipelined behind a response still
on its way (1 GB: 1.1 GB of RSS), or a head that arrives whole in one read however long it
is. Warden's own listener bounds the first head of a connection (runtime/fastconnect.py);
this bounds everything after it, and every upstream connection, at `warden_max_head_bytes`
(default 64 KiB; nginx allows 32 KiB of headers, Node.js 16 KiB):

  * a request head longer than the bound, whole or not: the agent gets `431 Request Header
    Fields Too Large` and the connection is closed; no request exists yet to decide or
    record, as with mitmproxy's own 400 for a malformed head;
  * more than the bound unparsed anywhere else on a client connection (chunk framing,
    trailers, pipelined bytes behind a pending response): the connection is closed; a
    request being read ends in mitmproxy's protocol-error path (its record carries the error);
  * the same on an upstream connection (a response head, chunk framing, trailers): the
    upstream connection is closed and the stream gets a protocol error (the agent gets 502,
    the request's record the error).

Bodies are not affected: mitmproxy's body readers take every body byte out of the buffer as it
arrives (where bodies go is bounded by the body plan and the per-agent budget).
Idempotent; applied when the chain is built, so `warden run` and `mitmdump -s` both get it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from egresswarden.runtime.patching import wrap_once

logger = logging.getLogger("warden")

MAX_HEAD_BYTES = 64 * 1024  # default of `warden_max_head_bytes`
_limit = MAX_HEAD_BYTES
_HEAD_END = re.compile(rb"\n\r?\n")  # where mitmproxy (h11's ReceiveBuffer) finds the end of a head
_REFUSED = "_warden_refused"


def set_limit(limit: int) -> None:
    """`warden_max_head_bytes` (FastConnect.configure): one bound for every HTTP/1 connection."""
    global _limit
    if limit < 1024:
        raise ValueError("warden_max_head_bytes must be at least 1024")
    _limit = limit


def limit() -> int:
    return _limit


def install() -> None:
    wrap_once(_http1.Http1Connection, "_handle_event", _bounded)


def _head_ends_within(buffered: Any, data: bytes) -> bool:
    window = (bytes(buffered) + data)[:_limit + 4]
    found = _HEAD_END.search(window)
    return found is not None and found.end() <= _limit


def _bounded(original: Callable[..., Any]) -> Callable[..., Any]:
    def _handle_event(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
        if not isinstance(event, events.DataReceived):
            yield from original(self, event)
            return
        if getattr(self, _REFUSED, False):
            return  # closing: nothing more is parsed or kept
        if self.state == self.read_headers and len(self.buf) + len(event.data) > _limit \
                and not _head_ends_within(self.buf, event.data):
            yield from _refuse(self, head=True)
            return
        yield from original(self, event)
        if len(self.buf) > _limit and self.state != self.passthrough:
            yield from _refuse(self, head=self.state == self.read_headers)
    return _handle_event


def _refuse(conn: Any, head: bool) -> layer.CommandGenerator[None]:
    setattr(conn, _REFUSED, True)
    server = isinstance(conn, _http1.Http1Server)
    reading = conn.state == conn.read_body or (not server and conn.state == conn.read_headers)
    if head and server:
        message = f"the request head is longer than {_limit} bytes; send fewer or shorter headers"
        yield commands.SendData(conn.conn, _http1.make_error_response(431, message))
    elif server:
        message = f"more than {_limit} bytes of HTTP/1 framing arrived unparsed (chunk lines, trailers, pipelining)"
    else:
        message = f"the upstream sent more than {_limit} bytes of HTTP/1 head or framing unparsed"
    logger.info("warden: closing an %s connection: %s", "agent" if server else "upstream", message)
    conn.buf = type(conn.buf)()  # give the memory back now
    yield commands.CloseConnection(conn.conn)
    stream = conn.stream_id
    conn.state = conn.done
    if reading and stream is not None:
        yield ReceiveHttp(conn.ReceiveProtocolError(stream, message, code=conn.ReceiveProtocolError.code))
