"""Host-name normalisation and public-suffix knowledge, shared by the loader and the matcher.

Rule files and requests go through the same `normalize_host`, so that "Example.COM.",
"example.com" and the IDNA form of a Unicode name compare equal everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

import tldextract

MAX_HOST_LENGTH = 253
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LIKE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostError(ValueError):
    """A host name that cannot be a real DNS name or IP literal."""


@lru_cache(maxsize=16384)
def normalize_host(raw: str) -> str:
    """Return the canonical form of a host: lowercase ASCII (IDNA), no trailing dot.

    IP literals (with or without IPv6 brackets) come back in their compressed form.
    Raises HostError for anything that is neither a valid DNS name nor an IP literal,
    including numeric forms such as "2130706433" or "0x7f.1" that resolvers would
    silently turn into loopback addresses.
    """
    host = raw.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise HostError("empty host name")
    if len(host) > MAX_HOST_LENGTH + 1:
        raise HostError(f"host name longer than {MAX_HOST_LENGTH} characters")
    ip = parse_ip(host)
    if ip is not None:
        return ip.compressed
    if host.endswith("."):
        host = host[:-1]
    try:
        ascii_host = host.lower() if host.isascii() else host.encode("idna").decode("ascii").lower()
    except UnicodeError as e:
        raise HostError(f"not a valid internationalised host name ({e.__class__.__name__})") from None
    if len(ascii_host) > MAX_HOST_LENGTH:
        raise HostError(f"host name longer than {MAX_HOST_LENGTH} characters")
    labels = ascii_host.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise HostError("host name has an empty, over-long or invalid label")
    if _NUMERIC_LIKE.match(labels[-1]):
        raise HostError("host looks like an IP address in non-standard notation")
    return ascii_host


def parse_ip(host: str) -> IPAddress | None:
    """The address if `host` is a standard IPv4/IPv6 literal, else None."""
    if not host or not (host[0].isdigit() or ":" in host):
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@lru_cache(maxsize=1)
def _extractor() -> tldextract.TLDExtract:
    # Bundled snapshot only: no list download, no cache directory writes. ICANN suffixes
    # only: the private section lists names like githubusercontent.com, which security
    # teams legitimately allow as "*.githubusercontent.com".
    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, include_psl_private_domains=False)


def is_public_suffix(name: str) -> bool:
    """True for a name that is itself an ICANN public suffix: "com", "co.uk"."""
    ext = _extractor()(name)
    return not ext.domain and ext.suffix == name


def registrable_domain(name: str) -> str:
    """The registrable domain ("example.co.uk" for "a.b.example.co.uk"), or "" if none."""
    ext = _extractor()(name)
    return f"{ext.domain}.{ext.suffix}" if ext.domain and ext.suffix else ""


def suffixes(host: str) -> list[str]:
    """"a.b.c" -> ["a.b.c", "b.c", "c"]: the keys the suffix index is probed with."""
    out = [host]
    start = host.find(".")
    while start != -1:
        out.append(host[start + 1 :])
        start = host.find(".", start + 1)
    return out
