"""`warden mcp stdio` at the edges: what no SDK client sends, servers that misbehave, lifetimes.

A raw line client (RawSession) drives `warden mcp stdio`; the server is the same real SDK
stdio server (tests/mcp_stdio_server.py). Each case has a defined result: a JSON-RPC message
the client can read, an audit record, a clean exit with a meaningful status, and nothing
left running.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .harness import WARDEN
from .mcp_stdio_helpers import RawSession, Setup, pid_alive, server_pid, wait_until, write_rules


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return write_rules(tmp_path)


@pytest.fixture
def session(setup: Setup) -> Any:
    sessions: list[RawSession] = []

    def start(**kwargs: Any) -> RawSession:
        s = RawSession(setup, **kwargs)
        sessions.append(s)
        return s

    yield start
    for s in sessions:
        s.stop()


def call(s: RawSession, tool: str, arguments: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
    return s.request("tools/call", {"name": tool, "arguments": arguments or {}}, timeout=timeout)


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_agent_garbage_and_invalid_jsonrpc_get_readable_errors_and_the_session_goes_on(setup: Setup,
                                                                                        session: Any) -> None:
    s = session()
    s.initialize()
    s.send(b"this is not json\n")
    garbage = s.recv()
    assert garbage["id"] is None and garbage["error"]["code"] == -32700
    assert "not JSON" in garbage["error"]["message"]
    s.send({"jsonrpc": "1.0", "id": 7, "method": "tools/list"})
    invalid = s.recv()
    assert invalid["id"] == 7 and invalid["error"]["code"] == -32600
    s.send(b"\n   \n")  # blank lines are ignored, as the SDK does
    assert call(s, "get_weather", {"location": "Lima"})["result"]["content"][0]["text"] == "sunny in Lima (metric)"
    def bad_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r["reason"] == "mcp_invalid_message"]

    bad = bad_of(setup.mcp_records(lambda rs: len(bad_of(rs)) >= 2))
    assert len(bad) == 2 and all(r["decision"] == "deny" for r in bad)


def test_denied_notification_and_batches_are_decided_per_element(setup: Setup, session: Any) -> None:
    s = session()
    s.initialize()
    # A "request" without an id is a notification: a denied one is dropped (no answer) and audited.
    s.send({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_all", "arguments": {}}})
    s.send([{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_all", "arguments": {}}},
            {"jsonrpc": "2.0", "id": 2, "method": "resources/read", "params": {"uri": "docs://secret/keys"}},
            {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "delete_all"}}])
    answers = s.recv()
    assert isinstance(answers, list) and [a["id"] for a in answers] == [1, 2]
    assert answers[0]["result"]["isError"] is True and answers[1]["error"]["code"] == -32602
    # A mixed batch: Warden answers the denied element at once; the allowed one goes to the
    # server (the SDK server rejects batches itself, as 2025-06-18+ servers do).
    s.send([{"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "delete_all", "arguments": {}}},
            {"jsonrpc": "2.0", "id": 4, "method": "ping"}])
    mixed = s.recv()
    assert [a["id"] for a in mixed] == [3] and mixed[0]["result"]["isError"] is True
    assert call(s, "add", {"a": 1, "b": 1})["result"]["content"][0]["text"] == "2"
    assert "delete_all" not in [r["tool"] for r in setup.ran()]
    def denials(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r.get("mcp_tool") == "delete_all"]

    denied = denials(setup.mcp_records(lambda rs: len(denials(rs)) >= 4))
    assert len(denied) == 4 and all(r["reason"] == "mcp_tool_denied" for r in denied)
    assert sum(1 for r in denied if r.get("mcp_batch")) == 3


def test_oversized_agent_line_is_refused_with_bounded_memory(setup: Setup, session: Any) -> None:
    s = session(extra=["--max-line", str(1 << 20)])
    s.initialize()
    pid = s.proc.pid
    big = json.dumps({"jsonrpc": "2.0", "id": 42, "method": "tools/call",
                      "params": {"name": "get_weather", "arguments": {"location": "x" * (50 << 20)}}})
    s.send(big.encode() + b"\n")
    answer = s.recv(60)
    assert answer["id"] == 42 and answer["error"]["code"] == -32600 and "larger than" in answer["error"]["message"]
    assert vm_hwm_kib(pid) < 200 * 1024  # a 50 MiB line never sat in memory
    assert call(s, "get_weather", {"location": "ok"})["result"]["isError"] is False
    assert [r["args"]["location"] for r in setup.ran()] == ["ok"]


def test_server_50mib_line_answers_the_request_with_an_error_and_memory_stays_bounded(setup: Setup,
                                                                                      session: Any) -> None:
    s = session()  # default cap: 16 MiB
    s.initialize()
    answer = call(s, "huge", {"size": 50 << 20}, timeout=120)
    assert answer["error"]["code"] == -32603 and "over the" in answer["error"]["message"]
    assert vm_hwm_kib(s.proc.pid) < 250 * 1024
    assert call(s, "add", {"a": 2, "b": 2})["result"]["content"][0]["text"] == "4"
    record = next(r for r in setup.mcp_records(lambda rs: any(r.get("mcp_tool") == "huge" for r in rs))
                  if r.get("mcp_tool") == "huge")
    assert record["mcp_is_error"] is True and record["error"] == "response too large"


def test_server_non_json_and_idless_lines_are_dropped_and_audited(setup: Setup, session: Any) -> None:
    s = session()
    s.initialize()
    answer = call(s, "noisy")
    assert answer["result"]["content"][0]["text"] == "noisy done"
    assert wait_until(lambda: "not JSON-RPC" in s.stderr() and "without an id" in s.stderr())
    def bad_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r["reason"] == "mcp_invalid_message" and r["mcp_direction"] == "server"]

    bad = bad_of(setup.mcp_records(lambda rs: len(bad_of(rs)) >= 2))
    assert len(bad) == 2


def test_server_crash_answers_pending_requests_and_exits_with_its_status(setup: Setup, session: Any) -> None:
    s = session()
    s.initialize()
    pid = server_pid(setup)
    answer = call(s, "crash")
    assert answer["error"]["code"] == -32603 and "exited (status 3)" in answer["error"]["message"]
    assert s.wait() == 3
    assert "fixture: crashing on purpose" in s.stderr()  # server stderr passes through
    assert not pid_alive(pid)
    ended = [r for r in setup.records() if r.get("event") == "mcp_session" and r.get("result") == "ended"]
    assert ended[-1]["exit_status"] == 3 and ended[-1]["ended_by"] == "server"
    assert setup.verify().returncode == 0


def test_hanging_server_request_timeout_then_stdin_closed_exits_cleanly(setup: Setup, session: Any) -> None:
    s = session(extra=["--request-timeout", "1"])
    s.initialize()
    pid = server_pid(setup)
    answer = call(s, "hang")
    assert answer["error"]["code"] == -32603 and "did not answer within 1 s" in answer["error"]["message"]
    assert call(s, "add", {"a": 1, "b": 2})["result"]["content"][0]["text"] == "3"  # still usable
    s.close_stdin()
    assert s.wait(15) == 0
    assert not pid_alive(pid)
    record = next(r for r in setup.mcp_records(lambda rs: any(r.get("mcp_tool") == "hang" for r in rs))
                  if r.get("mcp_tool") == "hang")
    assert record["error"] == "timeout"


def test_agent_killed_closes_both_pipes_and_nothing_is_left_running(setup: Setup, session: Any) -> None:
    s = session()
    s.initialize()
    pid = server_pid(setup)
    s.close_stdin()
    assert s.proc.stdout is not None
    s.proc.stdout.close()  # the agent is gone: nobody reads or writes
    assert s.wait(15) == 0
    assert wait_until(lambda: not pid_alive(pid))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_are_forwarded_and_the_exit_status_says_which(setup: Setup, session: Any, sig: int) -> None:
    s = session()
    s.initialize()
    pid = server_pid(setup)
    s.proc.send_signal(sig)
    assert s.wait(15) == 128 + sig
    assert wait_until(lambda: not pid_alive(pid))
    ended = [r for r in setup.records() if r.get("event") == "mcp_session" and r.get("result") == "ended"]
    assert ended[-1]["ended_by"] == "signal"


def test_undeclared_server_unknown_agent_and_missing_command_are_refused(setup: Setup, session: Any) -> None:
    s = session(agent="nobody")
    assert s.wait() == 2 and "unknown agent 'nobody'" in s.stderr()
    write_rules(setup.dir, server_extra={"command": "/nonexistent/mcp-server"}, setup=setup)
    s = session()
    assert s.wait() == 127 and "cannot start MCP server 'fix'" in s.stderr()
    out = subprocess.run([WARDEN, *setup.args(server="other")], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and "no MCP server 'other' is declared" in out.stderr and out.stdout == ""


def test_rule_changes_apply_to_a_running_session(setup: Setup, session: Any) -> None:
    s = session()
    s.initialize()
    assert call(s, "get_weather", {"location": "a"})["result"]["isError"] is False
    write_rules(setup.dir, tools=["add"], setup=setup)  # get_weather leaves the catalog

    def refused() -> bool:
        return bool(call(s, "get_weather", {"location": "b"})["result"]["isError"])

    assert wait_until(refused, 15)
    assert any(r.get("event") == "reload" and r["result"] == "success"
               for r in setup.records(lambda rs: any(r.get("event") == "reload" for r in rs)))
    (setup.rules / "broken.yaml").write_text("agents: [\n")
    assert wait_until(lambda: any(r.get("event") == "reload" and r["result"] == "failure"
                                  for r in setup.records()), 15)
    assert call(s, "add", {"a": 1, "b": 1})["result"]["content"][0]["text"] == "2"  # the last good rules stay


@pytest.mark.parametrize("on_failure", ["fail_closed", "continue"])
def test_unwritable_audit_log_refuses_messages_unless_continue(tmp_path: Path, on_failure: str) -> None:
    setup = write_rules(tmp_path, settings={"audit": {"on_failure": on_failure}})
    setup.audit.symlink_to("/dev/full")  # every write fails with ENOSPC
    s = RawSession(setup)
    try:
        s.initialize()
        assert wait_until(lambda: "cannot write audit log" in s.stderr())
        answer = call(s, "get_weather", {"location": "x"})
        if on_failure == "continue":
            assert answer["result"]["isError"] is False
        else:
            assert answer["error"]["data"]["reason"] == "audit_unavailable"
            assert "get_weather" not in [r["tool"] for r in setup.ran()]
    finally:
        s.stop()
