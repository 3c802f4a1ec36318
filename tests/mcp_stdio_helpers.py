"""Helpers for the `warden mcp stdio` tests: rule files, the SDK client, and a raw line client.

- `write_rules(tmp, ...)`: a rules directory declaring the fixture server (tests/mcp_stdio_server.py,
  run by this interpreter) as the stdio server `fix`, agent `dev`, a pin store and a secrets dir.
- `sdk_client(setup)`: the official `mcp` SDK client speaking stdio to `warden mcp stdio`.
- `RawSession`: `warden mcp stdio` under Popen with pipes, for what no SDK would send (garbage,
  oversized lines, batches) and for lifetime checks (signals, exit status, stdin closed).
Every wait is bounded; processes are stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from .harness import WARDEN

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "mcp_stdio_server.py"
SECRET = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c"
ALL_TOOLS = ["get_weather", "add", "rugpull", "show_env", "leak_stderr", "roots", "change_tools", "hang", "huge",
             "noisy", "crash", "delete_all"]


@dataclass
class Setup:
    dir: Path
    rules: Path
    audit: Path
    server_log: Path
    pins: Path

    def args(self, agent: str = "dev", server: str = "fix", extra: list[str] | None = None) -> list[str]:
        return ["mcp", "stdio", "--agent", agent, "--server", server, "--rules", str(self.rules),
                "--audit-log", str(self.audit), *(extra or [])]

    def ran(self) -> list[dict[str, Any]]:
        """What the server ran (its own log), in order."""
        if not self.server_log.exists():
            return []
        return [json.loads(line) for line in self.server_log.read_text().splitlines() if line.strip()]

    def records(self, wait_for: Callable[[list[dict[str, Any]]], bool] | None = None,
                timeout: float = 10.0) -> list[dict[str, Any]]:
        """Audit records of every session so far (the writer flushes within milliseconds)."""
        deadline = time.monotonic() + timeout
        while True:
            records = []
            if self.audit.exists():
                records = [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]
            if wait_for is None or wait_for(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)

    def mcp_records(self, wait_for: Callable[[list[dict[str, Any]]], bool] | None = None) -> list[dict[str, Any]]:
        """`mcp` records; with `wait_for`, once it holds for them (or after 10 s)."""
        def mcp(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [r for r in records if r.get("event") == "mcp"]

        return mcp(self.records(None if wait_for is None else lambda rs: wait_for(mcp(rs))))

    def verify(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([WARDEN, "audit", "verify", str(self.audit)], capture_output=True, text=True,
                              timeout=60)


def write_rules(tmp: Path, *, tools: list[str] | None = None, deny_tools: list[str] | None = None,
                settings: dict[str, Any] | None = None, server_env: dict[str, str] | None = None,
                server_extra: dict[str, Any] | None = None, policy_extra: dict[str, Any] | None = None,
                agent_extra: dict[str, Any] | None = None, extra_servers: list[dict[str, Any]] | None = None,
                setup: Setup | None = None) -> Setup:
    """Write (or rewrite) the rules of a stdio test; returns the paths it uses."""
    if setup is None:
        rules_dir = tmp / "rules"
        rules_dir.mkdir(parents=True, exist_ok=True)
        (tmp / "secrets").mkdir(exist_ok=True)
        (tmp / "secrets" / "FIX_TOKEN").write_text(SECRET)
        setup = Setup(tmp, rules_dir, tmp / "audit.jsonl", tmp / "server.log", tmp / "pins.sqlite")
    env = {"MCP_LOG": str(setup.server_log), "API_TOKEN": "${secret:FIX_TOKEN}", **(server_env or {})}
    mcp_rule: dict[str, Any] = {
        "server": "fix",
        "tools": tools if tools is not None else [t for t in ALL_TOOLS if t != "delete_all"],
        "deny_tools": deny_tools if deny_tools is not None else ["delete_all"],
        "arguments": {"add": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 100}, "b": {"type": "integer"}},
                              "additionalProperties": False}},
        "resources": ["docs://public/**"],
        "prompts": ["code_review"],
        **(policy_extra or {}),
    }
    doc = {
        "agents": [{"id": "dev", "sources": ["127.0.0.1/32"], "policies": ["tools"], **(agent_extra or {})},
                   {"id": "nomcp", "sources": ["10.9.9.9/32"], "policies": ["none"]}],
        "policies": {"tools": {"mcp": [mcp_rule]}, "none": {"allow": [{"host": "example.test"}]}},
        "mcp_servers": [{"id": "fix", "command": sys.executable, "args": [str(FIXTURE)], "env": env,
                         **(server_extra or {})}, *(extra_servers or [])],
        "settings": {"mcp_pin_store": str(setup.pins), "secrets_dir": str(tmp / "secrets"), **(settings or {})},
    }
    tmp_file = setup.rules / ".rules.yaml.tmp"
    tmp_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp_file, setup.rules / "rules.yaml")
    return setup


@contextlib.asynccontextmanager
async def sdk_client(setup: Setup, *, agent: str = "dev", server: str = "fix", extra: list[str] | None = None,
                     **kwargs: Any) -> AsyncIterator[Client]:
    params = StdioServerParameters(command=WARDEN, args=setup.args(agent, server, extra))
    kwargs.setdefault("mode", "legacy")
    kwargs.setdefault("read_timeout_seconds", 30)
    async with Client(params, **kwargs) as client:
        yield client


def text_of(result: Any) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


# -- raw line client ------------------------------------------------------------------------------
class RawSession:
    """`warden mcp stdio` with pipes; stdout lines collected by a thread into a queue."""

    def __init__(self, setup: Setup, *, extra: list[str] | None = None, env: dict[str, str] | None = None,
                 agent: str = "dev") -> None:
        self.stderr_path = setup.dir / f"warden-stderr-{time.monotonic_ns()}.txt"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen([WARDEN, *setup.args(agent, extra=extra)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.next_id = 100

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, message: Any) -> None:
        assert self.proc.stdin is not None
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def recv(self, timeout: float = 20.0) -> Any:
        line = self.lines.get(timeout=timeout)
        if line is None:
            raise EOFError("warden closed stdout")
        return json.loads(line)

    def request(self, method: str, params: dict[str, Any] | None = None, timeout: float = 20.0) -> dict[str, Any]:
        """Send a request and return the message answering it (skipping notifications)."""
        self.next_id += 1
        msg_id = self.next_id
        self.send({"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params or {}})
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.1, deadline - time.monotonic()))
            if isinstance(msg, dict) and msg.get("id") == msg_id and "method" not in msg:
                return msg

    def initialize(self) -> dict[str, Any]:
        answer = self.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                             "clientInfo": {"name": "raw-test", "version": "1"}})
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return answer

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        self.close_stdin()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reader.join(5)
        self._stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def server_pid(setup: Setup) -> int:
    """The pid of the server the latest session started (from its audit record)."""
    started = [r for r in setup.records(lambda rs: any(r.get("result") == "started" for r in rs))
               if r.get("event") == "mcp_session" and r.get("result") == "started"]
    return int(started[-1]["pid"])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text()
        if "\nState:\tZ" in status:
            return False
    return True


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()
