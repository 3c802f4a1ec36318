"""Address classification for the SSRF guard.

An address is "private" (not reachable on the public internet) if Python's `is_global`
says so, or if it is one of the forms that smuggle a private IPv4 address inside an IPv6
one: IPv4-mapped (::ffff:10.0.0.1), NAT64 (64:ff9b::/96 with a private v4 inside, which
Python 3.11/3.12 report as global), local-use NAT64 (64:ff9b:1::/48), 6to4 and Teredo.
"""

from __future__ import annotations

import ipaddress

from .hostnames import IPAddress

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")


def is_private_address(ip: IPAddress) -> bool:
    """True if `ip` must not be reached unless a cidr allow rule covers it."""
    if ip.version == 6:
        assert isinstance(ip, ipaddress.IPv6Address)
        if ip.ipv4_mapped is not None:
            return is_private_address(ip.ipv4_mapped)
        if ip in _NAT64:
            return is_private_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip in _NAT64_LOCAL or ip in _TEREDO:
            return True
        if ip in _SIX_TO_FOUR:
            return is_private_address(ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF))
    return (
        not ip.is_global
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or ip.is_loopback
        or ip.is_link_local
    )
