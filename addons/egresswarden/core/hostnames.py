"""Host-name normalisation and public-suffix knowledge, shared by the loader and the matcher.

Rule files and requests go through the same `normalize_host`, so that "Example.COM.",
"example.com" and the IDNA form of a Unicode name compare equal everywhere.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SuffixListError

if TYPE_CHECKING:
    import tldextract

MAX_HOST_LENGTH = 253
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# Already canonical: lowercase ASCII labels, no trailing dot, last label not numeric-like.
# One regex match, so the cost of a lookup does not depend on hitting the cache below.
_CANONICAL = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*(?!0x[0-9a-f]*$|[0-9]+$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)
_NUMERIC_LIKE = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostError(ValueError):
    """A host name that cannot be a real DNS name or IP literal."""


def normalize_host(raw: str) -> str:
    """Return the canonical form of a host: lowercase ASCII (IDNA), no trailing dot.

    IP literals (with or without IPv6 brackets) come back in their compressed form.
    Raises HostError for anything that is neither a valid DNS name nor an IP literal,
    including numeric forms such as "2130706433" or "0x7f.1" that resolvers would
    silently turn into loopback addresses.
    """
    if len(raw) <= MAX_HOST_LENGTH and _CANONICAL.fullmatch(raw):
        return raw
    return _normalize_slow(raw)


@lru_cache(maxsize=16384)
def _normalize_slow(raw: str) -> str:
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
    import tldextract  # only when the snapshot file cannot be read directly (see below)

    return tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, include_psl_private_domains=False)


def _ascii(name: str) -> str:
    try:
        return name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return name


@dataclass(frozen=True, slots=True)
class SuffixRules:
    """One section of the Public Suffix List, as sets: `exact` entries, `wild` parents (the
    `*.ck` entries, without `*.`), `exceptions` (`!www.ck`, without `!`), and `below`: every
    name that is not a suffix itself but has suffix entries below it (`za` for `co.za`, `sch.uk`
    for `*.sch.uk`), with how many and the first of them in sorted order."""

    exact: frozenset[str]
    wild: frozenset[str]
    exceptions: frozenset[str]
    below: Mapping[str, tuple[int, str]]

    def contains(self, name: str) -> bool:
        if name in self.exceptions:
            return False
        if name in self.exact:
            return True
        parent = name.partition(".")[2]
        return bool(parent) and parent in self.wild


# tldextract's bundled Public Suffix List, in the PSL's own text format, parsed the way
# tldextract.suffix_list parses it. Reading the file directly keeps `import tldextract` (and
# the requests/urllib3/filelock stack it pulls in for downloads Warden never makes) out of
# every start-up: ~0.15-0.2 s of `warden run` and `warden check`.
_SNAPSHOT_FILE = ".tld_set_snapshot"
_PRIVATE_SEPARATOR = "// ===BEGIN PRIVATE DOMAINS==="
_PSL_ENTRY = re.compile(r"^(?P<suffix>[.*!]*\w[\S]*)", re.UNICODE | re.MULTILINE)
# A list cut short must not load rules: every name it lost would pass for a registrable
# domain (`*.app` once the gTLD block is gone). Sizes with ~15% margin below the 2025 list's
# 6,871 / 2,882 entries, and names from the start, middle and end of each block (ccTLDs, then
# gTLDs alphabetically; private entries by company): a cut loses at most the last few gTLDs
# after `zone`, or the private entries after `vercel.app` (warnings only).
_ICANN_MIN, _PRIVATE_MIN = 6000, 2000
_ICANN_SENTINELS = frozenset({"com", "net", "org", "uk", "co.uk", "jp", "co.za", "zw", "aaa", "app", "dev", "xyz", "zone"})
_PRIVATE_SENTINELS = frozenset({"cloudfront.net", "github.io", "herokuapp.com", "vercel.app"})


def _snapshot_text() -> str | None:
    spec = importlib.util.find_spec("tldextract")  # locates the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            return (Path(folder) / _SNAPSHOT_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeError):
            continue
    return None


def _incomplete(icann: list[str], private: list[str]) -> str | None:
    """Why these lists look truncated or foreign, or None."""
    missing = sorted((_ICANN_SENTINELS - set(icann)) | (_PRIVATE_SENTINELS - set(private)))
    if len(icann) < _ICANN_MIN or len(private) < _PRIVATE_MIN or missing:
        return (f"the bundled Public Suffix List looks truncated ({len(icann)} ICANN and {len(private)} private "
                f"entries{'; missing ' + ', '.join(missing[:5]) if missing else ''})")
    return None


@lru_cache(maxsize=1)
def _read_suffix_lists() -> tuple[list[str], list[str]] | str:
    """(ICANN entries, private entries) of the bundled list, or why it cannot be used; through
    tldextract's own API when a future tldextract stops shipping the file where we look.
    Computed once, failure included: a broken list costs one read, not one per rule."""
    text = _snapshot_text()
    if text is not None:
        if _PRIVATE_SEPARATOR not in text:
            return "the bundled Public Suffix List has no private section: it looks truncated"
        public, _, private_text = text.partition(_PRIVATE_SEPARATOR)
        icann = [m.group("suffix") for m in _PSL_ENTRY.finditer(public)]
        private = [m.group("suffix") for m in _PSL_ENTRY.finditer(private_text)]
    else:
        try:
            lists = _extractor()._get_tld_extractor()
        except Exception as e:  # tldextract absent or its snapshot unreadable: no list at all
            return f"tldextract could not read its bundled Public Suffix List ({e.__class__.__name__})"
        icann = list(lists.tlds_excl_private)
        known = set(icann)
        private = [t for t in lists.tlds_incl_private if t not in known]
    # tldextract checks nothing either: a short list must not load rules (red teams 30, 31)
    return _incomplete(icann, private) or (icann, private)


def _suffix_lists() -> tuple[list[str], list[str]]:
    lists = _read_suffix_lists()
    if isinstance(lists, str):
        raise SuffixListError(f"{lists}; reinstall tldextract (pip install --force-reinstall tldextract) "
                              "and restart Warden")
    return lists


def _suffix_rules(tlds: Iterable[str]) -> SuffixRules:
    entries = [_ascii(t) for t in tlds]
    exact = frozenset(t for t in entries if not t.startswith(("*.", "!")))
    wild = frozenset(t[2:] for t in entries if t.startswith("*."))
    exceptions = frozenset(t[1:] for t in entries if t.startswith("!"))
    counts: dict[str, list[Any]] = {}
    for entry in sorted(entries):  # sorted: the entry an error names is the same on every run
        if entry.startswith("!"):
            continue  # an exception is a registrable name, no suffix
        name = "x." + entry[2:] if entry.startswith("*.") else entry  # `*.sch.uk`: suffixes below sch.uk itself
        labels = name.split(".")
        for i in range(1, len(labels)):
            seen = counts.setdefault(".".join(labels[i:]), [0, entry])
            seen[0] += 1
    rules = SuffixRules(exact, wild, exceptions, {})
    below = {name: (n, first) for name, (n, first) in counts.items() if not rules.contains(name)}
    return SuffixRules(exact, wild, exceptions, below)


@lru_cache(maxsize=1)
def _icann_rules() -> SuffixRules:
    """The ICANN section as sets, so that checking 100,000 rule hosts is a few set lookups
    each instead of an extract() call."""
    return _suffix_rules(_suffix_lists()[0])


@lru_cache(maxsize=1)
def _private_suffix_rules() -> SuffixRules:
    """The PSL's private section (`github.io`, `s3.amazonaws.com`), from the same snapshot."""
    return _suffix_rules(_suffix_lists()[1])


def is_public_suffix(name: str) -> bool:
    """True for a name that is itself an ICANN public suffix: "com", "co.uk", "x.ck"."""
    return _icann_rules().contains(name)


def public_suffixes_below(name: str) -> tuple[int, str] | None:
    """For a name that is no ICANN suffix itself but has some below it, (how many list entries,
    the first): "za" (co.za, ...), "sch.uk" (`*.sch.uk`), "nordland.no". `*.name` or
    `domain: name` covers registrants of those suffixes, as `*.co.uk` does. Else None."""
    return _icann_rules().below.get(name)


def is_private_suffix(name: str) -> bool:
    """True for a name listed in the private section of the Public Suffix List."""
    return _private_suffix_rules().contains(name)


def private_suffixes_below(name: str) -> tuple[int, str] | None:
    """As public_suffixes_below, for the private section: "amazonaws.com" (s3.amazonaws.com, ...)."""
    return _private_suffix_rules().below.get(name)


def split_authority(value: str, default_port: int) -> tuple[str, int]:
    """"host:port" / "[v6]:port" / "host" -> (host, port). Raises ValueError."""
    value = value.strip()
    if value.startswith("["):
        end = value.index("]")
        host, rest = value[1:end], value[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if value.count(":") == 1:
        host, port = value.rsplit(":", 1)
        return host, int(port)
    return value, default_port


def authority_names(authority: str, host: str, port: int) -> bool:
    """Does an authority (Host header, :authority, absolute-form target) name `host` (canonical)
    and `port`? Anything unparsable: no."""
    try:
        name, authority_port = split_authority(authority, port)
        return normalize_host(name) == host and authority_port == port
    except (ValueError, HostError):
        return False
