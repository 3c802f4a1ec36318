"""Lookup structures whose cost does not grow with the number of rules.

HostIndex: two dicts. `here` maps a name to the entries that match that name itself (exact
rules for it, then domain rules for it: a domain matches its apex); `below` maps a name to
the entries that match every strict subdomain of it (wildcard and domain rules based on it,
in the order they were added). A lookup probes `here` once for the host and `below` for each
parent suffix ("a.b.c" -> "b.c", "c"): cost is the number of labels in the host, whatever the
number of rules. The result is exact rules, apex domains, then suffix rules from the nearest
parent outwards.

Why it is shaped like this (issue 17): at 100,000 rules the index is ~100 MB, so every
pointer followed on a lookup is a CPU-cache (and often TLB) miss, while the same lookups
against 10 rules hit the cache. So:
* values are tuples stored once and returned as they are (no list object plus a separate
  item array, no copy per lookup);
* parents are probed only at label counts that occur among `below` keys (rules never name a
  public suffix, so "com" or "co.uk" are usually skipped without touching the dict);
* a dict with many keys gets a bit filter in front of it: a small bytes object with one bit
  set per key, addressed by the key's `hash()`. A clear bit proves the name is not a key, so
  most probes for names without rules (the hosts of denied requests, parents such as
  "example.co.uk") never touch the large dict. A set bit only means "maybe": the dict
  decides, so the filter skips work but never changes an answer. At 16 bits per key about
  1 in 16 absent names passes it. Small dicts stay in cache and get no filter (testing a bit
  costs more than probing a cached dict). str hashes are salted per process, so a pickled
  index is rebuilt, not copied (`__reduce__`).

CidrIndex: networks grouped by prefix length, each group a dict from the masked network
integer to a tuple of its entries. A lookup masks the address once per prefix length
present (at most 33 for IPv4, 129 for IPv6): cost independent of the number of networks.

Both are filled with `add()` and frozen on the first lookup; the compiler builds them, then
only reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .hostnames import IPAddress
from .model import IPNetwork, TargetKind

_FILTER_BITS_PER_KEY = 16
# Below this many keys a dict (and its key strings) stays in the CPU cache: no filter.
FILTER_MIN_KEYS = 8192


class _Table[V]:
    """A frozen dict plus, when it is large, a bit filter of its keys (see the module docstring)."""

    __slots__ = ("bitmap", "get", "items", "mask")

    def __init__(self, items: dict[str, V]) -> None:
        self.items = items
        self.get = items.get  # bound once: one attribute load per probe
        self.mask = 0  # 0: no filter
        self.bitmap = b""
        if len(items) >= FILTER_MIN_KEYS:
            bits = 1 << 10
            while bits < len(items) * _FILTER_BITS_PER_KEY:
                bits <<= 1
            mask = bits - 1
            bitmap = bytearray(bits >> 3)
            for key in items:
                h = hash(key) & mask
                bitmap[h >> 3] |= 1 << (h & 7)
            self.bitmap, self.mask = bytes(bitmap), mask


class HostIndex[T]:
    """Maps host patterns (exact, wildcard, domain) to entries. Built once, then read-only."""

    __slots__ = ("_below", "_building", "_here", "_max_labels", "_min_labels", "size")

    def __init__(self) -> None:
        # While adding: name -> exact entries, name -> domain entries (they also match the
        # apex, after the exact ones), name -> subdomain entries (wildcards and domains).
        self._building: tuple[dict[str, list[T]], dict[str, list[T]], dict[str, list[T]]] | None = ({}, {}, {})
        self._here: _Table[tuple[T, ...]] = _Table({})
        self._below: _Table[tuple[T, ...]] = _Table({})
        # label counts of `below` keys: parents outside [min, max] are not probed
        self._min_labels = 1
        self._max_labels = 0
        self.size = 0

    def add(self, kind: TargetKind, value: str, entry: T) -> None:
        if self._building is None:
            raise RuntimeError("HostIndex is frozen: it was already read")
        exact, apex, below = self._building
        if kind is TargetKind.HOST:
            exact.setdefault(value, []).append(entry)
        elif kind is TargetKind.DOMAIN:
            apex.setdefault(value, []).append(entry)
            below.setdefault(value, []).append(entry)
        elif kind is TargetKind.WILDCARD:
            below.setdefault(value, []).append(entry)
        else:
            raise ValueError(f"HostIndex does not hold {kind} targets")
        self.size += 1

    def freeze(self) -> None:
        """Build the read-only tables (the compiler calls this; a first lookup would too)."""
        if self._building is None:
            return
        exact, apex, below = self._building
        here = {name: tuple(entries) for name, entries in exact.items()}
        for name, entries in apex.items():
            here[name] = (*here.get(name, ()), *entries)
        self._install(here, {name: tuple(entries) for name, entries in below.items()})

    def _install(self, here: dict[str, tuple[T, ...]], below: dict[str, tuple[T, ...]]) -> None:
        self._here, self._below = _Table(here), _Table(below)
        labels = [name.count(".") + 1 for name in below]
        self._min_labels, self._max_labels = (min(labels), max(labels)) if labels else (1, 0)
        self._building = None

    def match(self, host: str) -> tuple[T, ...]:
        """Every entry whose pattern matches `host` (a normalised name), exact ones first.

        The hot path of `decide`: a tuple, usually one stored in the index.
        """
        if self._building is not None:
            self.freeze()
        table = self._here
        mask = table.mask
        if mask:
            h = hash(host) & mask
            found = table.get(host, ()) if table.bitmap[h >> 3] >> (h & 7) & 1 else ()
        else:
            found = table.get(host, ())
        labels = host.count(".")  # labels of the first parent
        if labels < self._min_labels:
            return found
        table = self._below
        mask = table.mask
        max_labels = self._max_labels
        dot = host.find(".")
        while dot != -1:  # parent suffixes, without building a list of them
            if labels <= max_labels:
                parent = host[dot + 1 :]
                if mask:
                    h = hash(parent) & mask
                    entries = table.get(parent) if table.bitmap[h >> 3] >> (h & 7) & 1 else None
                else:
                    entries = table.get(parent)
                if entries:
                    found = found + entries if found else entries
            labels -= 1
            if labels < self._min_labels:
                break
            dot = host.find(".", dot + 1)
        return found

    def lookup(self, host: str) -> list[T]:
        """`match` as a new list."""
        return list(self.match(host))

    def __bool__(self) -> bool:
        return self.size > 0

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its entries: a filter depends on this process's str hash salt.
        if self._building is not None:
            self.freeze()
        return (_rebuild_host_index, (self._here.items, self._below.items, self.size))


def _rebuild_host_index(here: dict[str, tuple[Any, ...]], below: dict[str, tuple[Any, ...]],
                        size: int) -> HostIndex[Any]:
    index: HostIndex[Any] = HostIndex()
    index._install(here, below)
    index.size = size
    return index


class CidrIndex[T]:
    """Maps IP networks to entries; `lookup(ip)` returns the entries of every covering network."""

    __slots__ = ("_building", "_groups", "size")

    def __init__(self) -> None:
        # version -> prefixlen -> masked network int -> entries, while adding
        self._building: dict[int, dict[int, dict[int, list[T]]]] | None = {4: {}, 6: {}}
        # version -> ((mask, masked network int -> entries), ...) in the order prefix lengths
        # were first added
        self._groups: dict[int, tuple[tuple[int, dict[int, tuple[T, ...]]], ...]] = {4: (), 6: ()}
        self.size = 0

    def add(self, network: IPNetwork, entry: T) -> None:
        if self._building is None:
            raise RuntimeError("CidrIndex is frozen: it was already read")
        by_len = self._building[network.version].setdefault(network.prefixlen, {})
        by_len.setdefault(int(network.network_address), []).append(entry)
        self.size += 1

    def freeze(self) -> None:
        """Build the read-only tables (the compiler calls this; a first lookup would too)."""
        if self._building is None:
            return
        for version, by_len in self._building.items():
            bits = 32 if version == 4 else 128
            self._groups[version] = tuple(
                (((1 << prefixlen) - 1) << (bits - prefixlen), {net: tuple(e) for net, e in networks.items()})
                for prefixlen, networks in by_len.items()
            )
        self._building = None

    def match(self, ip: IPAddress) -> tuple[T, ...]:
        """Entries of every network covering `ip`; the hot path of `decide`."""
        if self._building is not None:
            self.freeze()
        found: tuple[T, ...] = ()
        value = int(ip)
        for mask, networks in self._groups[ip.version]:
            entries = networks.get(value & mask)
            if entries:
                found = found + entries if found else entries
        return found

    def lookup(self, ip: IPAddress) -> list[T]:
        """`match` as a new list."""
        return list(self.match(ip))

    def __iter__(self) -> Iterator[T]:
        if self._building is not None:
            self.freeze()
        for groups in self._groups.values():
            for _mask, networks in groups:
                for entries in networks.values():
                    yield from entries

    def __bool__(self) -> bool:
        return self.size > 0
