"""WebSockets stage: the leak guard and redaction for WebSocket messages, as for bodies.

Compression (permessage-deflate) is never negotiated: Warden removes the extension offer from
the upgrade request and any acceptance from the 101 response, so a small compressed frame
cannot inflate into gigabytes inside the proxy, and what is scanned is what is sent.
`GuardedWebsocketLayer` (installed in place of mitmproxy's WebsocketLayer) bounds a message's
size while its fragments arrive (over `MAX_MESSAGE_BYTES`: closed with 1009) and scans the
payloads of control frames (ping, pong, close reason) that mitmproxy relays without a hook:
a secret or placeholder there is replaced by an empty payload.

A WebSocket exists only where Policy allowed the upgrade (the deciding allow rule says
`websocket: true`). Each message from the agent is scanned for every secret and placeholder
not bound to the upgrade request; a hit drops that message and every later one in both
directions (the connection carries nothing more), marks the flow `secret_leak` and is
audited with the `websocket_close` record. Messages from the server are redacted when a
credential was injected into the upgrade request. Messages are counted for the audit, and
mitmproxy's per-flow message list is trimmed to the newest message so a long-lived socket
does not grow Warden's memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import wsproto.events
from mitmproxy import http
from mitmproxy.proxy import events, layer
from mitmproxy.proxy.layers import websocket as mitm_websocket

from egresswarden.core.credentials import scanner_for
from egresswarden.core.decision import Reason, deny
from egresswarden.runtime.context import record_of

logger = logging.getLogger("warden")

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
EXTENSIONS = "Sec-WebSocket-Extensions"


class GuardedWebsocketLayer(mitm_websocket.WebsocketLayer):
    """mitmproxy's WebSocket relay with a bound on message size and scanned control frames."""

    def start(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().start(event)
        record = record_of(self.flow)
        for conn in (self.client_ws, self.server_ws):
            conn.events = _guarded_events(conn.events, record)

    _handle_event = start

    def relay_messages(self, event: events.Event) -> layer.CommandGenerator[None]:
        yield from super().relay_messages(event)
        if not self.flow.live:
            # Ended: nothing reads a message still being assembled again. The layer refers to
            # itself (its handler is its own bound method) and waits for the cyclic GC, so an
            # unfinished message would keep its fragments, up to MAX_MESSAGE_BYTES, until then
            # (red team 5: 20 WebSockets with 7 MiB unfinished, +141 MiB that stayed after close).
            for conn in (self.client_ws, self.server_ws):
                conn.frame_buf = [b""]


def _guarded_events(source: Callable[[], Iterator[Any]], record: Any) -> Callable[[], Iterator[Any]]:
    size = 0

    def guarded() -> Iterator[Any]:
        nonlocal size
        for ws_event in source():
            if isinstance(ws_event, wsproto.events.Message):
                size += len(ws_event.data)
                if size > MAX_MESSAGE_BYTES:
                    logger.warning("warden: WebSocket message over %d bytes; closing", MAX_MESSAGE_BYTES)
                    yield wsproto.events.CloseConnection(code=1009, reason="message too big for Warden")
                    return
                if ws_event.message_finished:
                    size = 0
            elif isinstance(ws_event, (wsproto.events.Ping, wsproto.events.Pong)):
                if _holds_secret(record, bytes(ws_event.payload)):
                    ws_event = type(ws_event)(payload=b"")
            elif (isinstance(ws_event, wsproto.events.CloseConnection) and ws_event.reason
                  and _holds_secret(record, ws_event.reason.encode("utf-8", "surrogateescape"))):
                ws_event = wsproto.events.CloseConnection(code=ws_event.code, reason="")
            yield ws_event
    return guarded


def _holds_secret(record: Any, data: bytes) -> bool:
    rules = record.rules
    if rules is None or not data:
        return bool(data)  # no rules: nothing may pass unchecked
    creds = record.creds
    bound = creds.bound_ids if creds is not None else frozenset()
    return scanner_for(rules).find_leak(data, bound, "WebSocket control frame") is not None


# mitmproxy's HTTP layer creates `websocket.WebsocketLayer(...)` after a 101: this makes it ours.
mitm_websocket.WebsocketLayer = GuardedWebsocketLayer  # type: ignore[misc]


class WebSockets:
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is None and EXTENSIONS in flow.request.headers:
            del flow.request.headers[EXTENSIONS]  # never negotiate permessage-deflate

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None and flow.response.status_code == 101 and EXTENSIONS in flow.response.headers:
            del flow.response.headers[EXTENSIONS]  # an upstream that accepted anyway gets no compression

    def websocket_message(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        ws = flow.websocket
        assert ws is not None
        message = ws.messages[-1]
        rules = record.rules
        if rules is None:
            raise RuntimeError("WebSocket message without a decided upgrade")  # fail closed
        if record.revocation is not None or (record.decision is not None
                                             and record.decision.reason is Reason.SECRET_LEAK):
            message.drop()  # after a leak or a revocation nothing more passes, in either direction
        elif message.from_client:
            record.websocket_messages_up += 1
            record.bytes_up += len(message.content)
            creds = record.creds
            bound = creds.bound_ids if creds is not None else frozenset()
            leak = scanner_for(rules).find_leak(message.content, bound, "WebSocket message", placeholders_bound=False)
            if leak is not None:
                message.drop()
                record.decision = deny(Reason.SECRET_LEAK, leak.message(), rules.version, leak.credentials[0])
                record.add_event("secret_leak")
                logger.warning("warden: secret_leak agent=%s host=%s credential=%s where=websocket encoding=%s",
                               record.agent, record.host, ",".join(leak.credentials), leak.encoding)
        else:
            record.websocket_messages_down += 1
            record.bytes_down += len(message.content)
            creds = record.creds
            only = creds.redact_ids() if creds is not None and creds.injected else frozenset()
            if only:
                assert creds is not None
                redacted, n = creds.scanner.redact(message.content, only)
                if n:
                    message.content = redacted
        del ws.messages[:-1]
