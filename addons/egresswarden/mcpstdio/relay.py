"""The relay between an agent's stdio and a local MCP server's stdio.

How it works: `Relay.run` starts the server (its own process group, killed with Warden
if Warden is killed), then two tasks move lines, one per direction, each line decided with
`core.mcp` (the HTTP MCP engine) before it is written on:

    agent -> server   requests and notifications: `decide_message` (catalog, deny_tools,
                      argument schemas, resources, prompts, pins). Denied requests are
                      answered by Warden (isError tool result / JSON-RPC error, same id) and
                      never reach the server. Allowed requests wait in `pending` for their
                      response. Responses to server requests pass if that request is pending.
    server -> agent   responses: only to a pending request (anything else is dropped);
                      tools/prompts/resources lists filtered (`filter_message`, which also
                      observes pins). Server requests: sampling, elicitation, roots, ping and
                      tasks pass; any other method is refused back to the server.
                      Notifications pass; tools/list_changed marks the tool list stale.
                      Every line is re-serialized from what was decided (no parser
                      differential) and the server's env secrets are redacted from it.

Before a tools/call is decided the relay makes sure it knows the tool's current definition:
if the tool list is stale (nothing listed yet in this session, or the server announced
`list_changed` since), it lists the tools itself (`warden-preflight-N` ids, never
forwarded), so a changed tool is blocked even when the agent calls it without listing, and
a tool the server does not list is refused (no definition, nothing to pin).

Protocol cases:
    batch (JSON array)       each element decided on its own; allowed ones forwarded as one
                             array; Warden's answers for the denied ones sent at once as an
                             array of their own (clients match answers by id; waiting to merge
                             them into the server's array would lose them when the server
                             rejects batches, as 2025-06-18+ servers do)
    notifications            pass both ways (one audit record each); notifications/cancelled
                             from the agent also ends the pending record
    cancellation             as above; a late response for a cancelled id is dropped
    server->client requests  sampling/createMessage, elicitation/create, roots/list, ping,
                             tasks/* pass and are matched with the agent's response; others
                             answered -32601 to the server
    garbage from the agent   -32700 parse error (id null) or -32600 invalid request
    line over --max-line     -32600 to the agent (its id when found in the first 4 KiB);
                             from the server: the pending request it answered gets -32603
    non-JSON server stdout   dropped, noted on stderr and in the audit log
    response without an id / to no pending request: dropped and audited
    server exits             every pending request answered -32603 "server exited"; exit
                             status = the server's (128+N when killed by signal N)
    server hangs             --request-timeout answers a request the server sat on (-32603)
    agent closes stdin       server's stdin closed; 2 s to exit, then SIGTERM, 2 s, SIGKILL
    signal to Warden         SIGTERM/SIGINT/SIGHUP forwarded to the server's process group;
                             exit status 128+N
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egresswarden.core import mcp as E
from egresswarden.core.credentials import Scanner
from egresswarden.core.decision import Decision, Reason, Verdict, deny
from egresswarden.core.errors import WardenError
from egresswarden.core.loader import load_ruleset, rule_files
from egresswarden.core.model import McpServer
from egresswarden.core.ruleset import RuleSet
from egresswarden.mcpstdio.framing import CHUNK, DEFAULT_MAX_LINE, Oversized, dumps_line, read_lines
from egresswarden.mcpstdio.launch import Launch
from egresswarden.mcpstdio.records import Recorder
from egresswarden.record.outcome import McpFields
from egresswarden.runtime import pinstore

SERVER_TO_CLIENT_METHODS = frozenset({"ping", "sampling/createMessage", "elicitation/create", "roots/list",
                                      "tasks/get", "tasks/result", "tasks/list", "tasks/cancel"})
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603
MAX_PENDING = 10_000
PREFLIGHT_TIMEOUT = 15.0
PREFLIGHT_MAX_PAGES = 100
GRACE_SECONDS = 2.0  # the MCP SDK client's own budget: it SIGTERMs us 2 s after closing our stdin
KILL_SECONDS = 2.0
RELOAD_POLL_SECONDS = 2.0
MAX_BAD_LINE_RECORDS = 100
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _id_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if Warden dies (e.g. is SIGKILLed itself)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def _find_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()  # looked up before fork: nothing but the call runs in the child


def _pollable(fd: int) -> bool:
    """True for a pipe or socket (the event loop can wait on it)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


@dataclass(slots=True)
class Pending:
    """A request in flight (from the agent, or from the server) and what its record needs."""

    md: E.MessageDecision
    started: float
    direction: str
    version: str | None = None
    batch: bool = False
    events: list[str] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class AgentGone(Exception):
    """The agent's end of stdout is closed."""


class _Out:
    """Writes whole lines to a pipe (asyncio) or, for a regular file, with plain writes."""

    def __init__(self, writer: asyncio.StreamWriter | None, fd: int) -> None:
        self.writer = writer
        self.fd = fd

    async def write(self, data: bytes) -> None:
        try:
            if self.writer is None:
                os.write(self.fd, data)
                return
            self.writer.write(data)
            await self.writer.drain()
        except (BrokenPipeError, ConnectionResetError, OSError, RuntimeError) as e:
            raise AgentGone(str(e)) from None

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()


class Relay:
    def __init__(self, rules: RuleSet, server: McpServer, agent: str, recorder: Recorder, scanner: Scanner, *,
                 max_line: int = DEFAULT_MAX_LINE, request_timeout: float | None = None,
                 pins: E.PinStore | None = None, reload_rules: bool = True) -> None:
        self.rules = rules
        self.server = server
        self.agent = agent
        self.recorder = recorder
        self.scanner = scanner
        self.max_line = max_line
        self.request_timeout = request_timeout
        self.reload_rules = reload_rules
        self.policies = E.McpPolicies(rules)
        self.pins = pins if pins is not None else E.PinStore()
        pinstore.attach(self.pins, rules)
        self.pending: dict[str, Pending] = {}
        self.server_pending: dict[str, Pending] = {}
        self.preflight: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.preflight_seq = 0
        self.tools_stale = True  # no complete tools/list seen in this session yet
        self.bad_lines = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.out: _Out | None = None
        self.signalled: int | None = None
        self.agent_ended = False
        self.terminated_by_us = False
        self._feeder: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    async def run(self, launch: Launch) -> int:
        """Start the server, relay until either side ends, stop the server; returns the exit status."""
        loop = asyncio.get_running_loop()
        agent_in = asyncio.StreamReader(limit=2 * CHUNK)
        # Pipes and sockets (what agents use) go through the event loop; anything else (a file,
        # /dev/null, a terminal: epoll refuses some of them) is read by a thread, written plainly.
        if _pollable(sys.stdin.fileno()):
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(agent_in), sys.stdin.buffer)
        else:
            self._feeder = loop.create_task(self._feed_from_file(agent_in, sys.stdin.fileno()))
        if _pollable(sys.stdout.fileno()):
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
            self.out = _Out(asyncio.StreamWriter(transport, protocol, None, loop), sys.stdout.fileno())
        else:
            self.out = _Out(None, sys.stdout.fileno())
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *launch.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE if launch.secrets else None, env=launch.env, cwd=launch.cwd,
                start_new_session=True, preexec_fn=_die_with_parent, limit=2 * CHUNK)
        except OSError as e:
            message = f"cannot start MCP server {self.server.id!r} ({launch.argv[0]}): {e.__class__.__name__}: {e.strerror or e}"
            print(f"warden mcp stdio: {message}", file=sys.stderr, flush=True)
            self.recorder.event({"event": "mcp_session", "result": "spawn_failed", "error": message})
            return 127
        self.recorder.event({"event": "mcp_session", "result": "started", "pid": self.proc.pid,
                             "command": os.path.basename(launch.argv[0]),
                             "sandbox_profile": self.server.stdio.sandbox_profile if self.server.stdio else None,
                             "policy_version": self.rules.version})
        for sig in FORWARDED_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        tasks = [loop.create_task(self._agent_to_server(agent_in), name="agent->server"),
                 loop.create_task(self._server_to_agent(), name="server->agent")]
        extra = []
        stderr_task = None
        if launch.secrets and self.proc.stderr is not None:
            stderr_task = loop.create_task(self._stderr(self.proc.stderr))
            extra.append(stderr_task)
        if self.reload_rules:
            extra.append(loop.create_task(self._watch_rules()))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if tasks[0] in done:
                self.agent_ended = True
                await self._stop_server()
            else:
                tasks[0].cancel()
            rc = await self._wait_exit(tasks[1])
            if stderr_task is not None:  # the server's last words (e.g. why it crashed)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stderr_task), 1.0)
        finally:
            for sig in FORWARDED_SIGNALS:
                loop.remove_signal_handler(sig)
            for task in [*tasks, *extra]:
                task.cancel()
            outcomes = await asyncio.gather(*tasks, *extra, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, Exception) and not isinstance(o, asyncio.CancelledError)]
        if failures:  # a bug in the relay: the server was stopped (fail closed); say so loudly
            error = f"{failures[0].__class__.__name__}: {str(failures[0])[:300]}"
            print(f"warden mcp stdio: internal error, session ended: {error}", file=sys.stderr, flush=True)
            self.recorder.event({"event": "mcp_session", "result": "internal_error", "error": error})
        await self._fail_pending(f"MCP server '{self.server.id}' exited (status {rc}) before answering")
        self.recorder.event({"event": "mcp_session", "result": "ended", "exit_status": rc,
                             "ended_by": "signal" if self.signalled else "agent" if self.agent_ended else "server"})
        if self.out is not None:
            self.out.close()
        return 1 if failures else self._exit_status(rc)

    def _exit_status(self, rc: int) -> int:
        if self.signalled is not None:
            return 128 + self.signalled
        if self.agent_ended and (self.terminated_by_us or rc == 0):
            return 0  # the agent ended the session; a server we had to stop is not an error
        return 128 - rc if rc < 0 else rc

    async def _feed_from_file(self, reader: asyncio.StreamReader, fd: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.run_in_executor(None, os.read, fd, CHUNK)
            except OSError:
                data = b""
            if not data:
                reader.feed_eof()
                return
            reader.feed_data(data)

    def _on_signal(self, sig: int) -> None:
        self.signalled = sig
        self._signal_server(sig)
        asyncio.get_running_loop().call_later(GRACE_SECONDS + KILL_SECONDS, self._signal_server, signal.SIGKILL)

    def _signal_server(self, sig: int) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def _stop_server(self) -> None:
        """The agent is gone: close the server's stdin, then escalate (MCP lifecycle "Shutdown")."""
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        for sig, wait in ((None, GRACE_SECONDS), (signal.SIGTERM, KILL_SECONDS), (signal.SIGKILL, KILL_SECONDS)):
            if sig is not None:
                self.terminated_by_us = True
                self._signal_server(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), wait)
                return
            except TimeoutError:
                continue

    async def _wait_exit(self, reader_task: asyncio.Task[None]) -> int:
        assert self.proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader_task), GRACE_SECONDS)
        if self.proc.returncode is None:
            # stdout closed but the process lives on (or the agent is gone): same escalation
            try:
                await asyncio.wait_for(self.proc.wait(), GRACE_SECONDS)
            except TimeoutError:
                self.terminated_by_us = True
                self._signal_server(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), KILL_SECONDS)
                except TimeoutError:
                    self._signal_server(signal.SIGKILL)
        rc = await self.proc.wait()
        self._signal_server(signal.SIGKILL)  # whatever is left of its process group
        return rc

    async def _stderr(self, stream: asyncio.StreamReader) -> None:
        """Server stderr to ours, with the server's env secrets redacted (split across reads too)."""
        from egresswarden.core.credentials import StreamRedactor

        redactor = StreamRedactor(self.scanner)
        while True:
            chunk = await stream.read(CHUNK)
            data = redactor.feed(chunk)
            if data:
                with contextlib.suppress(OSError):
                    os.write(sys.stderr.fileno(), data)
            if not chunk:
                return

    async def _watch_rules(self) -> None:
        """Reload the rules when their files change (a failed reload keeps the rules in force)."""
        base = Path(self.rules.model.rules_dir)

        def fingerprint() -> tuple[tuple[str, int, int, int], ...]:
            out = []
            for p in rule_files(base):
                with contextlib.suppress(OSError):
                    st = p.stat()
                    out.append((str(p), st.st_mtime_ns, st.st_size, st.st_ino))
            return tuple(out)

        loop = asyncio.get_running_loop()
        last = await loop.run_in_executor(None, fingerprint)
        while True:
            await asyncio.sleep(RELOAD_POLL_SECONDS)
            now = await loop.run_in_executor(None, fingerprint)
            if now == last:
                continue
            last = now
            try:
                rules = await loop.run_in_executor(None, load_ruleset, base)
            except WardenError as e:
                print(f"warden mcp stdio: rules reload failed, keeping version {self.rules.version}: {e}",
                      file=sys.stderr, flush=True)
                self.recorder.event({"event": "reload", "result": "failure", "policy_version": self.rules.version,
                                     "error": str(e)[:2000]})
                continue
            self.rules, self.policies = rules, E.McpPolicies(rules)
            pinstore.attach(self.pins, rules)
            self.recorder.event({"event": "reload", "result": "success", "policy_version": rules.version})

    # -- writing ------------------------------------------------------------------------------------
    async def to_agent(self, message: Any) -> int:
        """Write one message (or batch) to the agent, env secrets redacted; returns how many were."""
        assert self.out is not None
        data = dumps_line(message)
        redacted = 0
        if self.scanner.automaton is not None:
            data, redacted = self.scanner.redact(data, force=True)
        await self.out.write(data)
        return redacted

    async def to_server(self, message: Any) -> bool:
        """Write to the server; False if its stdin is closed."""
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(dumps_line(message))
            await self.proc.stdin.drain()
            return True
        except (BrokenPipeError, ConnectionResetError, RuntimeError, OSError):
            return False

    # -- records ------------------------------------------------------------------------------------
    def _record(self, md: E.MessageDecision, direction: str, *, started: float | None = None, engine: float = 0.0,
                is_error: bool | None = None, version: str | None = None, batch: bool = False,
                events: list[str] | None = None, report: E.FilterReport | None = None, error: str | None = None,
                redacted: int = 0) -> None:
        all_events = list(events or ())
        if md.event and md.decision.verdict is not Verdict.ALLOW and md.event not in all_events:
            all_events.append(md.event)
        report = report or E.FilterReport()
        if report.changed:
            all_events.append("tool_changed")
        if report.collisions:
            all_events.append("tool_collision")

        def names(values: list[str]) -> tuple[str, ...]:
            return tuple(sorted(set(values))[:100])

        fields = McpFields(
            server=self.server.id, method=md.method, tool=md.tool, resource=md.resource, prompt=md.prompt,
            argument_keys=md.argument_keys,
            argument_values=self.recorder.redact(md.argument_values) if md.argument_values is not None else None,
            is_error=is_error, protocol_version=E.short(version, 32) if version else None, batch=batch,
            hidden=names(report.hidden), changed_tools=names(report.changed),
            changed_parts=tuple(sorted(report.changed_parts.items())[:100]), tool_collisions=names(report.collisions),
            transport="stdio", unpinned_tools=names(report.unpinned), session=self.recorder.session,
            direction=direction, redacted=redacted or None)
        duration = time.perf_counter() - started if started is not None else 0.0
        self.recorder.emit(md.decision, fields, events=tuple(dict.fromkeys(all_events)), duration=duration,
                           engine=engine, error=error)

    def _warden_md(self, reason: Reason, message: str, method: str | None = None) -> E.MessageDecision:
        d = deny(reason, message, self.policies.version)
        return E.MessageDecision(d, method, text=f"Warden: {message}")

    def _allow_md(self, what: str, method: str | None) -> E.MessageDecision:
        policy = self.policies.policy(self.agent, self.server.id)
        d = Decision(Verdict.ALLOW, Reason.ALLOWED, policy.rule_id if policy else None, what, self.policies.version)
        return E.MessageDecision(d, method)

    @staticmethod
    def _error(msg_id: Any, code: int, message: str, reason: Reason) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message,
                                                          "data": {"reason": reason.value}}}

    # -- agent -> server ------------------------------------------------------------------------------
    async def _agent_to_server(self, reader: asyncio.StreamReader) -> None:
        try:
            async for line in read_lines(reader, self.max_line):
                await self._agent_line(line)
        except AgentGone:
            return

    async def _agent_line(self, line: bytes | Oversized) -> None:
        if isinstance(line, Oversized):
            msg_id = line.guess_id()
            text = f"message of {line.size} bytes is larger than the {self.max_line}-byte limit; refused"
            await self.to_agent(self._error(msg_id, INVALID_REQUEST, f"Warden: {text}", Reason.MCP_INVALID_MESSAGE))
            self._record(self._warden_md(Reason.MCP_INVALID_MESSAGE, text), "client")
            return
        if not line.strip():
            return
        started = time.perf_counter()
        parsed = E.parse_messages(line)
        if parsed is None:
            try:  # only on the error path: a second parse tells garbage from non-JSON-RPC
                data = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                text = "the message is not JSON (MCP stdio carries one JSON-RPC message per line)"
                await self.to_agent(self._error(None, PARSE_ERROR, f"Warden: {text}", Reason.MCP_INVALID_MESSAGE))
                self._record(self._warden_md(Reason.MCP_INVALID_MESSAGE, text), "client")
                return
            msg_id = data.get("id") if isinstance(data, dict) else None
            text = "the message is not a JSON-RPC 2.0 request, notification or response"
            await self.to_agent(self._error(msg_id, INVALID_REQUEST, f"Warden: {text}", Reason.MCP_INVALID_MESSAGE))
            self._record(self._warden_md(Reason.MCP_INVALID_MESSAGE, text), "client")
            return
        messages, batch = parsed
        forward: list[dict[str, Any]] = []
        answers: list[dict[str, Any]] = []
        for msg in messages:
            await self._agent_message(msg, batch, forward, answers, started)
        if forward and not await self.to_server(forward if batch else forward[0]):
            answers += self._server_unavailable(forward)
        if answers:
            await self.to_agent(answers if batch else answers[0])

    def _server_unavailable(self, forwarded: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for msg in forwarded:
            if "method" in msg and "id" in msg:
                self.pending.pop(_id_key(msg["id"]), None)
                out.append(self._error(msg["id"], INTERNAL_ERROR, f"Warden: MCP server '{self.server.id}' is not "
                                       f"running (its stdin is closed)", Reason.MCP_SERVER_FAILED))
        return out

    async def _agent_message(self, msg: dict[str, Any], batch: bool, forward: list[dict[str, Any]],
                             answers: list[dict[str, Any]], started: float) -> None:
        method = msg.get("method")
        if method is None:  # the agent's response to a server request
            key = _id_key(msg.get("id"))
            waiting = self.server_pending.pop(key, None)
            if waiting is None:
                self._record(self._warden_md(Reason.MCP_INVALID_MESSAGE, "response to no pending server request"),
                             "client")
                return
            self._record(waiting.md, "server", started=waiting.started, is_error="error" in msg,
                         version=waiting.version)
            forward.append(msg)
            return
        has_id = "id" in msg
        key = _id_key(msg["id"]) if has_id else ""
        problem: tuple[Reason, int, str] | None = None
        if not self.recorder.healthy:
            problem = (Reason.AUDIT_UNAVAILABLE, INTERNAL_ERROR, "the audit log cannot be written; refusing")
        elif has_id and (key in self.pending or key in self.preflight):
            problem = (Reason.MCP_INVALID_MESSAGE, INVALID_REQUEST, "a request with this id is already in flight")
        elif has_id and len(self.pending) >= MAX_PENDING:
            problem = (Reason.MCP_INVALID_MESSAGE, INTERNAL_ERROR, f"more than {MAX_PENDING} requests in flight")
        if problem is not None:
            reason, code, text = problem
            md = self._warden_md(reason, text, E.short(method, 80))
            if has_id:
                answers.append(self._error(msg["id"], code, f"Warden: {text}", reason))
            self._record(md, "client")
            return
        params = msg.get("params")
        name = params.get("name") if method == "tools/call" and isinstance(params, dict) else None
        version = E.protocol_version(msg, None)
        listed = True
        if isinstance(name, str) and self.tools_stale and self.policies.policy(self.agent, self.server.id):
            listed = await self._preflight(msg)
        engine_start = time.perf_counter()
        md = E.decide_message(self.policies, self.pins, self.agent, self.server, msg)
        if md.allowed and isinstance(name, str):
            md = self._definition_known(md, name, listed)
        if not md.allowed and self.policies.report_mode(self.agent):
            md.decision = md.decision.with_verdict(Verdict.REPORT)
        engine = time.perf_counter() - engine_start
        if md.allowed:
            forward.append(msg)
            if has_id:
                pending = Pending(md, started, "client", version, batch)
                if self.request_timeout:
                    pending.timer = asyncio.get_running_loop().call_later(self.request_timeout, self._timed_out, key,
                                                                          msg["id"])
                self.pending[key] = pending
            else:
                if method == "notifications/cancelled" and isinstance(params, dict) and "requestId" in params:
                    cancelled = self.pending.pop(_id_key(params["requestId"]), None)
                    if cancelled is not None:
                        self._finish(cancelled, error="cancelled by the client")
                self._record(md, "client", started=started, engine=engine, version=version, batch=batch)
            return
        answer = E.denial_answer(msg, md, E.is_modern(version))
        if answer is not None:
            answers.append(answer)
        self._record(md, "client", started=started, engine=engine, version=version, batch=batch)

    def _definition_known(self, md: E.MessageDecision, name: str, listed: bool) -> E.MessageDecision:
        """An allowed tools/call for a tool whose definition this session has not seen is refused."""
        if name in self.pins.observed.get(self.server.id, {}):
            return md
        policy = self.policies.policy(self.agent, self.server.id)
        rule = policy.rule_id if policy else None
        if not listed:
            text = (f"Warden could not read the tool list of server '{self.server.id}' to check the definition of "
                    f"'{E.short(name, 80)}'; refused. Try again once the server answers tools/list.")
            reason = Reason.MCP_SERVER_FAILED
        else:
            text = (f"Warden refused tool '{E.short(name, 80)}' on server '{self.server.id}': the server does not "
                    f"list it, so its definition cannot be checked against its pin.")
            reason = Reason.MCP_TOOL_UNPINNED
        md.decision = deny(reason, "tool definition not known: " + ("tools/list failed" if not listed else
                           "the server does not list the tool"), self.policies.version, rule)
        md.text = text
        md.event = "mcp_deny"
        return md

    async def _preflight(self, msg: dict[str, Any]) -> bool:
        """List the server's tools (every page) so that pins are checked before a call. True if complete."""
        params = msg.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        version = meta.get(E.PROTOCOL_META_KEY) if isinstance(meta, dict) else None
        cursor: Any = None
        loop = asyncio.get_running_loop()
        report = E.FilterReport()
        started = time.perf_counter()
        complete = False
        for _ in range(PREFLIGHT_MAX_PAGES):
            self.preflight_seq += 1
            request_id = f"warden-preflight-{self.preflight_seq}"
            key = _id_key(request_id)
            request_params: dict[str, Any] = {"cursor": cursor} if cursor else {}
            if isinstance(version, str):
                request_params["_meta"] = {E.PROTOCOL_META_KEY: version}
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self.preflight[key] = future
            try:
                if not await self.to_server({"jsonrpc": "2.0", "id": request_id, "method": "tools/list",
                                             "params": request_params}):
                    break
                response = await asyncio.wait_for(future, PREFLIGHT_TIMEOUT)
            except TimeoutError:
                break
            finally:
                self.preflight.pop(key, None)
            result = response.get("result")
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                break
            E.filter_result(self.policies, self.pins, self.agent, self.server.id, result, report)
            cursor = result.get("nextCursor")
            if not cursor:
                complete = True
                break
        self.tools_stale = not complete
        md = self._allow_md("Warden listed the tools to check pins before a call", "tools/list")
        self._record(md, "warden", started=started, is_error=not complete, report=report)
        return complete

    def _timed_out(self, key: str, msg_id: Any) -> None:
        pending = self.pending.pop(key, None)
        if pending is None:
            return
        text = f"Warden: MCP server '{self.server.id}' did not answer within {self.request_timeout:g} s"
        self._finish(pending, error="timeout")
        asyncio.get_running_loop().create_task(self._answer_quietly(
            self._error(msg_id, INTERNAL_ERROR, text, Reason.MCP_SERVER_FAILED)))

    async def _answer_quietly(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(AgentGone):
            await self.to_agent(message)

    def _finish(self, pending: Pending, *, is_error: bool | None = None, error: str | None = None,
                report: E.FilterReport | None = None, redacted: int = 0) -> None:
        if pending.timer is not None:
            pending.timer.cancel()
        self._record(pending.md, pending.direction, started=pending.started, is_error=True if error else is_error,
                     version=pending.version, batch=pending.batch, events=pending.events, report=report,
                     error=error, redacted=redacted)

    async def _fail_pending(self, text: str) -> None:
        for key, pending in list(self.pending.items()):
            self.pending.pop(key, None)
            self._finish(pending, error="server exited")
            with contextlib.suppress(AgentGone, AssertionError):
                await self.to_agent(self._error(json.loads(key), INTERNAL_ERROR, f"Warden: {text}",
                                                Reason.MCP_SERVER_FAILED))
        for future in self.preflight.values():
            if not future.done():
                future.set_result({})

    # -- server -> agent ------------------------------------------------------------------------------
    async def _server_to_agent(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            async for line in read_lines(self.proc.stdout, self.max_line):
                await self._server_line(line)
        except AgentGone:
            return

    def _bad_server_line(self, text: str) -> None:
        self.bad_lines += 1
        if self.bad_lines <= MAX_BAD_LINE_RECORDS:
            print(f"warden mcp stdio: server '{self.server.id}' {text}", file=sys.stderr, flush=True)
            self._record(self._warden_md(Reason.MCP_INVALID_MESSAGE, f"server {text}"), "server")

    async def _server_line(self, line: bytes | Oversized) -> None:
        if isinstance(line, Oversized):
            msg_id = line.guess_id()
            key = _id_key(msg_id)
            text = f"wrote a {line.size}-byte line, over the {self.max_line}-byte limit; dropped"
            self._bad_server_line(text)
            pending = self.pending.pop(key, None) if msg_id is not None else None
            if pending is not None:
                self._finish(pending, error="response too large")
                await self.to_agent(self._error(msg_id, INTERNAL_ERROR, f"Warden: MCP server '{self.server.id}' "
                                                f"answered with {line.size} bytes, over the {self.max_line}-byte "
                                                f"limit; the answer was dropped", Reason.MCP_SERVER_FAILED))
            elif key in self.preflight:
                self.preflight[key].set_result({})
            return
        if not line.strip():
            return
        parsed = E.parse_messages(line)
        if parsed is None:
            self._bad_server_line("wrote a line to stdout that is not JSON-RPC; dropped")
            return
        messages, batch = parsed
        out: list[dict[str, Any]] = []
        answered: list[tuple[Pending, bool, E.FilterReport]] = []
        for msg in messages:
            kept = await self._server_message(msg, answered)
            if kept is not None:
                out.append(kept)
        redacted = 0
        try:
            if out:
                redacted = await self.to_agent(out if batch else out[0])
        finally:  # recorded once the answer is on its way (or the agent is gone)
            for pending, is_error, report in answered:
                self._finish(pending, is_error=is_error, report=report, redacted=redacted)

    async def _server_message(self, msg: dict[str, Any],
                              answered: list[tuple[Pending, bool, E.FilterReport]]) -> dict[str, Any] | None:
        """Decide one message from the server; the message to forward, or None. Answers to
        pending requests are added to `answered` (their records are written after forwarding)."""
        method = msg.get("method")
        started = time.perf_counter()
        if method is not None:
            if "id" not in msg:
                if method == "notifications/tools/list_changed":
                    self.tools_stale = True
                params = msg.get("params")
                if method == "notifications/cancelled" and isinstance(params, dict):
                    self.server_pending.pop(_id_key(params.get("requestId")), None)
                self._record(self._allow_md(f"{method} allowed", E.short(method, 80)), "server")
                return msg
            key = _id_key(msg["id"])
            if method not in SERVER_TO_CLIENT_METHODS or len(self.server_pending) >= MAX_PENDING \
                    or key in self.server_pending:
                text = f"server->client method {E.short(method, 80)!r} is not allowed through Warden"
                md = self._warden_md(Reason.MCP_METHOD_NOT_ALLOWED, text, E.short(method, 80))
                self._record(md, "server")
                await self.to_server(self._error(msg["id"], METHOD_NOT_FOUND, f"Warden: {text}",
                                                 Reason.MCP_METHOD_NOT_ALLOWED))
                return None
            md = self._allow_md(f"{method} allowed", method)
            self.server_pending[key] = Pending(md, started, "server", E.protocol_version(msg, None))
            return msg
        if "id" not in msg or msg["id"] is None:
            self._bad_server_line("sent a response without an id; dropped")
            return None
        key = _id_key(msg["id"])
        future = self.preflight.get(key)
        if future is not None:
            if not future.done():
                future.set_result(msg)
            return None
        pending = self.pending.pop(key, None)
        if pending is None:
            self._bad_server_line("sent a response to no pending request; dropped")
            return None
        report = E.FilterReport()
        result = msg.get("result")
        if isinstance(result, dict):
            E.filter_result(self.policies, self.pins, self.agent, self.server.id, result, report)
            if pending.md.method == "tools/list" and isinstance(result.get("tools"), list) \
                    and not result.get("nextCursor"):
                self.tools_stale = False
        is_error = "error" in msg or (isinstance(result, dict) and bool(result.get("isError")))
        if pending.timer is not None:
            pending.timer.cancel()
        answered.append((pending, is_error, report))
        return msg
