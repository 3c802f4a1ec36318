"""What happens to a message body, decided once, and how a body is decoded for scanning (pure).

A body plan is decided once per request (and once per response) before any stage acts on
the body; every stage then obeys it. This is what keeps a stage from streaming a body that
another stage needed to see (the MCP stage once saw an empty body because the credentials
stage had streamed it):

    BUFFER       the body is read whole before the request/response hook, every stage sees it.
                 Only for bodies of known, bounded length.
    STREAM_SCAN  streamed, but through the leak scanner (requests) or the redactor / MCP
                 filter (responses): nothing unscanned passes.
    STREAM       streamed unchanged: no stage needs it (no secret could be in it, or nothing
                 of it is governed).
    REFUSE       Warden answers and the body is never forwarded.

Decoding for scanning: every content coding mitmproxy can decode (gzip and its alias
x-gzip, deflate, br, zstd, identity), stacked codings in reverse order of application, with
the decoded size bounded (a small compressed body must not expand into gigabytes). A coding
Warden cannot decode is refused, never passed unscanned.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from .decision import Reason


class BodyPlan(StrEnum):
    BUFFER = "buffer"
    STREAM_SCAN = "stream_scan"
    STREAM = "stream"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class PlannedBody:
    plan: BodyPlan
    reason: Reason | None = None  # for REFUSE
    message: str = ""
    length: int = 0  # a BUFFER request body's declared length (what it will hold in memory)


BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})


def codings(header: str | None) -> list[str]:
    """Content-Encoding values in the order they were applied ("gzip, identity" -> ["gzip"])."""
    if not header:
        return []
    out = []
    for part in header.split(","):
        name = part.strip().lower()
        if name in ("", "identity", "none"):
            continue
        out.append("gzip" if name == "x-gzip" else name)
    return out


def _zlib(wbits: int, members: bool = False) -> Callable[[bytes, int], bytes]:
    def decode(data: bytes, limit: int) -> bytes:
        out = b""
        while True:
            d = zlib.decompressobj(wbits)
            out += d.decompress(data, limit + 1 - len(out))
            if len(out) > limit or d.unconsumed_tail:
                raise DecodeLimit
            out += d.flush()
            # gzip allows several members one after another (RFC 1952 2.2), and clients decode
            # them all: so must the scanner, or a secret in the second member passes unseen.
            data = d.unused_data
            if not members or not data:
                if data.strip(b"\0"):
                    raise ValueError("data after the end of the compressed stream")
                return out
    return decode


def _deflate(data: bytes, limit: int) -> bytes:
    try:
        return _zlib(zlib.MAX_WBITS)(data, limit)  # zlib-wrapped, as the RFC says
    except zlib.error:
        return _zlib(-zlib.MAX_WBITS)(data, limit)  # raw deflate, as many servers send


def _brotli(data: bytes, limit: int) -> bytes:
    import brotli  # type: ignore[import-untyped]  # mitmproxy's dependency; no type stubs

    d = brotli.Decompressor()
    out = bytes(d.process(data, output_buffer_limit=limit + 1))
    if len(out) > limit or not d.is_finished():
        raise DecodeLimit
    return out


def _zstd(data: bytes, limit: int) -> bytes:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
    except ImportError:
        from backports import zstd  # mitmproxy's dependency

    d = zstd.ZstdDecompressor()
    out = bytes(d.decompress(data, max_length=limit + 1))
    if len(out) > limit or not d.eof:
        raise DecodeLimit
    return out


DECODERS: dict[str, Callable[[bytes, int], bytes]] = {
    "gzip": _zlib(zlib.MAX_WBITS | 16, members=True),
    "deflate": _deflate,
    "br": _brotli,
    "zstd": _zstd,
}


class DecodeLimit(Exception):
    """The decoded body would exceed the scan bound (or its end was not found within it)."""


class UnsupportedCoding(Exception):
    """A content coding Warden cannot decode."""


def unsupported(header: str | None) -> str | None:
    """The first coding in the header Warden cannot decode, or None."""
    return next((c for c in codings(header) if c not in DECODERS), None)


def decode_for_scan(body: bytes, header: str | None, limit: int) -> bytes:
    """Undo every coding of `header` (last applied first), each output bounded by `limit`.

    Raises UnsupportedCoding, DecodeLimit, or ValueError for corrupt data."""
    data = body
    for coding in reversed(codings(header)):
        decoder = DECODERS.get(coding)
        if decoder is None:
            raise UnsupportedCoding(coding)
        try:
            data = decoder(data, limit)
        except (zlib.error, EOFError) as e:
            raise ValueError(f"corrupt {coding} body") from e
        except DecodeLimit:
            raise
        except Exception as e:  # brotli.error, zstd.ZstdError: corrupt input
            raise ValueError(f"corrupt {coding} body ({e.__class__.__name__})") from e
    return data


def plan_request_body(method: str, content_length: str | None, chunked: bool, http2: bool,
                      content_encoding: str | None, *, mcp: bool, scan: bool, max_buffered: int,
                      max_mcp: int) -> PlannedBody:
    """The request body plan. `mcp`: the target is a declared MCP endpoint; `scan`: the rule
    set has secrets or placeholders the leak guard must look for."""
    length: int | None = None
    if content_length is not None:
        value = content_length.strip()
        if not value.isdigit():
            return PlannedBody(BodyPlan.REFUSE, Reason.BODY_TOO_LARGE, "the request's Content-Length is not a number")
        length = int(value)
    unknown = length is None and (chunked or (http2 and method.upper() not in BODYLESS_METHODS))
    if not unknown and (length or 0) == 0:
        return PlannedBody(BodyPlan.BUFFER)  # no body
    if mcp:
        if unknown:
            return PlannedBody(BodyPlan.REFUSE, Reason.LENGTH_REQUIRED,
                               "requests to an MCP endpoint must carry Content-Length: Warden decides every "
                               "JSON-RPC message before it reaches the server and bounds what it buffers")
        assert length is not None
        if length > max_mcp:
            return PlannedBody(BodyPlan.REFUSE, Reason.BODY_TOO_LARGE,
                               f"an MCP request of {length} bytes exceeds the limit of {max_mcp} bytes")
        bad = unsupported(content_encoding)
        if bad is not None:
            return PlannedBody(BodyPlan.REFUSE, Reason.UNSUPPORTED_ENCODING,
                               f"Content-Encoding {bad!r} cannot be decoded, so the MCP message cannot be decided")
        return PlannedBody(BodyPlan.BUFFER, length=length)
    if not scan:
        if not unknown and length is not None and length <= max_buffered:
            return PlannedBody(BodyPlan.BUFFER, length=length)
        return PlannedBody(BodyPlan.STREAM)
    bad = unsupported(content_encoding)
    if bad is not None:
        return PlannedBody(BodyPlan.REFUSE, Reason.UNSUPPORTED_ENCODING,
                           f"Content-Encoding {bad!r} cannot be decoded, so the body cannot be checked for "
                           f"secrets; send it uncompressed or gzip/deflate/br/zstd")
    if not unknown and length is not None and length <= max_buffered:
        return PlannedBody(BodyPlan.BUFFER, length=length)
    if codings(content_encoding):
        return PlannedBody(BodyPlan.REFUSE, Reason.BODY_TOO_LARGE,
                           "a compressed request body larger than the scan limit cannot be checked for secrets; "
                           "send it uncompressed")
    return PlannedBody(BodyPlan.STREAM_SCAN)


def plan_response_body(content_length: str | None, content_encoding: str | None, *, mcp: bool, sse: bool,
                       redact: bool, max_buffered: int, max_mcp: int) -> PlannedBody:
    """The response body plan. `redact`: echoed secrets must be redacted (credentials injected)."""
    length = int(content_length.strip()) if content_length is not None and content_length.strip().isdigit() else None
    if mcp:
        if sse:
            return PlannedBody(BodyPlan.STREAM_SCAN)  # event by event through the MCP filter
        if length is not None and length <= max_mcp:
            return PlannedBody(BodyPlan.BUFFER)
        return PlannedBody(BodyPlan.STREAM_SCAN)  # collected by the bounded JSON filter
    if redact:
        if length is not None and length <= max_buffered:
            return PlannedBody(BodyPlan.BUFFER)
        if codings(content_encoding):
            # Redaction needs the plain text; Warden asked for identity. A compressed body too large
            # to decode in memory cannot be redacted: refuse rather than pass the secret through.
            return PlannedBody(BodyPlan.REFUSE, Reason.BODY_TOO_LARGE,
                               "the upstream sent a large compressed response that Warden cannot redact")
        return PlannedBody(BodyPlan.STREAM_SCAN)
    if length is not None and length <= max_buffered:
        return PlannedBody(BodyPlan.BUFFER)
    return PlannedBody(BodyPlan.STREAM)
