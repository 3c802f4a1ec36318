"""HTTP/1 trailers: refuse them with a defined answer instead of hanging the connection.

mitmproxy 12.3.1's HTTP/1 body reader raises `NotImplementedError("HTTP trailers are not
implemented yet.")` when a chunked message ends with trailer fields, in either direction.
The exception escapes the layer: mitmproxy logs "mitmproxy has crashed!" with a traceback,
the message is neither forwarded nor answered, no hook runs (so nothing is audited), and the
client's connection stays open until it gives up.

`install()` wraps the reader so that this case takes the path mitmproxy already has for
malformed HTTP/1 (an h11 ProtocolError): the connection is closed and the stream gets a
protocol error. For a request the agent is answered 400 with the reason, the connection is
closed and the flow ends in the `error` hook (audited as a `request` record with `error`);
for a response from the upstream the agent gets 502 (or, once the response is streaming, a
closed connection). A buffered request is never forwarded (the trailer comes before the
request hook); a streamed one (no Content-Length, body scanned on the fly) has reached the
upstream up to the trailer, which then sees its connection closed before the message ends.
Idempotent; applied when the chain is built, so `warden run` and `mitmdump -s` both get it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp, format_error

from egresswarden.runtime.patching import wrap_once

MESSAGE = "HTTP/1 trailer fields are not supported by Warden; send the message without trailers"


def install() -> None:
    wrap_once(_http1.Http1Connection, "read_body", _refuse_trailers)


def _refuse_trailers(original: Callable[..., Any]) -> Callable[..., Any]:
    def read_body(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
        try:
            yield from original(self, event)
        except NotImplementedError:
            if isinstance(self, _http1.Http1Server) and self.response is None:
                # the agent reads why (mitmproxy's own protocol-error path closes silently)
                answer = http.Response.make(400, format_error(400, MESSAGE), {"Content-Type": "text/html",
                                                                             "Connection": "close"})
                yield commands.SendData(self.conn, http1.assemble_response(answer))
            yield commands.CloseConnection(self.conn)
            yield ReceiveHttp(self.ReceiveProtocolError(self.stream_id, MESSAGE,
                                                               code=self.ReceiveProtocolError.code))
    return read_body
