"""`warden log [--follow] [FILTERS] [AUDIT_FILE...]`: the audit log as people read it.

One line per event (time, agent, decision, what was asked, reason, rule); denials in red and
report-mode verdicts in yellow when stdout is a terminal (never in a pipe; `NO_COLOR` is
respected). Reads audit files, rotated and `.gz` files, worker chains (merged by time), a
captured stdout stream with log-shipper prefixes, or stdin (`-`). Without files it reads
`audit.jsonl` and its rotated siblings in the current directory.

`--follow` keeps reading the live files the way `tail -F` does: when the writer renames
`audit.jsonl` to `audit.jsonl.<time>` and starts a new file, the rest of the old file is read
and the new one followed from its start, so no record is lost or shown twice across a
rotation. Bookkeeping records (`chain_start`, `checkpoint`) are hidden unless `--event`
names them; record types this version does not know are shown in a generic form.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import heapq
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from egresswarden.cli.auditread import ROTATED, Reader, chain_order, parse_line, quiet_broken_pipe

BOOKKEEPING = frozenset({"chain_start", "checkpoint"})
POLL_SECONDS = 0.1
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
RED, YELLOW, DIM, RESET = "\x1b[1;31m", "\x1b[33m", "\x1b[2m", "\x1b[0m"


def parse_time(value: str) -> str:
    """--since/--until: '10m', '2h', '1d', '30s' ago, or an ISO 8601 time/date (UTC unless it
    says otherwise). Returned in the audit log's own format, so times compare as strings."""
    m = _RELATIVE.match(value.strip())
    if m:
        when = datetime.now(UTC) - timedelta(seconds=float(m[1]) * _UNITS[m[2]])
    else:
        try:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a time like 2026-12-01T10:00:00Z or 10m/2h/1d, got {value!r}") from None
        when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Filters:
    agents: frozenset[str]
    decisions: frozenset[str]
    hosts: tuple[str, ...]  # fnmatch patterns, lowercase
    reasons: frozenset[str]
    events: frozenset[str]
    since: str | None
    until: str | None

    def match(self, r: dict[str, Any]) -> bool:
        event = r.get("event")
        if self.events:
            if event not in self.events:
                return False
        elif event in BOOKKEEPING:
            return False
        if self.agents and r.get("agent") not in self.agents:
            return False
        if self.decisions and r.get("decision") not in self.decisions:
            return False
        if self.reasons and r.get("reason") not in self.reasons:
            return False
        if self.hosts:
            host = str(r.get("host") or "").lower()
            if not any(fnmatch.fnmatchcase(host, p) for p in self.hosts):
                return False
        t = str(r.get("time") or "")
        if self.since and t < self.since:
            return False
        return not (self.until and t > self.until)


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    if n < 1000:
        return f"{n}B"
    value = float(n)
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000 or unit == "GB":
            break
    return f"{value:.1f}{unit}"


def format_record(r: dict[str, Any], color: bool) -> str:
    """One human line for one record."""
    t = str(r.get("time") or "-")
    if len(t) > 23 and t.endswith("Z"):
        t = t[:23] + "Z"  # milliseconds are enough to read
    event = str(r.get("event"))
    agent = str(r.get("agent") or r.get("agent_claimed") or "-")
    decision = str(r.get("decision") or "")
    host, port = r.get("host"), r.get("port")
    authority = f"{host}:{port}" if host is not None and port is not None else str(host or "")
    if event == "connect":
        what = f"CONNECT {authority}"
        if r.get("interception") and decision != "deny":
            what += f" ({r['interception']})"
    elif event == "request":
        scheme = r.get("scheme") or "https"
        default = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
        what = f"{r.get('method')} {scheme}://{host if default else authority}{r.get('path') or ''}"
    elif event == "mcp":
        name = r.get("mcp_tool") or r.get("mcp_resource") or r.get("mcp_prompt") or ""
        what = f"MCP {r.get('mcp_method')} {name}".rstrip() + f" @{r.get('mcp_server')}"
    elif event == "tunnel_close":
        what = f"CLOSE {authority} up {_size(r.get('bytes_up'))} down {_size(r.get('bytes_down'))}"
        decision = decision or "allow"
    elif event == "reload":
        what = f"reload {r.get('result')} version {r.get('policy_version')}"
        if r.get("error"):
            what += f": {str(r['error']).splitlines()[0][:200]}"
    elif event in ("startup", "shutdown"):
        what = f"{event} pid {r.get('pid')}" + (f" version {r['policy_version']}" if r.get("policy_version") else "")
    elif event == "alert":
        what = f"alert {r.get('kind')}: {r.get('summary')}"
    elif event == "connections_refused":
        clients = ",".join(str(c.get("client_ip")) for c in r.get("clients") or [])
        what = (f"refused {r.get('refused')} at accept, evicted {r.get('evicted')} "
                f"(warden_max_connections {r.get('max_connections')}) from {clients or '-'}")
    else:
        what = event
    reason = r.get("reason")
    tail = ""
    if reason and reason != "allowed":
        tail += f"  {reason}"
    if r.get("rule_id"):
        tail += f"  rule={r['rule_id']}"
    if r.get("credential_ids"):
        tail += f"  credentials={','.join(r['credential_ids'])}"
    if r.get("events"):
        tail += f"  events={','.join(map(str, r['events']))}"
    label = decision.upper() if decision else event.upper()
    line = f"{t}  {agent:<12} {label:<6}  {what}{tail}"
    if not color:
        return line
    if decision == "deny":
        return f"{RED}{line}{RESET}"
    if decision == "report":
        return f"{YELLOW}{line}{RESET}"
    if event not in ("connect", "request", "mcp", "tunnel_close"):
        return f"{DIM}{line}{RESET}"
    return line


class Follower:
    """Reads one live audit file as it grows, across rotation (rename + new file) and truncation."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file: IO[bytes] | None = None
        self.identity: tuple[int, int] | None = None
        self.partial = b""

    def _open(self) -> None:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - held across polls, closed on rotation or close()
        except FileNotFoundError:
            return
        st = os.fstat(f.fileno())
        self.file, self.identity, self.partial = f, (st.st_dev, st.st_ino), b""

    def _drain(self) -> list[bytes]:
        assert self.file is not None
        data = self.file.read()
        if not data:
            return []
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()  # an incomplete last line waits for its newline
        return [line for line in lines if line.strip()]

    def read(self) -> list[bytes]:
        """Complete new lines since the last call."""
        if self.file is None:
            self._open()
            if self.file is None:
                return []
        out = self._drain()
        st: os.stat_result | None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        current = (st.st_dev, st.st_ino) if st is not None else None
        if current != self.identity:
            out += self._drain()  # the rest of the rotated file: written before the rename
            if self.partial.strip():
                out.append(self.partial)
            self.file.close()
            self.file = None
            held = self.identity
            # Open before listing what was rotated in between: the writer may rotate again
            # between the stat above and this open, and the file `current` named is then one
            # of the rotated ones (anchoring on it lost its lines under load).
            self._open()
            out += self._rotated_since(held, self.identity if self.file is not None else None)
            if self.file is not None:
                out += self._drain()
        elif st is not None and st.st_size < self.file.tell():
            self.file.seek(0)  # truncated in place (copytruncate): start again
            self.partial = b""
        return out

    def _rotated_since(self, held: tuple[int, int] | None, current: tuple[int, int] | None) -> list[bytes]:
        """Whole files rotated out after the one we held and before the current one.

        A busy proxy can rotate more than once between two polls: the file we held is now
        `audit.jsonl.<stamp1>`, and `<stamp2>`... were created, filled and rotated while we
        slept. Their stamps sort in rotation order."""
        live = Path(self.path)
        siblings = []
        for p in live.parent.glob(live.name + ".*"):
            m = ROTATED.match(p.name)
            if m is None or m["base"] != live.name or p.name.endswith(".gz"):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            siblings.append((m["stamp"], (st.st_dev, st.st_ino), p))
        siblings.sort()
        at = next((i for i, (_, ident, _) in enumerate(siblings) if ident == held), None)
        if at is None:
            return []  # the held file is gone (deleted or compressed): nothing to anchor on
        out: list[bytes] = []
        for _, ident, p in siblings[at + 1:]:
            if ident == current:
                break
            with contextlib.suppress(FileNotFoundError):
                out += [line for line in p.read_bytes().split(b"\n") if line.strip()]
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def default_files() -> list[str]:
    base = Path("audit.jsonl")
    return [str(p) for p in sorted(Path(".").glob(base.name + ".*")) if ROTATED.match(p.name)] + [str(base)]


def _is_live(path: str) -> bool:
    return path != "-" and not path.endswith(".gz") and ROTATED.match(Path(path).name) is None


Item = tuple[str, bytes, dict[str, Any]]  # (time, JSON bytes, record)


def _parsed(lines: Iterable[bytes], filters: Filters) -> Iterator[Item]:
    for raw in lines:
        parsed = parse_line(raw)
        if parsed is not None and filters.match(parsed[1]):
            yield str(parsed[1].get("time") or ""), parsed[0], parsed[1]


def history(paths: list[str], filters: Filters, followers: dict[str, Follower], reader: Reader) -> Iterator[Item]:
    """Everything already written, each chain in order, chains merged by time."""
    chains: dict[str, list[str]] = {}
    for path in chain_order(paths):
        m = ROTATED.match(Path(path).name)
        base = str(Path(path).with_name(m["base"])) if m else path
        chains.setdefault(base, []).append(path)

    def chain(files: list[str]) -> Iterator[Item]:
        for path in files:
            if path in followers:
                yield from _parsed(followers[path].read(), filters)
            else:
                yield from _parsed((raw for _, _, raw in reader.raw_lines_of(path)), filters)

    streams = [chain(files) for files in chains.values()]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda item: item[0])


def cmd_log(args: argparse.Namespace) -> int:
    filters = Filters(frozenset(args.agent or ()), frozenset(args.decision or ()),
                      tuple(h.lower() for h in args.host or ()), frozenset(args.reason or ()),
                      frozenset(args.event or ()), args.since, args.until)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    paths = args.files or default_files()
    missing = [p for p in paths if p != "-" and not os.path.exists(p) and not args.follow]
    if missing:
        print(f"warden: no such audit file: {', '.join(missing)}", file=sys.stderr)
        return 1
    followers = {p: Follower(p) for p in paths if args.follow and _is_live(p)}
    reader = Reader([])

    def show(item: Item) -> None:
        print(item[1].decode("utf-8", "replace") if args.json else format_record(item[2], color))

    with quiet_broken_pipe():
        items: Iterable[Item] = history(paths, filters, followers, reader)
        if args.tail is not None:
            items = deque(items, maxlen=args.tail)
        for item in items:
            show(item)
        sys.stdout.flush()
        if not followers:
            for error in reader.errors:
                print(f"warden: {error}", file=sys.stderr)
            return 1 if reader.errors else 0
        try:
            while True:
                shown = False
                for follower in followers.values():
                    for item in _parsed(follower.read(), filters):
                        show(item)
                        shown = True
                if shown:
                    sys.stdout.flush()
                else:
                    time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            return 0
        finally:
            for follower in followers.values():
                follower.close()
    return 0


def add_cli(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    log = sub.add_parser("log", help="show the audit log one line per event (filters, --follow across rotation)")
    log.add_argument("files", nargs="*", metavar="AUDIT_FILE",
                     help="audit files, rotated/.gz files, worker chains, a captured stream, or '-' for stdin "
                          "(default: audit.jsonl and its rotated files)")
    log.add_argument("-f", "--follow", action="store_true", help="keep showing new records, across rotation")
    log.add_argument("--agent", action="append", metavar="ID", help="only this agent (repeatable)")
    log.add_argument("--decision", action="append", choices=("allow", "deny", "report"), help="repeatable")
    log.add_argument("--host", action="append", metavar="PATTERN", help="host or glob like '*.github.com' (repeatable)")
    log.add_argument("--reason", action="append", metavar="CODE", help="reason code, e.g. path_not_allowed (repeatable)")
    log.add_argument("--event", action="append", metavar="EVENT",
                     help="record type: connect, request, mcp, tunnel_close, reload, ... (repeatable)")
    log.add_argument("--since", type=parse_time, metavar="TIME", help="ISO time or 10m / 2h / 1d ago")
    log.add_argument("--until", type=parse_time, metavar="TIME", help="ISO time or 10m / 2h / 1d ago")
    log.add_argument("--tail", type=int, metavar="N", help="only the last N matching records before following")
    log.add_argument("--json", action="store_true", help="print the matching records as they are (JSON Lines)")
    log.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                     help="highlight denials (auto: only on a terminal)")
    log.set_defaults(func=cmd_log)
