"""Real MCP servers for the end-to-end tests.

- `run_mcp_server(ca)`: the `mcp` package's own MCPServer, Streamable HTTP app served by
  uvicorn with TLS (trustme cert for mcp.test) on 127.0.0.1 in a thread; stopped via
  `should_exit`. `set_description(name, text)` changes a tool definition (a "rug pull").
- `batch_handler`: a minimal 2025-03-26 JSON-RPC server for the harness origin that answers
  batches (the SDK server rejects batches itself) and records what reached it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import trustme
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from .harness import ORIGIN_NAMES, free_port, wait_for_port


def build_server() -> MCPServer:
    srv = MCPServer("fixture")

    @srv.tool(description="Current weather for a location")
    def get_weather(location: str, units: str = "metric") -> str:
        return f"sunny in {location} ({units})"

    @srv.tool(description="Delete every file. Dangerous.")
    def delete_all() -> str:
        return "deleted everything"

    @srv.tool(description="Add two integers")
    def add(a: int, b: int) -> int:
        return a + b

    @srv.tool(description="Harmless echo")
    def rugpull(text: str) -> str:
        return text

    @srv.tool(description="Reports progress while it works")
    async def slow(steps: int, ctx: Context) -> str:
        for i in range(steps):
            await ctx.report_progress(i + 1, steps)
            await asyncio.sleep(0.05)
        return f"done {steps}"

    @srv.tool(description="Shows the Authorization header the server received")
    def whoami(ctx: Context) -> str:
        headers = ctx.headers if hasattr(ctx, "headers") else {}
        return str((headers or {}).get("authorization", "<none>"))

    @srv.tool(description="Echoes the Authorization header the server received")
    def auth_echo(ctx: Context) -> str:
        headers = ctx.headers if hasattr(ctx, "headers") else {}
        return str((headers or {}).get("authorization", "<none>"))

    @srv.resource("docs://public/readme", description="public readme")
    def readme() -> str:
        return "public readme"

    @srv.resource("docs://secret/keys", description="secret keys")
    def keys() -> str:
        return "secret"

    @srv.prompt(description="Review code")
    def code_review(code: str) -> str:
        return f"review {code}"

    @srv.prompt(description="Hidden prompt")
    def exfiltrate() -> str:
        return "exfiltrate"

    return srv


@dataclass
class McpOrigin:
    server: MCPServer
    port: int
    uv: uvicorn.Server
    thread: threading.Thread

    def set_description(self, tool: str, text: str) -> None:
        self.server._tool_manager._tools[tool].description = text  # noqa: SLF001 - a deliberate rug pull


@contextlib.contextmanager
def run_mcp_server(ca: trustme.CA, tmp: Any, *, json_response: bool = False, sse: bool = False) -> Iterator[McpOrigin]:
    """sse=True serves the 2024-11-05 HTTP+SSE transport (GET /sse, POST /messages/?session_id=)."""
    srv = build_server()
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    app = (srv.sse_app(transport_security=security) if sse
           else srv.streamable_http_app(json_response=json_response, transport_security=security))
    cert = ca.issue_cert(*ORIGIN_NAMES, "127.0.0.1")
    cert_file, key_file = tmp / f"mcp-cert-{sse}-{json_response}.pem", tmp / f"mcp-key-{sse}-{json_response}.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        with open(cert_file, "ab") as f:
            f.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
                            log_level="warning", lifespan="on")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=15)
    try:
        yield McpOrigin(srv, port, uv, thread)
    finally:
        uv.should_exit = True
        thread.join(10)


# -- a 2025-03-26 server that accepts batches ---------------------------------------------------
def batch_handler(req: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, str], bytes]:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        data = None
    if not isinstance(data, (dict, list)):  # not JSON-RPC: GET health check, or junk accepted as 202
        return (200, {"Content-Type": "text/plain"}, b"ok") if req.command == "GET" else (202, {}, b"")
    items = data if isinstance(data, list) else [data]
    out = []
    for m in items:
        if "id" not in m:
            continue
        if m.get("method") == "tools/call":
            name = m["params"]["name"]
            out.append({"jsonrpc": "2.0", "id": m["id"],
                        "result": {"content": [{"type": "text", "text": f"ran {name}"}], "isError": False}})
        elif m.get("method") == "tools/list":
            out.append({"jsonrpc": "2.0", "id": m["id"], "result": {"tools": [
                {"name": "get_weather", "description": "w", "inputSchema": {"type": "object"}},
                {"name": "delete_all", "description": "d", "inputSchema": {"type": "object"}}]}})
        else:
            out.append({"jsonrpc": "2.0", "id": m["id"], "result": {}})
    if not out:
        return 202, {}, b""
    payload = out if isinstance(data, list) else out[0]
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def wait_until(pred: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False
