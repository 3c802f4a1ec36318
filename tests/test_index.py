"""HostIndex / CidrIndex against a naive reference matcher (issue 17: the packed, filtered index
must give the same entries in the same order as a scan over every rule)."""

from __future__ import annotations

import ipaddress
import pickle
import random

import pytest
from egresswarden.core import index as index_module
from egresswarden.core.index import CidrIndex, HostIndex
from egresswarden.core.model import TargetKind


def reference(rules: list[tuple[TargetKind, str, int]], host: str) -> list[int]:
    """Exact rules, then apex domains, then suffix rules from the nearest parent outwards."""
    exact = [e for k, v, e in rules if k is TargetKind.HOST and v == host]
    apex = [e for k, v, e in rules if k is TargetKind.DOMAIN and v == host]
    below: list[int] = []
    labels = host.split(".")
    for i in range(1, len(labels)):
        parent = ".".join(labels[i:])
        below += [e for k, v, e in rules if k in (TargetKind.WILDCARD, TargetKind.DOMAIN) and v == parent]
    return exact + apex + below


def random_rules(rng: random.Random, n: int) -> list[tuple[TargetKind, str, int]]:
    # few label values, so names nest (a.b.example under b.example); a numbered label at
    # large n, so there are enough distinct keys for the filters
    names = [".".join(rng.choice(["a", "b", "c", "api", "x1"]) for _ in range(rng.randint(1, 4)))
             + (f".n{rng.randrange(n)}" if n > 1000 and rng.random() < 0.8 else "") + ".example"
             for _ in range(max(4, n if n > 1000 else n // 2))]
    kinds = [TargetKind.HOST, TargetKind.WILDCARD, TargetKind.DOMAIN]
    return [(rng.choice(kinds), rng.choice(names), i) for i in range(n)]


@pytest.mark.parametrize("n", [5, 300, index_module.FILTER_MIN_KEYS * 3], ids=["tiny", "small", "filtered"])
def test_host_index_matches_reference(n: int) -> None:
    rng = random.Random(n)
    rules = random_rules(rng, n)
    index: HostIndex[int] = HostIndex()
    for kind, value, entry in rules:
        index.add(kind, value, entry)
    index.freeze()
    if n >= index_module.FILTER_MIN_KEYS:
        assert index._here.mask or index._below.mask, "large tables must be filtered"
    names = sorted({v for _, v, _ in rules})
    queries = names + ["zz." + v for v in names[:200]] + ["q.r." + v for v in names[:200]] + ["example", "nope.org"]
    # reference() scans every rule: keep the large case to a sample of queries
    for host in queries if n < 1000 else rng.sample(queries, 100):
        assert list(index.match(host)) == reference(rules, host), host
        assert index.lookup(host) == reference(rules, host)


def test_host_index_pickles_with_a_rebuilt_filter() -> None:
    index: HostIndex[int] = HostIndex()
    for i in range(index_module.FILTER_MIN_KEYS + 10):
        index.add(TargetKind.HOST, f"h{i}.example", i)
        index.add(TargetKind.WILDCARD, f"w{i}.example", -i)
    copy = pickle.loads(pickle.dumps(index))
    assert copy.match("h7.example") == (7,) and copy.match("a.w7.example") == (-7,)
    assert copy.size == index.size


def test_frozen_index_refuses_adds() -> None:
    index: HostIndex[int] = HostIndex()
    index.add(TargetKind.HOST, "a.example", 1)
    assert index.match("a.example") == (1,)
    with pytest.raises(RuntimeError):
        index.add(TargetKind.HOST, "b.example", 2)


def test_cidr_index_matches_reference() -> None:
    rng = random.Random(7)
    nets = [ipaddress.ip_network((rng.getrandbits(32) & ~((1 << (32 - p)) - 1), p)) for p in
            [rng.choice([0, 8, 16, 24, 32]) for _ in range(500)]]
    nets += [ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("::/0")]
    index: CidrIndex[int] = CidrIndex()
    for i, net in enumerate(nets):
        index.add(net, i)
    for ip in [ipaddress.ip_address(rng.getrandbits(32)) for _ in range(300)] + [
            nets[3].network_address, ipaddress.ip_address("2001:db8::1")]:
        by_len: dict[int, list[int]] = {}
        for i, net in enumerate(nets):
            if net.version == ip.version and ip in net:
                by_len.setdefault(net.prefixlen, []).append(i)
        # groups in the order their prefix length was first added, entries in add order
        order = list(dict.fromkeys(n.prefixlen for n in nets if n.version == ip.version))
        expected = [e for p in order for e in by_len.get(p, [])]
        assert list(index.match(ip)) == expected
    assert sorted(index) == list(range(len(nets)))
