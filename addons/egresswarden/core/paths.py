"""Request-path canonicalisation and path globs.

Paths are matched after percent-decoding, so that "/repos/%61cme" cannot slip past a rule
for "/repos/acme". Paths whose meaning depends on the origin's normalisation (dot
segments, encoded slashes or backslashes, empty segments, control characters) are refused
rather than guessed at: an agent has no need for them, and guessing differently from the
origin is how path rules are bypassed.

Globs: "*" matches within one segment, a whole "**" segment matches any number of
segments (including none). "/repos/acme/**" matches "/repos/acme" and "/repos/acme/x/y".
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import unquote_to_bytes

MAX_PATH_LENGTH = 8192
# Paths with nothing to decode or refuse: no '%', '\\', control characters, empty or dot segments.
_PLAIN = re.compile(r"(?:/(?!\.\.?(?:/|$))[^/%\\\x00-\x20\x7f]+)*/?")


class PathError(ValueError):
    """A request path Warden will not interpret."""


def canonical_path(raw: str) -> str:
    """Decoded path without query; raises PathError for ambiguous paths.

    A request target never carries a fragment (RFC 9112 3.2: clients strip it); one that does is
    refused, because origins disagree about it (some treat '#' as a path byte and then merge the
    dot segments after it: `/public/x#/../../private`)."""
    if "#" in raw:
        raise PathError("the request target contains '#' (a fragment is never sent to a server)")
    path = raw.split("?", 1)[0]
    if path and _PLAIN.fullmatch(path):
        return path  # nothing to decode or refuse: the common case, one regex match
    if path == "*" or path == "":
        return "/"
    if len(path) > MAX_PATH_LENGTH:
        raise PathError(f"path longer than {MAX_PATH_LENGTH} characters")
    if not path.startswith("/"):
        raise PathError("path must start with '/'")
    if "\\" in path:
        raise PathError("path contains a backslash")
    segments = path.split("/")[1:]
    decoded: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if "%" in segment:
            try:
                segment = unquote_to_bytes(segment).decode("utf-8", "strict")
            except UnicodeDecodeError:
                raise PathError("path has percent-encoded bytes that are not UTF-8") from None
            if "/" in segment or "\\" in segment:
                raise PathError("path contains an encoded slash or backslash")
        if segment in (".", ".."):
            raise PathError("path contains '.' or '..' segments; send the resolved path")
        if segment == "" and i != last:
            raise PathError("path contains an empty segment ('//')")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in segment):
            raise PathError("path contains control characters")
        decoded.append(segment)
    return "/" + "/".join(decoded)


class GlobError(ValueError):
    """A path glob in a rule file that is not well formed."""


def check_glob(pattern: str) -> None:
    """Raise GlobError unless `pattern` is a well-formed path glob (no regex is built)."""
    if not pattern.startswith("/"):
        raise GlobError("path globs start with '/'")
    for segment in pattern.split("/")[1:]:
        if segment != "**" and "**" in segment:
            raise GlobError("'**' must be a whole path segment, as in '/repos/**'")
        if segment in (".", ".."):
            raise GlobError("path globs cannot contain '.' or '..' segments")


@lru_cache(maxsize=262144)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a path glob to an anchored regular expression (cached: rules compile lazily,
    on first use, so loading 100,000 rules does not compile 100,000 regular expressions)."""
    check_glob(pattern)
    parts: list[str] = []
    segments = pattern.split("/")[1:]
    for i, segment in enumerate(segments):
        if segment == "**":
            # "/a/**" must match "/a" too: the separator before ** is optional.
            parts.append("(?:/.*)?" if i == len(segments) - 1 else "(?:/[^/]*)*")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    return re.compile("".join(parts) or "/")
