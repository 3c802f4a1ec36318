"""HTTP/1 upstreams: informational (1xx) responses are skipped, as mitmproxy does on HTTP/2.

mitmproxy 12.3.1's HTTP/1 client takes the first response head it reads as the final one.
A server may send any number of 1xx responses before the final one (RFC 9110 15.2: "A client
MUST be able to parse one or more 1xx responses received prior to a final response, even if
the client does not expect one"): `100 Continue` unasked, `102 Processing`, `103 Early Hints`
from CDNs. mitmproxy relayed the `100` to the agent as its answer, audited the request as
status 100, and then closed the connection on "unexpected data from server" with the real
response in it.

Here the client skips every complete 1xx head at the start of its receive buffer before it
reads a response head, except `101 Switching Protocols` (a final answer to an Upgrade, which
mitmproxy handles). The agent never needs them: mitmproxy answers an agent's
`Expect: 100-continue` itself and does not forward the Expect header, and clients must
accept a final response without any 1xx before it; HTTP/2 upstreams' 1xx responses are
swallowed by mitmproxy already. More than MAX_INFORMATIONAL of them before one final response
is a protocol error (the upstream connection is closed; the agent gets 502). Idempotent;
installed when the chain is built (`warden run` and `mitmdump -s`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy.net.http.http1 import read
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.http import _http1
from mitmproxy.proxy.layers.http._base import ReceiveHttp

from egresswarden.runtime.patching import wrap_once

logger = logging.getLogger("warden")

MAX_INFORMATIONAL = 16
_SKIPPED = "_warden_informational"


def install() -> None:
    wrap_once(_http1.Http1Client, "read_headers", _skipping_informational)


def _informational_at_start(buf: Any) -> bool | None:
    """Does the buffer start with a 1xx status line (101 aside)? None: no whole line yet. The
    line is read by mitmproxy's own parser, so every spelling it would take for a 1xx (two
    spaces, a tab, `+100`, `HTTP/1.2`: red team 23) is taken for one here too."""
    data = bytes(buf)
    end = data.find(b"\n")
    if end < 0:
        return None
    try:
        _, status, _ = read._read_response_line(data[:end].rstrip(b"\r"))  # noqa: SLF001
    except ValueError:
        return False  # mitmproxy's own parse reports it
    return 100 <= status < 200 and status != 101


def _skipping_informational(original: Callable[..., Any]) -> Callable[..., Any]:
    def read_headers(self: Any, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, events.DataReceived) and self.request is not None:
            while self.buf and _informational_at_start(self.buf):
                if self.buf.maybe_extract_lines() is None:
                    return  # the 1xx head is not complete yet: wait for the rest
                stream, before = getattr(self, _SKIPPED, (None, 0))
                skipped = before + 1 if stream == self.stream_id else 1  # counted per response
                setattr(self, _SKIPPED, (self.stream_id, skipped))
                if skipped > MAX_INFORMATIONAL:
                    message = f"the upstream sent more than {MAX_INFORMATIONAL} informational (1xx) responses"
                    logger.info("warden: closing an upstream connection: %s", message)
                    self.buf = type(self.buf)()
                    yield commands.CloseConnection(self.conn)
                    stream = self.stream_id
                    self.state = self.done
                    if stream is not None:
                        yield ReceiveHttp(self.ReceiveProtocolError(stream, message,
                                                                    code=self.ReceiveProtocolError.code))
                    return
            if not self.buf:
                return
        yield from original(self, event)
    return read_headers
