"""The fast CONNECT listener's pure part: the strict head parser (the ClientHello checks it shares
with Interception: tests/test_client_hello.py).

End to end (two real `warden run`s compared answer by answer): tests/test_fastconnect_e2e.py.
"""

from __future__ import annotations

import pytest
from egresswarden.runtime.fastconnect import ConnectHead, parse_connect_head

AUTH = b"Proxy-Authorization: Basic Y29kZXI6dG9r\r\n"


def test_a_strict_connect_head_is_read() -> None:
    assert parse_connect_head(b"CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n" + AUTH) == \
        ConnectHead("allowed.test", 443, b"HTTP/1.1", "Basic Y29kZXI6dG9r")
    assert parse_connect_head(b"CONNECT [::1]:8443 HTTP/1.0\r\n") == ConnectHead("::1", 8443, b"HTTP/1.0", None)
    assert parse_connect_head(b"CONNECT a.test:1 HTTP/1.1\r\nproxy-authorization:\tBasic x \r\n").authorization \
        == "Basic x"  # type: ignore[union-attr]


@pytest.mark.parametrize("head", [
    b"CONNECT allowed.test:443 HTTP/1.1\r\n" + AUTH + AUTH,  # two credentials: which one counts?
    b"CONNECT allowed.test:443 HTTP/1.1\r\nContent-Length: 5\r\n" + AUTH,  # a body on a CONNECT
    b"CONNECT allowed.test:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nUpgrade: h2c\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nExpect: 100-continue\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: 1\r\n 2\r\n",  # obs-fold
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: a\rb\r\n",  # a lone CR
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: \xff\r\n",  # 8-bit
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: a\x00\r\n",  # NUL
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX A: 1\r\n",  # not a token
    b"CONNECT allowed.test:0 HTTP/1.1\r\n",
    b"CONNECT allowed.test:65536 HTTP/1.1\r\n",
    b"CONNECT allowed.test HTTP/1.1\r\n",  # no port
    b"CONNECT allowed.test:443 HTTP/2.0\r\n",
    b"CONNECT  allowed.test:443 HTTP/1.1\r\n",
    b"connect allowed.test:443 HTTP/1.1\r\n",
    b"CONNECT user@allowed.test:443 HTTP/1.1\r\n",
    b"CONNECT allowed.test:443 HTTP/1.1\r\nX-A: 1",  # unterminated header line
])
def test_anything_else_is_left_to_mitmproxy(head: bytes) -> None:
    assert parse_connect_head(head) is None
