"""Newline-delimited JSON framing with a hard cap on line length.

MCP's stdio transport (spec "Transports: stdio", and the SDK's `mcp/client/stdio.py`) sends
one JSON-RPC message (or batch) per line, UTF-8, with no embedded newlines. `read_lines`
yields each line as bytes, or an `Oversized` marker for a line longer than the cap: the
rest of such a line is read and thrown away in chunks, so memory stays at most one cap plus
one chunk whatever the peer writes. The first HEAD_BYTES of an oversized line are kept so
that the relay can find the JSON-RPC id it answers (serializers put "id" first).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

CHUNK = 256 * 1024
HEAD_BYTES = 4096
DEFAULT_MAX_LINE = 16 * 1024 * 1024

_ID = re.compile(rb'"id"\s*:\s*(-?\d{1,18}|"(?:[^"\\]|\\.){0,200}")')


@dataclass(slots=True)
class Oversized:
    """A line longer than the cap (dropped). `size` counts the bytes seen (all of them once ended)."""

    size: int
    head: bytes

    def guess_id(self) -> Any:
        """The JSON-RPC id near the start of the line, if there is one (else None)."""
        match = _ID.search(self.head)
        if match is None:
            return None
        try:
            return json.loads(match.group(1))
        except ValueError:
            return None


async def read_lines(reader: asyncio.StreamReader, max_line: int = DEFAULT_MAX_LINE) -> AsyncIterator[bytes | Oversized]:
    """Lines from `reader` (without the newline), bounded by `max_line` bytes; ends at EOF.

    A last line without a newline at EOF is still yielded (a peer that exits after writing).
    """
    buf = bytearray()
    skipping: Oversized | None = None
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            if skipping is not None:
                yield skipping
            elif buf:
                yield bytes(buf)
            return
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            piece = chunk[start:nl]
            start = nl + 1
            if skipping is not None:
                skipping.size += len(piece)
                done, skipping = skipping, None
                yield done
            elif len(buf) + len(piece) > max_line:
                head = bytes(buf[:HEAD_BYTES]) if len(buf) >= HEAD_BYTES else bytes(buf) + piece[: HEAD_BYTES - len(buf)]
                size = len(buf) + len(piece)
                buf.clear()
                yield Oversized(size, head)
            elif buf:
                buf += piece
                line = bytes(buf)
                buf.clear()
                yield line
            else:
                yield piece
        rest = chunk[start:]
        if skipping is not None:
            skipping.size += len(rest)
        elif len(buf) + len(rest) > max_line:
            head = bytes(buf[:HEAD_BYTES]) if len(buf) >= HEAD_BYTES else bytes(buf) + rest[: HEAD_BYTES - len(buf)]
            skipping = Oversized(len(buf) + len(rest), head)
            buf.clear()
        else:
            buf += rest


def dumps_line(message: Any) -> bytes:
    """One message as a line: compact JSON, UTF-8, newline-terminated.

    Non-ASCII is kept as is, except that a lone surrogate (legal in a JSON escape, not in
    UTF-8) falls back to ASCII escapes rather than failing.
    """
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"
