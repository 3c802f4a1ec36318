"""The local admin socket: how `warden sandbox` registers a sandbox with a running Warden.

`warden run --admin-socket PATH` (mitmproxy option `warden_admin_socket`) listens on a unix
socket in a directory only Warden's user can enter (created 0700; an existing one must be
owned by that user and not group/other accessible), the socket itself 0600, and every peer's
uid is checked with SO_PEERCRED (Warden's own uid or root). The protocol is described in
`egresswarden.sandbox.protocol`.

How a sandbox becomes an identity:

* `register` checks the agent and picks its sandbox profile from the *current* rules (the
  profile is policy: the launcher gets it from Warden, it does not choose it), then creates a
  session: a random 256-bit token (`wsb_<64 hex>`, only its sha256 is kept), the agent, a
  sandbox id. The reply carries what the launcher needs: the token, the proxy address, the
  CA bundle and paths to hide inside the sandbox (Warden's confdir, secrets_dir, audit log).
* `conn` announces a source port of the launcher's bridge connection to the proxy before
  the bridge sends any byte. `SESSIONS.identify` (called by the Identity stage) accepts a
  session token only from a loopback peer on a port its own session announced, so the token
  is useless to any other process on the host even if it reads the sandbox's environment.
* When the registering connection closes, for whatever reason, the session is revoked.

Sandbox lifecycle records (sandbox_start, sandbox_refused, sandbox_exit) are written by
Warden itself into its hash-chained audit log, from the session's own facts (agent, profile,
sandbox id) plus sanitised facts from the launcher; a refused sandbox raises the
`sandbox_refused` alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions

from egresswarden.core.identity import AgentIdentity, IdentityMethod, parse_basic
from egresswarden.core.model import ANONYMOUS_AGENT, DEFAULT_SANDBOX_PROFILE, Agent
from egresswarden.core.ruleset import RuleSet
from egresswarden.record import fields as F
from egresswarden.record.alerts import Alerts
from egresswarden.record.audit import Audit
from egresswarden.runtime.rulestore import RuleStore
from egresswarden.sandbox.protocol import (
    LIMITS_BACKENDS,
    MAX_REQUEST_BYTES,
    TOKEN_PREFIX,
    LimitHit,
    Op,
    Refusal,
    limits_from_wire,
    limits_to_wire,
    profile_to_wire,
)

logger = logging.getLogger("warden")

_AGENT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_SIGNAL_NAME = re.compile(r"^SIG[A-Z0-9+-]{1,12}$")
_MAX_TEXT = 500


def _text(value: Any, limit: int = _MAX_TEXT) -> str | None:
    """A launcher-supplied string for an audit record: bounded, printable."""
    if not isinstance(value, str):
        return None
    return "".join(c if c.isprintable() else "?" for c in value[:limit])


@dataclass
class Session:
    agent: str
    sandbox_id: str
    profile: str
    digest: bytes
    ports: set[int] = field(default_factory=set)
    started: float | None = None  # monotonic time of `started`
    command: str | None = None
    exited: bool = False


class SandboxSessions:
    """Live sandbox sessions of this process, by sha256 of their token."""

    def __init__(self) -> None:
        self._by_digest: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def add(self, session: Session) -> None:
        self._by_digest[session.digest] = session

    def revoke(self, session: Session) -> None:
        self._by_digest.pop(session.digest, None)

    def identify(self, rules: RuleSet, header: str | None, client_ip: str,
                 client_port: int) -> tuple[AgentIdentity, str] | None:
        """(identity, sandbox id) when `header` carries a live session token from its own bridge.

        None means "not a sandbox session"; the caller then identifies the usual way, which
        refuses a session token as an unknown token (407).
        """
        if not self._by_digest or not header:
            return None
        creds = parse_basic(header)
        if creds is None or not creds.token.startswith(TOKEN_PREFIX):
            return None
        session = self._by_digest.get(hashlib.sha256(creds.token.encode()).digest())
        if session is None or session.agent != creds.agent or client_port not in session.ports:
            return None
        try:
            if not ipaddress.ip_address(client_ip).is_loopback:
                return None
        except ValueError:
            return None
        agent = rules.agents.get(session.agent)
        if agent is None or not agent.source_ok(ipaddress.ip_address(client_ip)):
            return None  # the agent was removed by a reload, or its sources exclude loopback
        return AgentIdentity(session.agent, IdentityMethod.SANDBOX), session.sandbox_id


SESSIONS = SandboxSessions()


class AdminSocketError(Exception):
    pass


def prepare_socket_dir(path: Path) -> None:
    """Make sure the socket's directory exists, is ours and is closed to everyone else."""
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    st = parent.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise AdminSocketError(f"{parent} is not a directory")
    if st.st_uid != os.geteuid():
        raise AdminSocketError(f"{parent} is owned by uid {st.st_uid}, not by Warden's user ({os.geteuid()})")
    if st.st_mode & 0o077:
        raise AdminSocketError(f"{parent} is accessible to group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                               f"chmod 700 it")


def bind_admin_socket(path: Path) -> socket.socket:
    prepare_socket_dir(path)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AdminSocketError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: a previous Warden died without removing it
        else:
            raise AdminSocketError(f"another process is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class Admin:
    """mitmproxy addon: the admin socket server and the sandbox lifecycle records."""

    def __init__(self, store: RuleStore, audit: Audit, alerts: Alerts) -> None:
        self.store = store
        self.audit = audit
        self.alerts = alerts
        self.path: Path | None = None
        self.sock: socket.socket | None = None
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def load(self, loader: Any) -> None:
        loader.add_option("warden_admin_socket", str, "",
                          "Unix socket for `warden sandbox --attach` (0600, in a 0700 directory); empty: off.")

    def configure(self, updated: set[str]) -> None:
        if "warden_admin_socket" not in updated:
            return
        self._close()
        value = ctx.options.warden_admin_socket
        if not value:
            return
        path = Path(value).expanduser().absolute()
        try:
            self.sock = bind_admin_socket(path)
        except (OSError, AdminSocketError) as e:
            raise exceptions.OptionsError(
                f"warden: cannot open the admin socket {path}: {e}") from None
        self.path = path

    def running(self) -> None:
        if self.sock is not None and self.server is None:
            task = asyncio.get_running_loop().create_task(self._serve(self.sock))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _serve(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_REQUEST_BYTES)

    def done(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.path = None

    # -- one connection = one sandbox ----------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        session: list[Session] = []  # 0 or 1; a list so the handlers can set it
        try:
            uid = _peer_uid(sock)
            if uid not in (0, os.geteuid()):
                logger.warning("warden: admin socket: refused a client with uid %d", uid)
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    break  # over MAX_REQUEST_BYTES: not a launcher
                if not line:
                    break
                try:
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise ValueError("not an object")
                    reply = self._handle(message, session)
                except (ValueError, TypeError) as e:
                    reply = {"ok": False, "reason": Refusal.BAD_REQUEST.value, "message": f"bad request: {e}"[:200]}
                writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if session:
                self._end(session[0], None)
            with contextlib.suppress(Exception):
                writer.close()

    def _handle(self, message: dict[str, Any], session: list[Session]) -> dict[str, Any]:
        op = message.get("op")
        if op == Op.CONN or op == Op.UNCONN:
            port = message.get("port")
            if not session or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError("conn needs a registered session and a port")
            (session[0].ports.add if op == Op.CONN else session[0].ports.discard)(port)
            return {"ok": True}
        if op == Op.REGISTER:
            if session:
                raise ValueError("already registered")
            return self._register(message, session)
        if not session:
            raise ValueError(f"{op!r} needs a registered session")
        current = session[0]
        if op == Op.STARTED:
            self._started(current, message)
            return {"ok": True}
        if op == Op.REFUSED:
            raw_reason = message.get("reason")
            reason = raw_reason if isinstance(raw_reason, str) and raw_reason in set(Refusal) else Refusal.SETUP_FAILED
            self._refused(current.agent, current.profile, current.sandbox_id, reason, _text(message.get("message")),
                          _text(message.get("command"), 128), _text(message.get("workdir"), 4096))
            current.exited = True
            SESSIONS.revoke(current)
            return {"ok": True}
        if op == Op.EXIT:
            self._end(current, message)
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    def _register(self, message: dict[str, Any], session: list[Session]) -> dict[str, Any]:
        rules = self.store.current
        agent_id = message.get("agent")
        requested = message.get("profile")
        command = _text(message.get("command"), 128)
        workdir = _text(message.get("workdir"), 4096)
        sandbox_id = "sb-" + secrets.token_hex(6)
        shown_agent = agent_id if isinstance(agent_id, str) and _AGENT_ID.match(agent_id) else None

        def refuse(reason: Refusal, text: str, profile: str | None = None) -> dict[str, Any]:
            self._refused(shown_agent, profile, sandbox_id, reason.value, text, command, workdir)
            return {"ok": False, "reason": reason.value, "message": text, "sandbox_id": sandbox_id}

        if rules is None:
            return refuse(Refusal.RULES_UNAVAILABLE, "Warden has no rules loaded")
        agent = self._agent(rules, agent_id)
        if agent is None or rules.agents.get(agent.id) is None:
            return refuse(Refusal.UNKNOWN_AGENT, f"no agent {str(agent_id)[:64]!r} in the rules"
                          if agent_id != ANONYMOUS_AGENT else "the anonymous agent cannot be sandboxed")
        bound = agent.sandbox_profile
        if requested is not None and not isinstance(requested, str):
            raise ValueError("profile must be a string")
        if bound is not None and requested is not None and requested != bound:
            return refuse(Refusal.PROFILE_NOT_ALLOWED,
                          f"agent {agent.id!r} is bound to sandbox profile {bound!r} by the rules "
                          f"({agent.origin}); --profile {requested[:64]!r} is not allowed", requested[:64])
        name = requested or bound or DEFAULT_SANDBOX_PROFILE
        profile = rules.model.sandbox_profiles.get(name)
        if profile is None:
            known = ", ".join(sorted(rules.model.sandbox_profiles))
            return refuse(Refusal.UNKNOWN_PROFILE, f"no sandbox profile {name[:64]!r} (known: {known})", name[:64])
        token = TOKEN_PREFIX + secrets.token_hex(32)
        current = Session(agent.id, sandbox_id, profile.id, hashlib.sha256(token.encode()).digest())
        SESSIONS.add(current)
        session.append(current)
        return {
            "ok": True,
            "sandbox_id": sandbox_id,
            "agent": agent.id,
            "token": token,
            "proxy": self._proxy_address(),
            "ca_bundle": self._ca_bundle(),
            "profile": profile_to_wire(profile),
            "hidden": self._hidden_paths(rules),
            "policy_version": rules.version,
        }

    @staticmethod
    def _agent(rules: RuleSet, agent_id: Any) -> Agent | None:
        if not isinstance(agent_id, str) or agent_id == ANONYMOUS_AGENT:
            return None
        return next((a for a in rules.model.agents if a.id == agent_id), None)

    @staticmethod
    def _proxy_address() -> list[Any]:
        server = ctx.master.addons.get("proxyserver")
        for host, port, *_ in server.listen_addrs():
            # Warden listens on 0.0.0.0 or :: in some deployments: the bridge uses loopback.
            if host in ("0.0.0.0", "", "::"):
                host = "127.0.0.1"
            try:
                if ipaddress.ip_address(host).version == 4 or host == "::1":
                    return [host, port]
            except ValueError:
                continue
        raise ValueError("the proxy is not listening on an IPv4 or loopback address")

    @staticmethod
    def _ca_bundle() -> str:
        from egresswarden.cli.ca import build_bundle

        return build_bundle(Path(ctx.options.confdir).expanduser()).decode()

    def _hidden_paths(self, rules: RuleSet) -> list[str]:
        """Warden's own files: a sandboxed agent must see none of them."""
        paths = [str(Path(ctx.options.confdir).expanduser().absolute())]
        if self.path is not None:
            paths.append(str(self.path.parent))
        secrets_dir = rules.settings.secrets_dir
        if secrets_dir:
            p = Path(secrets_dir)
            paths.append(str(p if p.is_absolute() else Path(rules.model.rules_dir) / p))
        audit_log = ctx.options.warden_audit_log
        if audit_log and audit_log != "-":
            paths.append(str(Path(audit_log).expanduser().absolute()))
        return paths

    # -- records -------------------------------------------------------------------------------
    def _refused(self, agent: str | None, profile: str | None, sandbox_id: str, reason: str, message: str | None,
                 command: str | None, workdir: str | None) -> None:
        rules = self.store.current
        record = {F.EVENT: "sandbox_refused", F.SANDBOX_ID: sandbox_id, F.AGENT: agent, F.PROFILE: profile,
                  F.REASON: reason, F.MESSAGE: message, F.COMMAND: command, F.WORKDIR: workdir,
                  F.POLICY_VERSION: rules.version if rules else None}
        self.audit.emit(record)
        self.alerts.raise_alert("sandbox_refused", dict(record))

    def _started(self, session: Session, message: dict[str, Any]) -> None:
        if session.started is not None:
            raise ValueError("already started")
        backend = message.get("limits_backend")
        session.started = time.monotonic()
        session.command = _text(message.get("command"), 128)
        rules = self.store.current
        self.audit.emit({F.EVENT: "sandbox_start", F.SANDBOX_ID: session.sandbox_id, F.AGENT: session.agent,
                         F.PROFILE: session.profile, F.COMMAND: session.command,
                         F.WORKDIR: _text(message.get("workdir"), 4096),
                         F.LIMITS: limits_to_wire(limits_from_wire(message.get("limits"))),
                         F.LIMITS_BACKEND: backend if backend in LIMITS_BACKENDS else None,
                         F.LAUNCHER_PID: message.get("pid") if isinstance(message.get("pid"), int) else None,
                         F.POLICY_VERSION: rules.version if rules else None})

    def _end(self, session: Session, message: dict[str, Any] | None) -> None:
        SESSIONS.revoke(session)
        if session.exited:
            return
        session.exited = True
        if session.started is None:
            return  # registered, never started nor refused: nothing ran
        record: dict[str, Any] = {F.EVENT: "sandbox_exit", F.SANDBOX_ID: session.sandbox_id, F.AGENT: session.agent,
                                  F.PROFILE: session.profile, F.COMMAND: session.command,
                                  F.DURATION_MS: round((time.monotonic() - session.started) * 1000, 3)}
        if message is None:
            record.update({F.EXIT_STATUS: None, F.SIGNAL: None, F.LIMIT_HIT: None,
                           F.ERROR: "the launcher's connection closed before it reported the exit"})
        else:
            status = message.get("exit_status")
            signal_name = message.get("signal")
            limit_hit = message.get("limit_hit")
            record[F.EXIT_STATUS] = status if isinstance(status, int) and not isinstance(status, bool) else None
            record[F.SIGNAL] = signal_name if isinstance(signal_name, str) and _SIGNAL_NAME.match(signal_name) else None
            record[F.LIMIT_HIT] = limit_hit if isinstance(limit_hit, str) and limit_hit in set(LimitHit) else None
            if message.get("error"):
                record[F.ERROR] = _text(message.get("error"))
        self.audit.emit(record)
