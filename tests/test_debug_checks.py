"""runtime/debug_checks: the proxy process drops mitmproxy's debug-only message type check
(and nothing else: a message is still built the same way)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
from mitmproxy import http
from egresswarden.runtime.debug_checks import skip_message_typechecks

def data(started):
    return http.ResponseData(http_version=b"HTTP/1.1", status_code=200, reason=b"OK", headers=http.Headers(),
                             content=b"", trailers=None, timestamp_start=started, timestamp_end=None)

try:
    data("not a float")
    print("unchecked-before")
except TypeError:
    print("checked-before")
skip_message_typechecks()
data("not a float")
good = http.Response(b"HTTP/1.1", 200, b"OK", http.Headers(), b"body", None, 0.0, 1.0)
print("unchecked-after", good.status_code, good.content, good.headers.get("content-length"))
"""


def test_typecheck_is_on_in_plain_mitmproxy_and_off_after_skip() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split("\n")[:2] == ["checked-before", "unchecked-after 200 b'body' None"]
