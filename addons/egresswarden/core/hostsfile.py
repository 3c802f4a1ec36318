"""Parse an /etc/hosts-format file (squid's `hosts_file`): names pinned before DNS."""

from __future__ import annotations

from pathlib import Path

from .errors import RuleError
from .hostnames import HostError, IPAddress, normalize_host, parse_ip


def parse_hosts_file(path: Path) -> dict[str, tuple[IPAddress, ...]]:
    """name -> addresses, in file order. Raises RuleError with the line of a bad entry."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(path, 0, f"cannot read hosts file: {e}") from None
    table: dict[str, list[IPAddress]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        ip = parse_ip(fields[0])
        if ip is None or len(fields) < 2:
            raise RuleError(path, lineno, f"expected 'ADDRESS NAME...', got {line.strip()!r}")
        for name in fields[1:]:
            try:
                table.setdefault(normalize_host(name), []).append(ip)
            except HostError as e:
                raise RuleError(path, lineno, f"invalid host name {name!r}: {e}") from None
    return {name: tuple(addrs) for name, addrs in table.items()}
