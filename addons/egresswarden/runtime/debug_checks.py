"""mitmproxy's debug-only type check of every HTTP message, off in `warden run`.

`mitmproxy.http.MessageData` defines `__post_init__` under `if __debug__:`: each Request and
Response built checks every field against its annotation with `typing.get_origin` and
recursion through unions. It guards against a programming error (an addon constructing a
message with a str body), not against input: the HTTP/1 and HTTP/2 readers build messages
from bytes they parsed, and a message changed after construction is not checked at all.
Under `python -O` the check does not exist. Warden cannot run with -O (its own asserts must
stay), so the proxy process drops this one check instead: in a plain-HTTP keep-alive
profile it was 8.6% of the event loop. Only the proxy process drops it: unit tests that
build Warden's own messages in-process (refusals, MCP answers) still run with the check.
"""

from __future__ import annotations

from mitmproxy import http


def _unchecked(self: http.MessageData) -> None:
    """The dataclass-generated __init__ of RequestData/ResponseData calls this."""


def skip_message_typechecks() -> None:
    http.MessageData.__post_init__ = _unchecked  # type: ignore[method-assign]
