"""`warden mcp pin`: record the approved definition (canonical sha256) of an MCP server's tools.

    warden mcp pin --rules rules/ --server github --url https://mcp.example.com/mcp
    warden mcp pin --rules rules/ --server github --from-file tools-list.json [--tool NAME ...]

Writes (atomically) `<rules>/mcp-pins.yaml` with `mcp_pins: {server: {tool: sha256}}`, keeping
the pins of other servers. Warden reloads it like any rule file: a tool blocked as changed
(`mcp_tool_changed`) is unblocked once its pin matches what the server now serves.
`--from-file` takes a captured tools/list response, its result, a list of tools, or a list of
responses (one per page). `--url` talks to the server directly (initialize + every
tools/list page), optionally with `--header 'Authorization: Bearer ...'` and `--ca-file`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from egresswarden.core.mcp import tool_hash

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


def fetch_tools(url: str, headers: dict[str, str], ca_file: str | None, timeout: float = 30) -> list[dict[str, Any]]:
    import httpx

    base = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", **headers}
    verify: Any = True
    if ca_file:
        import ssl
        verify = ssl.create_default_context(cafile=ca_file)
    with httpx.Client(timeout=timeout, verify=verify) as client:
        def call(msg: dict[str, Any], extra: dict[str, str]) -> dict[str, Any] | None:
            r = client.post(url, json=msg, headers={**base, **extra})
            r.raise_for_status()
            for m in _rpc_messages(r):
                if m.get("id") == msg.get("id"):
                    if "error" in m:
                        raise RuntimeError(f"{msg['method']} failed: {m['error']}")
                    session = r.headers.get("mcp-session-id")
                    if session:
                        extra["Mcp-Session-Id"] = session
                    return m["result"]
            return None

        extra: dict[str, str] = {}
        init = call({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "warden-mcp-pin", "version": "1"}}}, extra)
        if init and isinstance(init.get("protocolVersion"), str):
            extra["MCP-Protocol-Version"] = init["protocolVersion"]
        client.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers={**base, **extra})
        tools: list[dict[str, Any]] = []
        cursor = None
        for page in range(1, 1000):
            params = {"cursor": cursor} if cursor else {}
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


def cmd_pin(args: argparse.Namespace) -> int:
    rules_dir = Path(args.rules)
    if not rules_dir.is_dir():
        print(f"warden mcp pin: {rules_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        if args.from_file:
            tools = _tools_from_json(json.loads(Path(args.from_file).read_text()))
        else:
            headers = {}
            for h in args.header or ():
                name, _, value = h.partition(":")
                headers[name.strip()] = value.strip()
            tools = fetch_tools(args.url, headers, args.ca_file)
    except Exception as e:  # a readable one-line error, never a traceback with header values
        print(f"warden mcp pin: could not read the tools: {e.__class__.__name__}: {str(e)[:200]}", file=sys.stderr)
        return 1
    pins = {t["name"]: tool_hash(t) for t in tools}
    missing = [t for t in args.tool or () if t not in pins]
    if missing:
        print(f"warden mcp pin: server does not list {', '.join(missing)}", file=sys.stderr)
        return 1
    path = write_pins(rules_dir, args.server, pins, args.tool)
    for name in sorted(pins):
        if not args.tool or name in args.tool:
            print(f"{args.server}/{name} {pins[name]}")
    print(f"wrote {path}")
    return 0


def add_cli(sub: Any) -> None:
    """Register `pin` in the `warden mcp` group."""
    pin = sub.add_parser("pin", help="pin MCP tool definitions (writes <rules>/mcp-pins.yaml)")
    pin.add_argument("--rules", required=True, help="rules directory")
    pin.add_argument("--server", required=True, help="MCP server id (as in mcp_servers:)")
    src = pin.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="MCP endpoint to list tools from (direct, not through Warden)")
    src.add_argument("--from-file", help="captured tools/list JSON")
    pin.add_argument("--tool", action="append", help="pin only this tool (repeatable)")
    pin.add_argument("--header", action="append", help="extra request header 'Name: value' for --url")
    pin.add_argument("--ca-file", help="CA bundle to verify the server with --url")
    pin.set_defaults(func=cmd_pin)
