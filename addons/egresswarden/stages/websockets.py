"""WebSockets stage: the leak guard and redaction for WebSocket messages, as for bodies.

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

from mitmproxy import http

from egresswarden.core.credentials import scanner_for
from egresswarden.core.decision import Reason, deny
from egresswarden.runtime.context import record_of

logger = logging.getLogger("warden")


class WebSockets:
    def websocket_message(self, flow: http.HTTPFlow) -> None:
        record = record_of(flow)
        ws = flow.websocket
        assert ws is not None
        message = ws.messages[-1]
        rules = record.rules
        if rules is None:
            raise RuntimeError("WebSocket message without a decided upgrade")  # fail closed
        if record.decision is not None and record.decision.reason is Reason.SECRET_LEAK:
            message.drop()  # after a leak nothing more passes, in either direction
        elif message.from_client:
            record.websocket_messages_up += 1
            record.bytes_up += len(message.content)
            creds = record.creds
            bound = creds.bound_ids if creds is not None else frozenset()
            leak = scanner_for(rules).find_leak(message.content, bound, "WebSocket message")
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
