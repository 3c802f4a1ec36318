"""What a tunnel's first TLS bytes say: is this a ClientHello, and does it name the CONNECT host?

Every place that reads a tunnel's first bytes (Interception, for tunnels mitmproxy handles;
the fast CONNECT listener; RetryGuard, for a second ClientHello) asks `classify_first_bytes`
and only maps its verdict to an action, so a fix to what counts as "names the host" lands on
every path at once. It asks, in this order:

* `refused_first_bytes`: bytes no tunnel may begin with (another TLS record type, a PROXY
  protocol header, a handshake message that is not a ClientHello); a prefix of a PROXY
  header waits for more;
* `starts_like_tls`: must the bytes pass the SNI check at all (any first byte 0x16)?
* `too_many_tls_records`: more records than a real ClientHello takes (refused: each segment
  would make mitmproxy's parser read the whole buffer again).
* `sni_names` on mitmproxy's parsed `ClientHello`: does it name the host, as every TLS stack
  would read it?

`plainly_names_host` answers the last question without mitmproxy's parser, for the common
case only: mitmproxy's Kaitai-based parser builds an object per field and costs ~50 µs per
hello (a tenth of a passed-through tunnel's CPU). It reads one whole ClientHello in one TLS
record whose every length field agrees with the bytes (the parser tolerates several that do
not), and answers True only when that hello has no server_name extension or exactly one,
holding exactly one host_name that names the host. Anything else (several records, trailing
bytes, a length that disagrees, a second name, a name for another host) is False, which
means "ask mitmproxy's parser", never "mismatch": on the inputs where it says True, the full
parse succeeds and `sni_names` says True too (tests/test_client_hello.py compares both on
real and mutated hellos), so it can only skip work, never change a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from mitmproxy.net.check import is_valid_host
from mitmproxy.proxy.layers.tls import parse_client_hello

from egresswarden.core.hostnames import HostError, normalize_host

MAX_HELLO_RECORDS = 16  # real clients send a ClientHello in one or two TLS records

_SERVER_NAME = 0
_ALPN = 16


def starts_like_tls(data: bytes) -> bool:
    """Must these bytes pass the ClientHello check (SNI) before a tunnel carries them raw?

    Any first byte 0x16 (a TLS handshake record) counts. mitmproxy's `starts_like_tls_record`
    also wants 3 bytes and a record version 03 00-03: a ClientHello whose first segment was one
    or two bytes, or whose record said `03 04` or `03 ff` (OpenSSL accepts any `03 xx` there),
    was taken for "not TLS" and passed through without the SNI check. Such a hello either
    parses (and is checked) or is refused as invalid."""
    return data[:1] == b"\x16"


_OTHER_RECORD_TYPES = frozenset((0x14, 0x15, 0x17, 0x18))  # change_cipher_spec, alert, application_data, heartbeat


def starts_like_other_tls_record(data: bytes) -> bool:
    """Could these bytes begin a TLS record that is not a handshake record? No client begins
    TLS with one, but Go's and Java's servers skip warning alerts in front of a ClientHello
    and then read its server_name: taken for "not TLS", such a tunnel was relayed raw with no
    SNI check (red team 10). Decided on the first byte alone: Go accepts any version below
    0x1000 on that alert and Java any version at all (red team 11). Such a tunnel is refused."""
    return bool(data) and data[0] in _OTHER_RECORD_TYPES


_PROXY_V1 = b"PROXY"  # not "PROXY ": go-proxyproto before 0.15 takes any line starting "PROXY"
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def starts_like_proxy_protocol(data: bytes) -> bool | None:
    """Do these bytes begin with a PROXY protocol header (None: a prefix of one so far)? A
    front that accepts the header strips it and reads the ClientHello behind it, which Warden
    took for "not TLS" and relayed raw (red team 12: nginx `listen ... ssl proxy_protocol`
    served another host's vhost, and believed the client address the agent wrote). The v1
    word is matched on its five letters in any case (red team 13: `PROXYX TCP4 ...` passed
    a check for `PROXY ` and go-proxyproto took it). An agent has no reason to send one;
    such a tunnel is refused."""
    if not data:
        return False
    head = data[:len(_PROXY_V1)].upper()
    if head == _PROXY_V1[:len(head)]:
        return True if len(head) == len(_PROXY_V1) else None
    if data[:len(_PROXY_V2)] == _PROXY_V2[:len(data)]:
        return True if len(data) >= len(_PROXY_V2) else None
    return False


def refused_first_bytes(data: bytes) -> str | None:
    """Why a tunnel may not begin with these bytes (None: it may, as far as they tell). Any
    first byte 0x16 must be a ClientHello: mitmproxy's parser ignores the handshake type, and
    no server should be trusted to refuse another message in its place (red team 12)."""
    if starts_like_other_tls_record(data):
        return "a TLS record other than a ClientHello before the handshake"
    if starts_like_proxy_protocol(data):
        return "a PROXY protocol header"
    if data[:1] == b"\x16" and len(data) > 5 and data[5] != 0x01:
        return "a TLS handshake that does not begin with a ClientHello"
    return None


def too_many_tls_records(data: bytes) -> bool:
    """More TLS records than any real ClientHello takes. Each new segment makes mitmproxy parse
    the whole buffer again, so a hello sent one byte per record would cost quadratic CPU."""
    offset, count = 0, 0
    while offset + 5 <= len(data):
        count += 1
        if count > MAX_HELLO_RECORDS:
            return True
        offset += 5 + int.from_bytes(data[offset + 3:offset + 5], "big")
    return False


def sni_names(hello: Any, host: str) -> bool:
    """Does the ClientHello name `host` (or no host at all), as every TLS stack would read it?
    mitmproxy's `sni` is the first valid server_name extension with exactly one name, and None
    for anything else: a second extension, a list of two names, a name with a NUL or IDNA junk
    would otherwise pass as "no SNI" (no check) while an origin may read another name in it."""
    extensions = [ext for ext, _ in hello.extensions if ext == _SERVER_NAME]
    if not extensions:
        return True
    if len(extensions) > 1 or hello.sni is None:
        return False
    return _names(hello.sni, host)


def _names(name: str, host: str) -> bool:
    """The SNI names the host: the same name up to ASCII case and one trailing dot. Not just
    `normalize_host(name) == host`: that strips whitespace, and mitmproxy's `is_valid_host`
    lets a final newline through (its pattern ends in `$`), so `allowed.test\n` counted as
    `allowed.test` while OpenSSL hands the server the name with the newline (red team 9)."""
    plain = name.lower()
    if plain.endswith("."):
        plain = plain[:-1]
    if plain != host:
        return False
    try:
        return bool(normalize_host(name) == host)
    except HostError:
        return False


def plainly_names_host(data: bytes, host: str) -> bool:
    """True: `data` starts with one whole, strictly well-formed ClientHello in one TLS record
    that names `host` or no host (see the module docstring). False: ask mitmproxy's parser."""
    try:
        name = _plain_server_name(data)
    except IndexError:
        return False
    if name is None:
        return False
    if name == b"":
        return True  # no server_name extension at all
    if not is_valid_host(name):
        return False
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        return False
    return _names(text, host)


def _plain_server_name(data: bytes) -> bytes | None:
    """The one host_name of a strictly well-formed single-record ClientHello, b"" when it has
    no server_name extension, None when it is anything else. IndexError on short data."""
    # record header: handshake, 03 00-03 (mitmproxy's starts_like_tls_record), length
    if data[0] != 0x16 or data[1] != 0x03 or data[2] > 0x03:
        return None
    record_end = 5 + (data[3] << 8 | data[4])
    # handshake header: client_hello, a length filling the record exactly
    if data[5] != 0x01 or len(data) < record_end:
        return None
    end = 9 + (data[6] << 16 | data[7] << 8 | data[8])
    if end != record_end:
        return None
    pos = 9 + 2 + 32  # legacy_version, random
    pos += 1 + data[pos]  # legacy_session_id
    suites = data[pos] << 8 | data[pos + 1]
    if suites % 2:
        return None  # mitmproxy reads len // 2 suites and is then out of step
    pos += 2 + suites
    pos += 1 + data[pos]  # legacy_compression_methods
    if pos > end:
        return None
    if pos == end:
        return b""  # no extensions
    if pos + 2 + (data[pos] << 8 | data[pos + 1]) != end:
        return None
    pos += 2
    name = b""
    while pos < end:
        if pos + 4 > end:
            return None
        kind = data[pos] << 8 | data[pos + 1]
        body_end = pos + 4 + (data[pos + 2] << 8 | data[pos + 3])
        if body_end > end:
            return None
        if kind == _SERVER_NAME:
            if name:
                return None  # a second server_name extension
            name = _single_host_name(data[pos + 4:body_end]) or b""
            if not name:
                return None
        elif kind == _ALPN and not _plain_alpn(data[pos + 4:body_end]):
            return None  # mitmproxy parses ALPN too, and refuses a broken one
        pos = body_end
    return name


def _single_host_name(body: bytes) -> bytes | None:
    """server_name extension body: a list holding exactly one host_name (type 0)."""
    if len(body) < 5 or (body[0] << 8 | body[1]) != len(body) - 2 or body[2] != 0:
        return None
    if (body[3] << 8 | body[4]) != len(body) - 5:
        return None
    return body[5:] or None


def _plain_alpn(body: bytes) -> bool:
    """ALPN extension body: a list length that agrees, then non-empty length-prefixed names."""
    if len(body) < 2 or (body[0] << 8 | body[1]) != len(body) - 2:
        return False
    pos = 2
    while pos < len(body):
        size = body[pos]
        if size == 0 or pos + 1 + size > len(body):
            return False
        pos += 1 + size
    return True


class FirstBytes(Enum):
    WAIT = auto()  # not decidable yet: a ClientHello or PROXY header unfinished so far
    REFUSE = auto()  # no tunnel may carry these bytes (`why` says which rule)
    NAMES_HOST = auto()  # a whole ClientHello naming the CONNECT host, or no host at all
    OTHER_NAME = auto()  # a whole ClientHello naming something else (`sni`: what it names)
    NOT_TLS = auto()  # not TLS at all (HTTP, SSH, anything): raw_tcp or interception decide


@dataclass(frozen=True, slots=True)
class FirstBytesVerdict:
    kind: FirstBytes
    why: str = ""  # REFUSE: for the tunnel_refused record and the log
    sni: str = ""  # OTHER_NAME: the name read, "(unreadable)" when there is none to show


_WAIT = FirstBytesVerdict(FirstBytes.WAIT)
_NAMES_HOST = FirstBytesVerdict(FirstBytes.NAMES_HOST)
_NOT_TLS = FirstBytesVerdict(FirstBytes.NOT_TLS)


def classify_first_bytes(data: bytes, host: str) -> FirstBytesVerdict:
    """What the first bytes a client sent into a tunnel to `host` are, as far as they tell.
    `data` is everything the client sent so far (the caller bounds how much it holds)."""
    refused = refused_first_bytes(data)
    if refused is not None:
        return FirstBytesVerdict(FirstBytes.REFUSE, why=refused)
    if starts_like_proxy_protocol(data) is None:
        return _WAIT  # a prefix of a PROXY protocol header so far
    if not starts_like_tls(data):
        return _NOT_TLS if data else _WAIT
    if too_many_tls_records(data):
        return FirstBytesVerdict(FirstBytes.REFUSE, why=f"a ClientHello in more than {MAX_HELLO_RECORDS} TLS records")
    if plainly_names_host(data, host):  # the common case, without mitmproxy's parser
        return _NAMES_HOST
    try:
        hello = parse_client_hello(data)
    except ValueError:
        return FirstBytesVerdict(FirstBytes.REFUSE, why="an invalid TLS ClientHello")
    if hello is None:
        return _WAIT
    if sni_names(hello, host):
        return _NAMES_HOST
    return FirstBytesVerdict(FirstBytes.OTHER_NAME, sni=hello.sni or "(unreadable)")


# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest.
HELLO_RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
MAX_HELD_BYTES = 64 * 1024
_SERVER_PREFIX = 2 * 6 + 43  # two ChangeCipherSpec records, then a ServerHello up to its random


class HandshakeCut(Exception):
    """The tunnel must be closed: the message says why (for the `tunnel_close` record)."""


class RetryGuard:
    """Checks the second ClientHello of a passed-through TLS handshake (red team 9).

    A TLS 1.3 server that wants another key share answers the first ClientHello with a
    HelloRetryRequest, and the client sends a second ClientHello. OpenSSL reads that one's
    server_name again (its SNI callback runs twice, and a server picks its virtual host
    there), so an agent could name an allowed host first and another host second. The guard
    sits in the raw relay of a tunnel whose client began with a checked ClientHello:

    * the client's bytes up to the end of the first hello's last record go through; later
      client bytes wait until the server's first handshake message says whether it is a
      HelloRetryRequest (a real client sends nothing in between except early data, which
      waits one round trip; early data in front of a second hello is cut: fail closed);
    * no HelloRetryRequest: the held bytes go through and the guard is done;
    * a HelloRetryRequest: the client's next ClientHello (after any ChangeCipherSpec records)
      must pass the same check as the first, or the tunnel is closed (`HandshakeCut`).

    The server's bytes are never held (the caller relays them); the guard reads their start
    (up to two ChangeCipherSpec records, then the first handshake message up to its random).
    Anything the guard cannot read where a ServerHello must be, or more than MAX_HELD_BYTES
    held, closes the tunnel too: a stage that needed to see something and did not, denies.
    """

    def __init__(self, host: str, strict: bool = True) -> None:
        self.host = host
        # strict (a tunnel that carries TLS only): the server's first bytes must be TLS, a
        # ServerHello after at most two ChangeCipherSpec records; else a ClientHello naming
        # the host, then anything, passed to a server that is not TLS at all (red team 15)
        self.strict = strict
        self.done = False
        self.server_hello_seen = False  # the server answered with TLS: the tunnel carries TLS
        self._held = bytearray()  # client bytes not yet forwarded
        self._server = bytearray()  # the start of the server's stream, until decided
        self._first_end: int | None = None  # end of the first hello's last record (None: not yet known)
        self._aligned = False  # the first hello ended exactly at that record's end
        self._retry = False  # the server sent a HelloRetryRequest

    @property
    def holding(self) -> bool:
        """Client bytes wait for the server's answer: a client FIN must wait behind them. With
        none held, the FIN goes on at once: the server must learn that the client is gone, or
        a server that never answers TLS holds the tunnel until its own timeout."""
        return bool(self._held)

    def from_client(self, data: bytes) -> bytes:
        """The client's bytes to forward now (maybe none). Raises HandshakeCut."""
        if self.done:
            return data
        self._held += data
        if self._first_end is None:
            end = _hello_end(self._held)
            if end is None:
                return self._hold()  # not whole yet (the caller checked its start)
            self._first_end, self._aligned = end
            forward = bytes(self._held[:self._first_end])
            del self._held[:self._first_end]
            self._hold()  # the bound applies to what stays held from the first segment too
            return forward
        if self._retry:
            return self._second_hello()
        return self._hold()

    def from_server(self, data: bytes) -> bytes:
        """Client bytes released by what the server sent (the caller relays `data` itself)."""
        if self.done or self._retry:
            return b""
        self._server += data[:_SERVER_PREFIX - len(self._server)]
        server = self._server
        at = 0
        while server[at:at + 1] == b"\x14":  # ChangeCipherSpec first (RFC 8446 section 5 allows it)
            if at >= 2 * 6:
                raise HandshakeCut("ChangeCipherSpec records instead of a ServerHello")
            if len(server) < at + 5:
                return b""
            if server[at + 3:at + 5] != b"\x00\x01":
                raise HandshakeCut("a ChangeCipherSpec record that is not one byte long")
            at += 6
        if len(server) <= at:
            return b""
        if server[at] != 0x16:
            if self.strict:
                raise HandshakeCut("the server's first bytes were not a TLS ServerHello")
            return self._finish()  # an alert or anything but a handshake record: no retry
        if len(server) < at + 6:
            return b""
        if server[at + 5] != 0x02 or server[at + 1] != 0x03:
            if self.strict:
                raise HandshakeCut("the server's first handshake message was not a ServerHello")
            return self._finish()  # not a ServerHello
        self.server_hello_seen = True
        if int.from_bytes(server[at + 3:at + 5], "big") < 38:
            raise HandshakeCut("a ServerHello split into records too small to read")
        if len(server) < at + 43:
            return b""
        if server[at + 11:at + 43] != HELLO_RETRY_RANDOM:
            return self._finish()
        if not self._aligned:
            raise HandshakeCut("a HelloRetryRequest after a ClientHello that did not end at a TLS record boundary")
        self._retry = True
        return self._second_hello()

    def _hold(self) -> bytes:
        if len(self._held) > MAX_HELD_BYTES:
            raise HandshakeCut(f"the client sent more than {MAX_HELD_BYTES} bytes before the server's first answer")
        return b""

    def _finish(self) -> bytes:
        self.done = True
        held = bytes(self._held)
        self._held.clear()
        return held

    def _second_hello(self) -> bytes:
        data = bytes(self._held)
        pos, skipped = 0, 0
        while data[pos:pos + 1] == b"\x14":  # ChangeCipherSpec (middlebox compatibility mode)
            skipped += 1
            if skipped > 2:
                raise HandshakeCut("ChangeCipherSpec records instead of a second ClientHello")
            if len(data) < pos + 5:
                return self._hold()
            if data[pos + 3:pos + 5] != b"\x00\x01":
                raise HandshakeCut("a ChangeCipherSpec record that is not one byte long")
            pos += 6
        rest = data[pos:]
        if not rest:
            return self._hold()
        if not starts_like_tls(rest):  # no PROXY header or anything else may wait here
            raise HandshakeCut("something other than a ClientHello after a HelloRetryRequest")
        verdict = classify_first_bytes(rest, self.host)
        if verdict.kind is FirstBytes.WAIT:
            return self._hold()
        if verdict.kind is FirstBytes.REFUSE:
            raise HandshakeCut(f"after a HelloRetryRequest, {verdict.why}")
        if verdict.kind is not FirstBytes.NAMES_HOST:
            raise HandshakeCut("a second ClientHello (after a HelloRetryRequest) that names another host")
        return self._finish()


def _hello_end(data: bytes | bytearray) -> tuple[int, bool] | None:
    """Where the first ClientHello's last TLS record ends, and whether the hello ends exactly
    there; None while incomplete."""
    offset, total, head = 0, 0, b""
    need: int | None = None
    while offset + 5 <= len(data):
        size = int.from_bytes(data[offset + 3:offset + 5], "big")
        if offset + 5 + size > len(data):
            return None
        if need is None:
            head += data[offset + 5:offset + 5 + min(size, 4 - len(head))]
            if len(head) == 4:
                need = 4 + int.from_bytes(head[1:4], "big")
        total += size
        offset += 5 + size
        if need is not None and total >= need:
            return offset, total == need
    return None
