"""A client that disconnects while its CONNECT is being answered: a closed tunnel, not a crash.

When the client's FIN arrives while mitmproxy is still answering a CONNECT (Warden's hooks
deciding it), mitmproxy 12.3.1's HTTP/1 server turns it into a `RequestProtocolError` for the
CONNECT stream. The stream, already in passthrough, hands that HTTP event as it is to the
layer inside the tunnel, which expects connection events: with a pipelined request behind the
CONNECT (an HTTP layer inside an explained or intercepted tunnel) it raised
`AssertionError: Unexpected event` and mitmproxy logged "mitmproxy has crashed!" with a
traceback, once per such connection (red team 17; nothing was forwarded, the records were
written). `install()` makes `HttpStream.passthrough` read a protocol error on either side as
that side's end of message, which it already turns into the `ConnectionClosed` the inner layer
handles. Idempotent; applied when the chain is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http._events import (
    RequestEndOfMessage,
    RequestProtocolError,
    ResponseEndOfMessage,
    ResponseProtocolError,
)

from egresswarden.runtime.patching import wrap_once


def install() -> None:
    wrap_once(http_layers.HttpStream, "passthrough", _errors_as_closes)


def _errors_as_closes(original: Callable[..., Any]) -> Callable[..., Any]:
    def passthrough(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestProtocolError):
            event = RequestEndOfMessage(event.stream_id)
        elif isinstance(event, ResponseProtocolError):
            event = ResponseEndOfMessage(event.stream_id)
        relayed: layer.CommandGenerator[None] = original(self, event)
        return relayed
    return passthrough
