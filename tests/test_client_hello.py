"""The ClientHello checks every raw tunnel passes (stages/client_hello.py).

`plainly_names_host` may only skip mitmproxy's parser, never change a decision: wherever it
says True, mitmproxy's parser must accept the same bytes and `sni_names` must say True. That
is checked on hellos from real TLS stacks (Python's ssl, openssl s_client, curl) and on
tens of thousands of mutations of them. End to end through a real Warden (fronting refused,
raw TLS passed): tests/test_fastconnect_e2e.py and tests/test_bypass_e2e.py.
"""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import struct
import subprocess
import threading

import pytest
from egresswarden.stages.client_hello import (
    HELLO_RETRY_RANDOM,
    MAX_HELD_BYTES,
    MAX_HELLO_RECORDS,
    FirstBytes,
    HandshakeCut,
    RetryGuard,
    classify_first_bytes,
    plainly_names_host,
    refused_first_bytes,
    sni_names,
    starts_like_other_tls_record,
    starts_like_proxy_protocol,
    starts_like_tls,
    too_many_tls_records,
)
from mitmproxy.proxy.layers.tls import parse_client_hello

from .bypass_helpers import client_hello_record as hello

HOST = "allowed.test"


def full_parser_says(data: bytes, host: str = HOST) -> bool | str:
    """What Warden decided before the fast reader existed: True/False, or why there is no answer."""
    try:
        parsed = parse_client_hello(data)
    except ValueError:
        return "invalid"
    if parsed is None:
        return "incomplete"
    return sni_names(parsed, host)


def python_hello(server_hostname: str | None, **options: object) -> bytes:
    ctx = ssl.create_default_context()
    for name, value in options.items():
        if name == "alpn":
            ctx.set_alpn_protocols(value)  # type: ignore[arg-type]
        else:
            setattr(ctx, name, value)
    if server_hostname is None:
        ctx.check_hostname = False
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def captured_hello(argv_for_port: list[str]) -> bytes:
    """The first bytes a real client sends to a listener on 127.0.0.1 (which then hangs up)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        port = server.getsockname()[1]
        got: list[bytes] = []

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                got.append(data)

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        argv = [a.replace("{port}", str(port)) for a in argv_for_port]
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20, check=False)
        thread.join(timeout=10)
    assert got, f"{argv[0]} sent nothing"
    return got[0]


def real_hellos() -> dict[str, bytes]:
    hellos = {
        "python default": python_hello(HOST),
        "python TLS 1.2 only": python_hello(HOST, maximum_version=ssl.TLSVersion.TLSv1_2),
        "python TLS 1.3 only": python_hello(HOST, minimum_version=ssl.TLSVersion.TLSv1_3),
        "python ALPN h2": python_hello(HOST, alpn=["h2", "http/1.1"]),
        "python no SNI": python_hello(None),
        "python upper case": python_hello("ALLOWED.test"),
    }
    if shutil.which("openssl"):
        hellos["openssl s_client"] = captured_hello(
            ["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-servername", HOST, "-alpn", "h2,http/1.1"])
    if shutil.which("curl"):
        hellos["curl"] = captured_hello(
            ["curl", "-sk", "--max-time", "5", "--noproxy", "*", "--resolve", f"{HOST}:{{port}}:127.0.0.1",
             f"https://{HOST}:{{port}}/"])
    return hellos


REAL = real_hellos()


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_clients_hellos_take_the_fast_reader(name: str) -> None:
    data = REAL[name]
    assert full_parser_says(data) is True
    assert plainly_names_host(data, HOST), f"{name}: the common case fell back to mitmproxy's parser"
    if name != "python no SNI":
        assert not plainly_names_host(data, "other.test")  # another host: left to the full parser


def test_sni_names_only_an_unambiguous_single_host() -> None:
    assert full_parser_says(hello([b"allowed.test"])) is True
    assert full_parser_says(hello([b"ALLOWED.test"])) is True
    assert full_parser_says(hello(None)) is True  # no SNI at all: nothing to front with
    assert full_parser_says(hello([b"evil.test"])) is False
    assert full_parser_says(hello([b"evil.test", b"allowed.test"])) is False  # mitmproxy reads None
    assert full_parser_says(hello([b"allowed.test\x00evil.test"])) is False
    entry = b"\x00" + struct.pack("!H", 9) + b"evil.test"
    second = b"\x00\x00" + struct.pack("!H", len(entry) + 2) + struct.pack("!H", len(entry)) + entry
    assert full_parser_says(hello([b"allowed.test"], second)) is False  # two server_name extensions
    assert full_parser_says(hello([b"allowed.test."])) is True  # one trailing dot: the same name
    # red team 9: mitmproxy's is_valid_host lets a final newline through and normalize_host strips
    # whitespace, but OpenSSL hands the server the name as sent
    for odd in (b"allowed.test\n", b"allowed.test ", b" allowed.test", b"allowed.test..", b"allowed.test\t"):
        assert full_parser_says(hello([odd])) is False, odd
        assert not plainly_names_host(hello([odd]), HOST), odd


@pytest.mark.parametrize("data, fast", [
    (hello([b"allowed.test"]), True),
    (hello([b"Allowed.Test"]), True),
    (hello(None), True),
    (hello([b"allowed.test"], alpn=b"\x00\x03\x02h2"), True),
    (hello([b"allowed.test"]) + b"\x17\x03\x03\x00\x01x", True),  # bytes after the hello's record
    (hello([b"evil.test"]), False),
    (hello([b"evil.test", b"allowed.test"]), False),
    (hello([b"allowed.test", b"allowed.test"]), False),
    (hello([b"allowed.test\x00evil.test"]), False),
    (hello([b""]), False),
    (hello([b"allowed.test"], alpn=b"\x00\x04\x02h2"), False),  # ALPN list length disagrees
    (hello([b"allowed.test"], alpn=b"\x00\x01\x00"), False),  # an empty protocol name
    (hello([b"allowed.test"])[:-1], False),  # incomplete
])
def test_the_fast_reader_answers_only_the_plain_case(data: bytes, fast: bool) -> None:
    assert plainly_names_host(data, HOST) is fast
    if fast:
        assert full_parser_says(data) is True


def _mutations(base: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(6)
            i = rng.randrange(len(data))
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                data[i] = (data[i] + rng.choice((1, -1, 2, -2))) % 256  # lengths off by one or two
            elif op == 2:
                del data[i:i + rng.randint(1, 8)]
            elif op == 3:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op == 4:
                j = rng.randrange(len(data))
                data[i:i] = data[j:j + rng.randint(1, 40)]  # a duplicated piece (an extension, a name)
            else:
                data[i] = rng.choice((0x00, 0x01, 0x10, 0xff))
        out.append(bytes(data))
    return out


def test_wherever_the_fast_reader_says_yes_the_full_parser_agrees() -> None:
    rng = random.Random(17)
    bases = [*REAL.values(), hello([b"allowed.test"]), hello(None),
             hello([b"allowed.test"], alpn=b"\x00\x0c\x02h2\x08http/1.1")]
    fast_said_yes = 0
    for base in bases:
        for data in _mutations(base, rng, 4000):
            for host in (HOST, "evil.test"):
                if plainly_names_host(data, host):
                    fast_said_yes += 1
                    assert full_parser_says(data, host) is True, (host, data.hex())
    assert fast_said_yes > 1000  # the mutations did reach the fast reader's yes (not only its no)


def test_tls_record_bound_and_the_short_prefix() -> None:
    one = hello([b"allowed.test"])
    assert not too_many_tls_records(one)
    body = one[5:]
    split = b"".join(b"\x16\x03\x01\x00\x01" + body[i:i + 1] for i in range(MAX_HELLO_RECORDS))
    assert not too_many_tls_records(split)
    assert too_many_tls_records(split + b"\x16\x03\x01\x00\x01" + body[MAX_HELLO_RECORDS:MAX_HELLO_RECORDS + 1])
    assert not plainly_names_host(split, HOST)  # several records: the full parser's job
    # every first 0x16 is checked as a ClientHello: one or two bytes, any record version
    for first in (b"\x16", b"\x16\x03", b"\x16\x03\x04", b"\x16\x03\xff", b"\x16\x04\x01"):
        assert starts_like_tls(first)
        assert not plainly_names_host(first, HOST)
    assert not starts_like_tls(b"") and not starts_like_tls(b"GET ") and not starts_like_tls(b"SSH-2.0")


def server_hello(retry: bool, record_size: int | None = None) -> bytes:
    random_ = HELLO_RETRY_RANDOM if retry else b"\x22" * 32
    body = b"\x03\x03" + random_ + b"\x00\x13\x01\x00\x00\x00"
    hs = b"\x02" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x03" + struct.pack("!H", record_size or len(hs)) + hs


CCS = b"\x14\x03\x03\x00\x01\x01"


def test_a_tls_only_guard_cuts_a_server_that_does_not_answer_with_a_server_hello() -> None:
    """Red team 15: a ClientHello naming the host, then raw bytes, to a server that is not TLS."""
    first = hello([b"allowed.test"])
    for answer in (b"\x15\x03\x03\x00\x02\x02\x28", b"\x17\x03\x03\x00\x01x", b"-ERR unknown command\r\n",
                   b"220 smtp.test ESMTP\r\n", b"\x16\x03\x03\x00\x04\x0b\x00\x00\x00"):
        guard = RetryGuard(HOST)
        assert guard.from_client(first + b"SSH-2.0-x\r\n") == first
        with pytest.raises(HandshakeCut, match="not a"):
            for i in range(len(answer)):
                guard.from_server(answer[i:i + 1])


def test_the_retry_guard_releases_what_it_held_when_there_is_no_retry() -> None:
    first = hello([b"allowed.test"])
    for answer, strict in ((server_hello(False), True), (b"\x15\x03\x03\x00\x02\x02\x28", False),
                           (b"\x17\x03\x03\x00\x01x", False)):  # strict=False: a raw_tcp tunnel
        guard = RetryGuard(HOST, strict=strict)
        assert guard.from_client(first + b"early") == first  # the checked hello goes at once
        assert guard.from_client(b"-data") == b""  # later bytes wait for the server's answer
        released = b"".join(guard.from_server(answer[i:i + 1]) for i in range(len(answer)))  # byte by byte
        assert released == b"early-data" and guard.done
        assert guard.from_client(b"more") == b"more"


def test_after_a_retry_request_the_second_hello_must_name_the_host() -> None:
    first = hello([b"allowed.test"])
    for second, ok in ((hello([b"allowed.test"]), True), (hello([b"ALLOWED.test."]), True), (hello(None), True),
                       (hello([b"evil.test"]), False), (hello([b"evil.test", b"allowed.test"]), False),
                       (hello([b"allowed.test\n"]), False)):
        for prefix in (b"", CCS):
            guard = RetryGuard(HOST)
            assert guard.from_client(first) == first
            assert guard.from_server(server_hello(True)) == b""
            data = prefix + second
            if ok:
                assert guard.from_client(data[:7]) == b""  # incomplete: held
                assert guard.from_client(data[7:]) == data and guard.done
            else:
                with pytest.raises(HandshakeCut, match="names another host"):
                    guard.from_client(data)
    # pipelined: the second hello was already held when the retry request arrived
    guard = RetryGuard(HOST)
    assert guard.from_client(first + hello([b"evil.test"])) == first
    with pytest.raises(HandshakeCut):
        guard.from_server(server_hello(True))


@pytest.mark.parametrize("client, server, why", [
    (hello([b"allowed.test"]) + b"\x00" * (MAX_HELD_BYTES + 1), server_hello(False)[:3], "more than"),
    (hello([b"allowed.test"]) + b"\x17\x03\x03\x00\x01x", server_hello(True), "other than a ClientHello"),
    (hello([b"allowed.test"]) + CCS * 3, server_hello(True), "ChangeCipherSpec"),
    (hello([b"allowed.test"]) + b"\x14\x03\x03\x00\x02\x01\x01", server_hello(True), "not one byte long"),
    (hello([b"allowed.test"]), b"\x14\x03\x03\x01\x00" + server_hello(True), "not one byte long"),
    (hello([b"allowed.test"]) + b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", server_hello(True), "invalid"),
    (hello([b"allowed.test"]), server_hello(True, record_size=20), "too small"),
])
def test_the_retry_guard_cuts_what_it_cannot_check(client: bytes, server: bytes, why: str) -> None:
    guard = RetryGuard(HOST)
    with pytest.raises(HandshakeCut, match=why):
        guard.from_client(client)
        guard.from_server(server)


def test_a_retry_after_a_hello_that_shares_its_record_is_cut() -> None:
    one = hello([b"allowed.test"])
    shared = one[:3] + struct.pack("!H", len(one) - 5 + 4) + one[5:] + b"\x01\x00\x00\x00"  # 4 more bytes in its record
    guard = RetryGuard(HOST)
    assert guard.from_client(shared) == shared
    with pytest.raises(HandshakeCut, match="record boundary"):
        guard.from_server(server_hello(True))


def test_other_tls_records_first_are_recognised() -> None:
    # decided on the first byte: Go and Java take an alert with any version bytes (red team 11)
    for first in (b"\x14\x03", b"\x15\x03\x01\x00\x02\x01\x5a", b"\x15\x00\x00\x00\x02\x01\x5a",
                  b"\x15\xff\xff", b"\x17\x03\x03", b"\x18\x03\x00", b"\x14", b"\x15", b"\x17", b"\x18"):
        assert starts_like_other_tls_record(first) is True
    for other in (b"", b"\x16\x03\x01", b"SSH-2.0", b"GET / HTTP/1.1", b"\x00\x00\x00\x08", b"\x13", b"\x19"):
        assert starts_like_other_tls_record(other) is False


def test_a_server_change_cipher_spec_before_its_retry_request_is_skipped() -> None:
    first = hello([b"allowed.test"])
    guard = RetryGuard(HOST)
    assert guard.from_client(first + hello([b"evil.test"])) == first
    answer = CCS + server_hello(True)
    assert guard.from_server(answer[:4]) == b""
    with pytest.raises(HandshakeCut, match="names another host"):
        guard.from_server(answer[4:])
    guard = RetryGuard(HOST)
    guard.from_client(first + b"x")
    assert guard.from_server(CCS + CCS + server_hello(False)) == b"x" and guard.done
    guard = RetryGuard(HOST)
    guard.from_client(first)
    with pytest.raises(HandshakeCut, match="instead of a ServerHello"):
        guard.from_server(CCS * 3)


def test_proxy_protocol_headers_and_other_handshake_messages_are_refused_first_bytes() -> None:
    for header in (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n\x21",
                   b"PROXYX TCP4 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY\tX", b"proxy tcp4", b"PROXY"):  # red team 13
        assert starts_like_proxy_protocol(header) is True
        assert refused_first_bytes(header) == "a PROXY protocol header"
    for prefix in (b"P", b"PROX", b"prox", b"\r", b"\r\n\r\n\x00"):
        assert starts_like_proxy_protocol(prefix) is None  # ask again with more bytes
    for other in (b"POST / HTTP/1.1", b"PROPFIND /", b"PRI * HTTP/2.0", b"SSH-2.0", b"\r\n\r\nx", b""):
        assert starts_like_proxy_protocol(other) is False
    assert refused_first_bytes(b"\x16\x03\x01\x00\x04\x00\x00\x00\x00") is not None  # hello_request
    assert refused_first_bytes(hello([b"allowed.test"])) is None
    assert refused_first_bytes(b"\x16\x03\x01") is None  # too short to tell: the parser waits


@pytest.mark.parametrize("data, kind, detail", [
    (b"", FirstBytes.WAIT, ""),
    (b"P", FirstBytes.WAIT, ""),  # a PROXY header so far
    (b"\x16\x03\x01", FirstBytes.WAIT, ""),  # a ClientHello so far
    (hello([b"allowed.test"])[:40], FirstBytes.WAIT, ""),
    (hello([b"allowed.test"]), FirstBytes.NAMES_HOST, ""),
    (hello([b"ALLOWED.test."]), FirstBytes.NAMES_HOST, ""),
    (hello(None), FirstBytes.NAMES_HOST, ""),  # no server_name at all
    (hello([b"allowed.test"]) + b"trailing", FirstBytes.NAMES_HOST, ""),  # the full parser's answer
    (hello([b"evil.test"]), FirstBytes.OTHER_NAME, "evil.test"),
    (hello([b"evil.test", b"allowed.test"]), FirstBytes.OTHER_NAME, "(unreadable)"),
    (hello([b"allowed.test\n"]), FirstBytes.OTHER_NAME, "allowed.test\n"),  # red team 9
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", FirstBytes.REFUSE, "PROXY protocol"),
    (b"\x15\x03\x01\x00\x02\x01\x5a", FirstBytes.REFUSE, "other than a ClientHello"),
    (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", FirstBytes.REFUSE, "does not begin with a ClientHello"),
    (b"\x16\x03\x01\x00\x01\x01" * (MAX_HELLO_RECORDS + 1), FirstBytes.REFUSE, "TLS records"),
    (b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", FirstBytes.REFUSE, "invalid"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", FirstBytes.NOT_TLS, ""),
    (b"GET / HTTP/1.1\r\n", FirstBytes.NOT_TLS, ""),
    (b"POST", FirstBytes.NOT_TLS, ""),
])
def test_one_verdict_on_a_tunnels_first_bytes(data: bytes, kind: FirstBytes, detail: str) -> None:
    verdict = classify_first_bytes(data, HOST)
    assert verdict.kind is kind
    if kind is FirstBytes.REFUSE:
        assert detail in verdict.why
    elif kind is FirstBytes.OTHER_NAME:
        assert verdict.sni == detail


def test_the_verdict_on_hellos_agrees_with_the_full_parser() -> None:
    """The one classifier every path asks, against mitmproxy's parser on the same mutations
    the fast reader is checked on: a name verdict exactly where the parser reads a name."""
    rng = random.Random(20261202)
    for data in _mutations(hello([b"allowed.test"]), rng, 3000):
        verdict = classify_first_bytes(data, HOST)
        if refused_first_bytes(data) is not None or too_many_tls_records(data):
            assert verdict.kind is FirstBytes.REFUSE
            continue
        if not starts_like_tls(data):
            assert verdict.kind is (FirstBytes.WAIT if starts_like_proxy_protocol(data) is None else FirstBytes.NOT_TLS)
            continue
        full = full_parser_says(data)
        if full is True:
            assert verdict.kind is FirstBytes.NAMES_HOST, data.hex()
        elif full is False:
            assert verdict.kind is FirstBytes.OTHER_NAME, data.hex()
        elif full == "incomplete":
            assert verdict.kind is FirstBytes.WAIT, data.hex()
        else:
            assert verdict.kind is FirstBytes.REFUSE, data.hex()
