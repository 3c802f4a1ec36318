"""Lookup structures whose cost does not grow with the number of rules.

HostIndex: exact names in one dict; wildcard and domain rules in a second dict keyed by
their base name. A lookup probes the host itself and each parent suffix ("a.b.c", "b.c",
"c"): cost is the number of labels in the host, whatever the number of rules.

CidrIndex: networks grouped by prefix length, each group a dict from the masked network
integer to its entries. A lookup masks the address once per prefix length present (at
most 33 for IPv4, 129 for IPv6): cost independent of the number of networks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .hostnames import IPAddress
from .model import IPNetwork, TargetKind

_EMPTY: list[Any] = []  # shared empty result; never mutated


class HostIndex[T]:
    """Maps host patterns (exact, wildcard, domain) to entries. Built once, then read-only."""

    __slots__ = ("_exact", "_suffix", "size")

    def __init__(self) -> None:
        self._exact: dict[str, list[T]] = {}
        # base -> [(matches_apex, entry)]; wildcards do not match their apex, domains do.
        self._suffix: dict[str, list[tuple[bool, T]]] = {}
        self.size = 0

    def add(self, kind: TargetKind, value: str, entry: T) -> None:
        self.size += 1
        if kind is TargetKind.HOST:
            self._exact.setdefault(value, []).append(entry)
        elif kind in (TargetKind.WILDCARD, TargetKind.DOMAIN):
            self._suffix.setdefault(value, []).append((kind is TargetKind.DOMAIN, entry))
        else:
            raise ValueError(f"HostIndex does not hold {kind} targets")

    def lookup(self, host: str) -> list[T]:
        """Every entry whose pattern matches `host` (a normalised name), exact ones first.

        The returned list may be the index's own: callers read it, never change it.
        """
        exact = self._exact.get(host)
        suffix = self._suffix
        if not suffix:
            return exact or _EMPTY
        found: list[T] = list(exact) if exact else []
        entries = suffix.get(host)
        if entries:
            found.extend(entry for matches_apex, entry in entries if matches_apex)
        dot = host.find(".")
        while dot != -1:  # parent suffixes, without building a list of them
            entries = suffix.get(host[dot + 1 :])
            if entries:
                found.extend(entry for _apex, entry in entries)
            dot = host.find(".", dot + 1)
        return found

    def __bool__(self) -> bool:
        return self.size > 0


class CidrIndex[T]:
    """Maps IP networks to entries; `lookup(ip)` returns the entries of every covering network."""

    __slots__ = ("_by_version", "size")

    def __init__(self) -> None:
        # version -> prefixlen -> masked network int -> entries
        self._by_version: dict[int, dict[int, dict[int, list[T]]]] = {4: {}, 6: {}}
        self.size = 0

    def add(self, network: IPNetwork, entry: T) -> None:
        self.size += 1
        by_len = self._by_version[network.version].setdefault(network.prefixlen, {})
        by_len.setdefault(int(network.network_address), []).append(entry)

    def lookup(self, ip: IPAddress) -> list[T]:
        found: list[T] = []
        bits = 32 if ip.version == 4 else 128
        value = int(ip)
        for prefixlen, networks in self._by_version[ip.version].items():
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen) if prefixlen else 0
            entries = networks.get(value & mask)
            if entries:
                found.extend(entries)
        return found

    def __iter__(self) -> Iterator[T]:
        for by_len in self._by_version.values():
            for networks in by_len.values():
                for entries in networks.values():
                    yield from entries

    def __bool__(self) -> bool:
        return self.size > 0
