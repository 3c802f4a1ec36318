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
  public suffix, so "com" or "co.uk" are usually skipped without touching the dict).
A bit filter in front of the large dicts (skip the probe when a bit of `hash(name)` is
clear) was measured and removed: it saved 1.2 misses per decision at 100,000 rules but cost
3,400 instructions (`hash()` and bit arithmetic are slow in Python), a net loss.

CidrIndex: networks grouped by prefix length, each group a dict from the masked network
integer to a tuple of its entries. A lookup masks the address once per prefix length
present (at most 33 for IPv4, 129 for IPv6): cost independent of the number of networks.

Both are filled with `add()` and frozen on the first lookup; the compiler builds them, then
only reads them.
"""

from __future__ import annotations

from collections.abc import Iterator

from .hostnames import IPAddress
from .model import IPNetwork, TargetKind


class HostIndex[T]:
    """Maps host patterns (exact, wildcard, domain) to entries. Built once, then read-only."""

    __slots__ = ("_below", "_building", "_here", "_max_labels", "_min_labels", "size")

    def __init__(self) -> None:
        # While adding: name -> exact entries, name -> domain entries (they also match the
        # apex, after the exact ones), name -> subdomain entries (wildcards and domains).
        self._building: tuple[dict[str, list[T]], dict[str, list[T]], dict[str, list[T]]] | None = ({}, {}, {})
        self._here: dict[str, tuple[T, ...]] = {}
        self._below: dict[str, tuple[T, ...]] = {}
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
        self._here, self._below = here, below
        labels = [name.count(".") + 1 for name in below]
        self._min_labels, self._max_labels = (min(labels), max(labels)) if labels else (1, 0)
        self._building = None

    def match(self, host: str) -> tuple[T, ...]:
        """Every entry whose pattern matches `host` (a normalised name), exact ones first.

        The hot path of `decide`: a tuple, usually one stored in the index.
        """
        if self._building is not None:
            self.freeze()
        found = self._here.get(host, ())
        labels = host.count(".")  # labels of the first parent
        min_labels = self._min_labels
        if labels < min_labels:
            return found
        below, max_labels = self._below, self._max_labels
        dot = host.find(".")
        while dot != -1:  # parent suffixes, without building a list of them
            if labels <= max_labels:
                entries = below.get(host[dot + 1 :])
                if entries:
                    found = found + entries if found else entries
            labels -= 1
            if labels < min_labels:
                break
            dot = host.find(".", dot + 1)
        return found

    def lookup(self, host: str) -> list[T]:
        """`match` as a new list."""
        return list(self.match(host))

    def __bool__(self) -> bool:
        return self.size > 0


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
