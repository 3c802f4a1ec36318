"""The body of a request Warden has already answered is read and dropped, not buffered.

When a hook answers a request before its body has arrived (Warden refuses at
`requestheaders`: identity 407, policy 403, body plan 411/413/415, buffer budget 429),
mitmproxy 12.3.1 still reads the whole body into memory (`HttpStream.request_body_buf`),
then runs the request hook and sends the answer. Nothing bounds it: one refused POST with a
200 MiB body took Warden from 93 to 494 MiB, and a client need not even be authenticated
(407 is such an answer). `install()` wraps that state so that, once the flow has a
response, each body chunk is counted (the audit record's `bytes_up`) and dropped; the end of
the body still ends the flow the way mitmproxy does, so the agent reads Warden's answer and
every hook runs as before. The request is never sent upstream either way.
Idempotent; applied when the chain is built, so `warden run` and `mitmdump -s` both get it.
"""

from __future__ import annotations

from typing import Any

from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http._events import RequestData

from egresswarden.runtime.context import record_of


def install() -> None:
    cls: Any = http_layers.HttpStream
    if getattr(cls.state_consume_request_body, "warden_drops_answered", False):
        return
    original = cls.state_consume_request_body

    def state_consume_request_body(self: Any, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, RequestData) and self.flow.response is not None:
            record_of(self.flow).bytes_up += len(event.data)
            return
        yield from original(self, event)
    state_consume_request_body.warden_drops_answered = True  # type: ignore[attr-defined]
    cls.state_consume_request_body = state_consume_request_body
