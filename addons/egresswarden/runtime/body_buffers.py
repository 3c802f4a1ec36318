"""Bounds on the body bytes mitmproxy 12.3.1 keeps for Warden's flows, where mitmproxy has none.

`install()` wraps three places (idempotent; applied when the chain is built, so `warden run`
and `mitmdump -s` both get them):

* **A request Warden has already answered** (it refused at `requestheaders`: identity 407,
  policy 403, body plan 411/413/415, buffer budget 429): mitmproxy still read the whole body
  into memory before sending the answer. One refused 200 MiB POST took Warden from 93 to
  494 MiB peak, with or without a token. Now each chunk is counted (the record's `bytes_up`)
  and dropped; the end of the body ends the flow as before, so the agent reads the answer
  and every hook runs. Such a request is never sent upstream either way.
* **A stream that failed** (reset by a peer, a protocol error, a refused upstream): its
  partial body buffers stayed referenced until Python's cyclic garbage collector freed the
  stream (mitmproxy's stream objects refer to themselves); an agent resetting 64 half-sent
  1 MiB streams again and again grew Warden to 700 MiB while its buffer budget read 0. The
  buffers of the failed side are now emptied when the failure is handled.
* **HTTP/2 send queues**: mitmproxy grants every HTTP/2 peer the largest window (2^31-1)
  and acknowledges data as soon as it arrives, so it never slows a sender down; data the
  other leg's peer has no window for waits in an unbounded per-stream queue. An agent that
  grants no window for a download, or an upstream that grants none for an upload, made
  Warden queue hundreds of MiB (400 MiB response: +435 MiB; 600 MiB upload: +650 MiB). A
  connection now queues at most H2_QUEUE_LIMIT bytes (option `warden_h2_max_queued`, 0 for
  no bound): past it the stream that grew it is reset (ENHANCE_YOUR_CALM) and failed on the
  other leg too, so the flow ends in the `error` hook and is audited with that reason. It is
  a bound, not backpressure: a legitimate HTTP/2 client that falls behind a fast upstream by
  more than the limit is cut as well. (HTTP/1 legs need neither: mitmproxy stops reading
  while a socket's write buffer drains.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h2.errors
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.proxy.layers.http._base import ReceiveHttp
from mitmproxy.proxy.layers.http._events import RequestData, ResponseData
from mitmproxy.utils import human

from egresswarden.runtime.context import record_of
from egresswarden.runtime.patching import wrap_once

# Bytes one HTTP/2 connection may queue for its peer (option warden_h2_max_queued). Not smaller:
# a client with the default 64 KiB window, reading promptly but slower than a fast upstream
# sends, builds a queue too (red team 5: with 16 MiB such a download was cut after 2.2 MiB).
H2_QUEUE_LIMIT = 64 * 1024 * 1024


def install() -> None:
    wrap_once(http_layers.HttpStream, "state_consume_request_body", _drop_answered_bodies)
    wrap_once(http_layers.HttpStream, "handle_protocol_error", _free_failed_streams)
    wrap_once(_http2.Http2Connection, "_handle_event", _bound_h2_queues)


def _drop_answered_bodies(original: Callable[..., Any]) -> Callable[..., Any]:
    def state_consume_request_body(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData) and self.flow.response is not None:
            record_of(self.flow).bytes_up += len(event.data)
            return
        yield from original(self, event)
    return state_consume_request_body


def _free_failed_streams(original: Callable[..., Any]) -> Callable[..., Any]:
    def handle_protocol_error(self: Any, event: Any) -> layer.CommandGenerator[None]:
        yield from original(self, event)
        # It ends by dropping the stream (or the flow was killed): neither partial body is read
        # again (mitmproxy moves a whole body into the flow before anything uses it).
        self.request_body_buf.clear()
        self.response_body_buf.clear()
    return handle_protocol_error


def _queued(conn: Any) -> int:
    return sum(len(chunk.data) for queue in conn.stream_buffers.values() for chunk in queue)


def _bound_h2_queues(original: Callable[..., Any]) -> Callable[..., Any]:
    def _handle_event(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
        yield from original(self, event)
        if not isinstance(event, (RequestData, ResponseData)) or not self.h2_conn.stream_buffers:
            return
        limit = getattr(self.context.options, "warden_h2_max_queued", H2_QUEUE_LIMIT)
        queued = _queued(self.h2_conn)
        stream_id = event.stream_id
        if not limit or queued <= limit or stream_id not in self.streams:
            return
        self.h2_conn.reset_stream(stream_id, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        self.streams.pop(stream_id, None)
        peer = human.format_address(self.conn.peername)
        yield ReceiveHttp(self.ReceiveProtocolError(
            stream_id, f"HTTP/2 peer {peer} granted no window for {queued} bytes queued on its connection "
                       f"(Warden queues at most {limit}): stream reset",
            code=self.ReceiveProtocolError.code))
    return _handle_event
