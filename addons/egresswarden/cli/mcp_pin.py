"""`warden mcp pin`: approve the definitions (canonical sha256) of an MCP server's tools.

    warden mcp pin --rules rules/ --server files                 # stdio server: started as declared
    warden mcp pin --rules rules/ --server github                # HTTP server: its declared url
    warden mcp pin --rules rules/ --server github --url https://mcp.example.com/mcp
    warden mcp pin --rules rules/ --server github --from-file tools-list.json [--tool NAME ...]
    ... --dry-run                                                # show the diff, write nothing

Before writing, prints what changes against the pins in force (rule pins, else pins learned
in the durable store): new tools, unchanged ones, removed ones, and for a changed tool a
diff of its description, inputSchema, outputSchema and annotations (the previous definition
comes from the pin store, which keeps every definition Warden saw). Then writes (atomically)
`<rules>/mcp-pins.yaml` with `mcp_pins: {server: {tool: sha256}}`, keeping the pins of
other servers; Warden reloads it like any rule file, so a tool blocked as changed
(`mcp_tool_changed`) or unpinned (`mcp_tool_unpinned`) is unblocked once its pin matches.

Sources: a stdio server (`command:`) is started exactly as `warden mcp stdio` would start it
(env, `${secret:...}`, cwd, sandbox profile), initialized, listed (every page) and stopped.
An HTTP server is listed directly (not through Warden), its name resolved the way Warden
resolves it (settings.hosts_file first, then DNS), optionally with `--header 'Name: value'`
and `--ca-file`. `--from-file` takes a captured tools/list response, its result, a list of
tools, or a list of responses (one per page).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from egresswarden.cli.common import load_or_report
from egresswarden.core.errors import WardenError
from egresswarden.core.hostnames import normalize_host, parse_ip
from egresswarden.core.mcp import PINNED_FIELDS, pinned_definition, tool_hash
from egresswarden.core.model import McpServer
from egresswarden.core.ruleset import RuleSet
from egresswarden.runtime import pinstore

PINS_FILE = "mcp-pins.yaml"


def _tools_from_json(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        if all(isinstance(t, dict) and "name" in t and "jsonrpc" not in t for t in data):
            return list(data)
        return [t for item in data for t in _tools_from_json(item)]
    if isinstance(data, dict):
        if isinstance(data.get("result"), dict):
            data = data["result"]
        if isinstance(data.get("tools"), list):
            return [t for t in data["tools"] if isinstance(t, dict) and isinstance(t.get("name"), str)]
    raise ValueError("no tools/list result found")


def _rpc_messages(response: Any) -> list[dict[str, Any]]:
    ctype = response.headers.get("content-type", "").split(";")[0].strip()
    if ctype == "text/event-stream":
        out = []
        for event in response.text.replace("\r\n", "\n").split("\n\n"):
            data = "\n".join(ln[5:].lstrip(" ") for ln in event.split("\n") if ln.startswith("data:"))
            if data:
                out.append(json.loads(data))
        return out
    if not response.content:
        return []
    body = response.json()
    return body if isinstance(body, list) else [body]


def resolved_url(url: str, rules: RuleSet | None) -> tuple[str, str | None]:
    """(url to connect to, original host name) with the host replaced by its hosts-file address.

    Warden's resolver consults settings.hosts_file before DNS; so does pinning, so that the
    definitions pinned are the ones the server Warden talks to serves."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if rules is None or parse_ip(host) is not None:
        return url, None
    try:
        addresses = rules.hosts_file.get(normalize_host(host))
    except Exception:  # not a valid name: let the HTTP client report it
        return url, None
    if not addresses:
        return url, None
    ip = str(addresses[0])
    netloc = f"[{ip}]" if ":" in ip else ip
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment)), host


def fetch_tools(url: str, headers: dict[str, str], ca_file: str | None, timeout: float = 30,
                rules: RuleSet | None = None) -> list[dict[str, Any]]:
    import httpx

    base = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", **headers}
    target, name = resolved_url(url, rules)
    extensions: dict[str, Any] = {}
    if name is not None:
        # Connect to the hosts-file address, but present and verify the real name (SNI, Host).
        base.setdefault("Host", name if not urlsplit(url).port else f"{name}:{urlsplit(url).port}")
        extensions["sni_hostname"] = name
    verify: Any = True
    if ca_file:
        import ssl
        verify = ssl.create_default_context(cafile=ca_file)
    with httpx.Client(timeout=timeout, verify=verify, trust_env=False) as client:
        def call(msg: dict[str, Any], extra: dict[str, str]) -> dict[str, Any] | None:
            r = client.post(target, json=msg, headers={**base, **extra}, extensions=extensions)
            r.raise_for_status()
            for m in _rpc_messages(r):
                if m.get("id") == msg.get("id"):
                    if "error" in m:
                        raise RuntimeError(f"{msg['method']} failed: {m['error']}")
                    session = r.headers.get("mcp-session-id")
                    if session:
                        extra["Mcp-Session-Id"] = session
                    result: dict[str, Any] | None = m.get("result")
                    return result
            return None

        extra: dict[str, str] = {}
        init = call({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "warden-mcp-pin", "version": "1"}}}, extra)
        if init and isinstance(init.get("protocolVersion"), str):
            extra["MCP-Protocol-Version"] = init["protocolVersion"]
        client.post(target, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                    headers={**base, **extra}, extensions=extensions)
        tools: list[dict[str, Any]] = []
        cursor = None
        for page in range(1, 1000):
            params: dict[str, Any] = {"cursor": cursor} if cursor else {}
            result = call({"jsonrpc": "2.0", "id": 1 + page, "method": "tools/list", "params": params}, extra)
            if result is None:
                raise RuntimeError("tools/list returned no result")
            tools += _tools_from_json(result)
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return tools


def write_pins(rules_dir: Path, server: str, pins: dict[str, str], only: list[str] | None = None) -> Path:
    path = rules_dir / PINS_FILE
    doc: dict[str, Any] = {}
    if path.exists():
        doc = yaml.safe_load(path.read_text()) or {}
    all_pins = doc.setdefault("mcp_pins", {})
    if only:
        current = all_pins.setdefault(server, {})
        current.update({k: v for k, v in pins.items() if k in only})
    else:
        all_pins[server] = dict(sorted(pins.items()))
    tmp = path.with_name(f".{PINS_FILE}.tmp")
    tmp.write_text("# Written by `warden mcp pin`: approved MCP tool definitions (sha256 of canonical JSON).\n"
                   + yaml.safe_dump(doc, sort_keys=True))
    os.replace(tmp, path)
    return path


async def _stdio_tools(rules: RuleSet, server: McpServer, timeout: float) -> list[dict[str, Any]]:
    """Start a declared stdio server (as `warden mcp stdio` would), list its tools, stop it."""
    from egresswarden.mcpstdio.framing import Oversized, dumps_line, read_lines
    from egresswarden.mcpstdio.launch import build_launch

    launch = build_launch(rules, server, agent="warden-mcp-pin")
    proc = await asyncio.create_subprocess_exec(*launch.argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, env=launch.env, cwd=launch.cwd,
                                                start_new_session=True)
    assert proc.stdin is not None and proc.stdout is not None
    lines = read_lines(proc.stdout)

    async def call(msg_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert proc.stdin is not None
        proc.stdin.write(dumps_line({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}))
        await proc.stdin.drain()
        async for line in lines:
            if isinstance(line, Oversized):
                continue
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if isinstance(msg, dict) and msg.get("id") == msg_id and "method" not in msg:
                    if "error" in msg or not isinstance(msg.get("result"), dict):
                        raise RuntimeError(f"{method} failed: {str(msg.get('error'))[:200]}")
                    result: dict[str, Any] = msg["result"]
                    return result
        raise RuntimeError(f"the server exited before answering {method}")

    async def talk() -> list[dict[str, Any]]:
        assert proc.stdin is not None
        await call(1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                     "clientInfo": {"name": "warden-mcp-pin", "version": "1"}})
        proc.stdin.write(dumps_line({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        tools: list[dict[str, Any]] = []
        cursor = None
        for page in range(1, 1000):
            result = await call(1 + page, "tools/list", {"cursor": cursor} if cursor else {})
            tools += _tools_from_json(result)
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return tools

    try:
        return await asyncio.wait_for(talk(), timeout)
    finally:
        with contextlib.suppress(Exception):
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 2)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, 9)
            await proc.wait()


def _pretty(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.splitlines() or [""]
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False).splitlines()


def definition_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Unified diffs of the pinned fields that differ (description, schemas, annotations)."""
    out: list[str] = []
    for key in PINNED_FIELDS:
        if key == "name" or old.get(key) == new.get(key):
            continue
        out += [f"    {line}" for line in difflib.unified_diff(_pretty(old.get(key)), _pretty(new.get(key)),
                                                             f"{key} (pinned)", f"{key} (now)", lineterm="")]
    return out


def describe_changes(server: str, tools: list[dict[str, Any]], current: dict[str, str],
                     store: pinstore.SqlitePins | None, only: list[str] | None) -> list[str]:
    """Human-readable lines: what writing these pins changes."""
    lines = []
    seen = set()
    for tool in sorted(tools, key=lambda t: str(t["name"])):
        name = tool["name"]
        if only and name not in only:
            continue
        seen.add(name)
        digest = tool_hash(tool)
        pinned = current.get(name)
        if pinned is None:
            lines.append(f"+ {name} (new) {digest}")
        elif pinned == digest:
            lines.append(f"= {name} (unchanged)")
        else:
            lines.append(f"~ {name} (changed) {pinned[:12]} -> {digest[:12]}")
            old = store.definition(pinned) if store is not None else None
            if old is None:
                lines.append("    previous definition not recorded; only its sha256 is known")
            else:
                lines += definition_diff(old, pinned_definition(tool))
    if not only:
        lines += [f"- {name} (no longer listed; its pin is dropped)" for name in sorted(set(current) - seen)]
    return lines


def cmd_pin(args: argparse.Namespace) -> int:
    rules_dir = Path(args.rules)
    if not rules_dir.is_dir():
        print(f"warden mcp pin: {rules_dir} is not a directory", file=sys.stderr)
        return 2
    rules = load_or_report(args.rules)
    server = next((s for s in rules.model.mcp_servers if s.id == args.server), None) if rules else None
    if not (args.url or args.from_file) and server is None:
        why = "the rules are invalid" if rules is None else f"no MCP server {args.server!r} is declared"
        print(f"warden mcp pin: {why}; give --url or --from-file", file=sys.stderr)
        return 2
    try:
        if args.from_file:
            tools = _tools_from_json(json.loads(Path(args.from_file).read_text()))
        elif args.url or (server is not None and server.stdio is None):
            headers = {}
            for h in args.header or ():
                name, _, value = h.partition(":")
                headers[name.strip()] = value.strip()
            url = args.url or (server.url if server is not None else "")
            tools = fetch_tools(url, headers, args.ca_file, rules=rules)
        else:
            assert rules is not None and server is not None
            tools = asyncio.run(_stdio_tools(rules, server, args.timeout))
    except (Exception, WardenError) as e:  # a readable one-line error, never a traceback with header values
        print(f"warden mcp pin: could not read the tools: {e.__class__.__name__}: {str(e)[:200]}", file=sys.stderr)
        return 1
    pins = {t["name"]: tool_hash(t) for t in tools}
    missing = [t for t in args.tool or () if t not in pins]
    if missing:
        print(f"warden mcp pin: server does not list {', '.join(missing)}", file=sys.stderr)
        return 1
    store = _open_store(rules)
    current = dict(store.learned_pins(args.server)) if store is not None else {}
    if rules is not None:
        current.update(rules.model.mcp_pins.get(args.server, {}))
    print(f"MCP server {args.server}: {len(tools)} tools")
    for line in describe_changes(args.server, tools, current, store, args.tool):
        print(line)
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    if store is not None:  # so that the next diff can show what this pin approved
        for tool in tools:
            with contextlib.suppress(Exception):
                store.remember(args.server, tool["name"], tool_hash(tool), pinned_definition(tool))
        store.close()
    path = write_pins(rules_dir, args.server, pins, args.tool)
    print(f"wrote {path}")
    return 0


def _open_store(rules: RuleSet | None) -> pinstore.SqlitePins | None:
    if rules is None:
        return None
    path = pinstore.store_path(rules)
    if not path.exists():
        return None
    try:
        return pinstore.SqlitePins(path)
    except Exception as e:
        print(f"warden mcp pin: pin store {path} unreadable ({e.__class__.__name__}); diff against rule pins only",
              file=sys.stderr)
        return None


def add_cli(sub: Any) -> None:
    """Register `pin` in the `warden mcp` group."""
    pin = sub.add_parser("pin", help="pin MCP tool definitions (shows the diff, writes <rules>/mcp-pins.yaml)")
    pin.add_argument("--rules", required=True, help="rules directory")
    pin.add_argument("--server", required=True, help="MCP server id (as in mcp_servers:)")
    src = pin.add_mutually_exclusive_group()
    src.add_argument("--url", help="MCP endpoint to list tools from (direct, not through Warden); default: the "
                     "declared url; a stdio server is started as declared")
    src.add_argument("--from-file", help="captured tools/list JSON")
    pin.add_argument("--tool", action="append", help="pin only this tool (repeatable)")
    pin.add_argument("--header", action="append", help="extra request header 'Name: value' for HTTP servers")
    pin.add_argument("--ca-file", help="CA bundle to verify an HTTP server with")
    pin.add_argument("--timeout", type=float, default=60, help="seconds to wait for a stdio server (default 60)")
    pin.add_argument("--dry-run", action="store_true", help="show what would change; write nothing")
    pin.set_defaults(func=cmd_pin)
