"""The fast CONNECT listener's pure parts: the strict head parser, the TLS record bound, the SNI rule.

End to end (two real `warden run`s compared answer by answer): tests/test_fastconnect_e2e.py.
"""

from __future__ import annotations

import ssl
import struct

import pytest
from egresswarden.runtime.fastconnect import ConnectHead, parse_connect_head
from egresswarden.stages.interception import (
    MAX_HELLO_RECORDS,
    sni_names,
    starts_like_tls,
    too_many_tls_records,
)
from mitmproxy.proxy.layers.tls import parse_client_hello

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


def hello(sni_list: list[bytes] | None, extra: bytes = b"") -> bytes:
    exts = b""
    if sni_list is not None:
        names = b"".join(b"\x00" + struct.pack("!H", len(n)) + n for n in sni_list)
        body = struct.pack("!H", len(names)) + names
        exts = b"\x00\x00" + struct.pack("!H", len(body)) + body
    exts += extra
    body = b"\x03\x03" + b"\x11" * 32 + b"\x00" + struct.pack("!H", 2) + b"\x13\x01" + b"\x01\x00" \
        + struct.pack("!H", len(exts)) + exts
    hs = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(hs)) + hs


def test_sni_names_only_an_unambiguous_single_host() -> None:
    def check(data: bytes, host: str = "allowed.test") -> bool:
        parsed = parse_client_hello(data)
        assert parsed is not None
        return sni_names(parsed, host)

    assert check(hello([b"allowed.test"]))
    assert check(hello([b"ALLOWED.test"]))
    assert check(hello(None))  # no SNI at all: nothing to front with
    assert not check(hello([b"evil.test"]))
    assert not check(hello([b"evil.test", b"allowed.test"]))  # mitmproxy reads None
    assert not check(hello([b"allowed.test\x00evil.test"]))
    entry = b"\x00" + struct.pack("!H", 9) + b"evil.test"
    second = b"\x00\x00" + struct.pack("!H", len(entry) + 2) + struct.pack("!H", len(entry)) + entry
    assert not check(hello([b"allowed.test"], second))  # two server_name extensions
    ctx = ssl.create_default_context()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="allowed.test")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    assert check(out.read())  # a real client's


def test_tls_record_bound_and_the_short_prefix() -> None:
    one = hello([b"allowed.test"])
    assert not too_many_tls_records(one)
    body = one[5:]
    split = b"".join(b"\x16\x03\x01\x00\x01" + body[i:i + 1] for i in range(MAX_HELLO_RECORDS))
    assert not too_many_tls_records(split)
    assert too_many_tls_records(split + b"\x16\x03\x01\x00\x01" + body[MAX_HELLO_RECORDS:MAX_HELLO_RECORDS + 1])
    # every first 0x16 is checked as a ClientHello: one or two bytes, any record version
    for first in (b"\x16", b"\x16\x03", b"\x16\x03\x04", b"\x16\x03\xff", b"\x16\x04\x01"):
        assert starts_like_tls(first)
    assert not starts_like_tls(b"") and not starts_like_tls(b"GET ") and not starts_like_tls(b"SSH-2.0")
