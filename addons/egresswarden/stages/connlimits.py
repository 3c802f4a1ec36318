"""ConnectionLimits addon: the connection bounds of runtime/connlimits.py on mitmproxy's path.

Runs right after Identity. A CONNECT, or the first identified plain-HTTP request of a client
connection, counts that connection for its agent until the client disconnects; past the
agent's `settings.limits.max_connections_per_agent` it is denied 429 `connection_limit`
(later stages see the response and skip it, Outcomes audits it). Requests inside a tunnel
ride on their CONNECT's count; each upstream connection beyond the first of a client
connection counts too (`server_connect`). The process bound is checked where connections are
accepted: by the fast CONNECT listener (runtime/fastconnect.FrontDoor), or here in
`client_connected` when mitmproxy's own listener runs (`warden_fast_connect=false`). At the
bound, the oldest connection no agent was identified on is closed to make room
(`evict_unidentified`; the fast listener first evicts its own doors still without a head).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.proxy import server_hooks

from egresswarden.core.decision import Reason, deny
from egresswarden.record import fields as F
from egresswarden.record.audit import Audit
from egresswarden.runtime.connlimits import (
    AUDIT_WINDOW,
    PENDING_MIN_AGE,
    ConnectionCounts,
    agent_limit_text,
    default_max_connections,
    process_limit_answer,
)
from egresswarden.runtime.context import Connections, record_of
from egresswarden.runtime.failsafe import refusal_response
from egresswarden.runtime.rulestore import RuleStore
from egresswarden.runtime.sockets import close_client, connection_handler

logger = logging.getLogger("warden")


class ConnectionLimits:
    def __init__(self, store: RuleStore, connections: Connections, counts: ConnectionCounts,
                 fast_listener: Callable[[], bool], audit: Audit) -> None:
        self.store = store
        self.audit = audit
        self.connections = connections
        self.counts = counts
        self.fast_listener = fast_listener  # True: the fast listener admits connections itself
        # mitmproxy's connections no agent was identified on yet, oldest first (evictable)
        self.unidentified: dict[connection.Client, float] = {}
        counts.evict_unidentified = self.evict_unidentified
        counts.on_unaudited = self._audit_soon
        audit.closing_listeners.append(self.audit_closures)
        self._audit_timer: asyncio.TimerHandle | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "warden_max_connections", int, 0,
            "Client connections this process holds open at most; past it a new connection is answered 503 "
            "connection_limit and closed before it is read. 0: derived from RLIMIT_NOFILE (two descriptors per "
            "connection, a quarter kept for the kernel relay, 512 for everything else).")

    def configure(self, updated: set[str]) -> None:
        value = int(ctx.options.warden_max_connections)
        if value < 0:
            raise exceptions.OptionsError("warden: warden_max_connections must be 0 (automatic) or more")
        self.counts.max_connections = value or default_max_connections()

    def client_connected(self, client: connection.Client) -> None:
        # The fast listener admitted (or refused) it before mitmproxy saw it, and may have
        # counted it for its agent already; mitmproxy's own listener admits here.
        if self.fast_listener():
            agent = self.counts.claim_handed_over((str(client.peername[0]), int(client.peername[1])))
            if agent is not None:
                self.connections.get(client).counted_agent = agent  # released at client_disconnected
                return
        if self.fast_listener() or self.counts.open_connections() <= self.counts.max_connections \
                or self.evict_unidentified():
            self.unidentified[client] = time.monotonic()
            return
        self.counts.note_closed(str(client.peername[0]), evicted=False)
        handler = connection_handler(client)
        transport = handler.transports.get(client) if handler is not None else None
        if transport is not None and transport.writer is not None:
            transport.writer.write(process_limit_answer(self.counts.max_connections))
        client.error = "connection_limit"  # mitmproxy closes the connection without reading it

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._admit(flow)

    # -- the audit record of closures by the process bound ---------------------------------
    def _audit_soon(self) -> None:
        if self._audit_timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the loop (cannot happen in warden run): write at once
                self.audit_closures()
                return
            self._audit_timer = loop.call_later(AUDIT_WINDOW, self.audit_closures)

    def audit_closures(self) -> None:
        """One `connections_refused` record for the closures of the window (and at shutdown)."""
        if self._audit_timer is not None:
            self._audit_timer.cancel()
            self._audit_timer = None
        closed, since = self.counts.take_unaudited()
        if not closed:
            return
        self.audit.emit({
            F.EVENT: "connections_refused", F.LIMIT: "process", F.MAX_CONNECTIONS: self.counts.max_connections,
            F.REFUSED: sum(r for r, _ in closed.values()), F.EVICTED: sum(e for _, e in closed.values()),
            F.CLIENTS: [{F.CLIENT_IP: ip, F.REFUSED: r, F.EVICTED: e} for ip, (r, e) in closed.items()],
            F.WINDOW_MS: round((time.monotonic() - since) * 1000, 3),
            F.MESSAGE: "connections closed by warden_max_connections: answered 503 at accept, or evicted "
                       "(no agent identified on them) to make room",
        })

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        state = self.connections.peek(flow.client_conn)
        if state is None or state.tunnel is None:  # plain HTTP; inside a tunnel its CONNECT counted
            self._admit(flow)

    def _admit(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # identity already refused it
        record = record_of(flow)
        rules = self.store.current
        if record.agent is None or rules is None:
            return
        state = self.connections.get(flow.client_conn)
        if state.counted_agent is not None or state.gone:
            return  # counted already (for its first agent), or gone: nothing would give it back
        limit = rules.settings.max_connections_per_agent
        if self.counts.admit_agent(record.agent, limit):
            state.counted_agent = record.agent
            self.unidentified.pop(flow.client_conn, None)
            return
        self.counts.refused_agent += 1
        record.decision = deny(Reason.CONNECTION_LIMIT, agent_limit_text(record.agent, limit), rules.version)
        flow.response = refusal_response(record.decision, record.agent)
        # closed after the answer: a refused connection held open counts for no agent (red team 18)
        flow.response.headers["Connection"] = "close"

    # -- upstream connections beyond the first of a client connection ----------------------
    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """A plain-HTTP keep-alive connection keeps an upstream connection per host:port it used
        (mitmproxy's): each one beyond the first counts like a connection of its agent, and
        toward the process limit (red team 18: 10 client connections held 960 descriptors)."""
        server, client = data.server, data.client
        if server.error:
            return
        handler = connection_handler(client)
        if handler is None or not any(conn is not client for conn in handler.transports):
            return  # the first upstream of this client connection: covered by its own count
        state = self.connections.peek(client)
        agent = state.counted_agent if state is not None else None
        rules = self.store.current
        if state is None or agent is None or rules is None or state.gone:
            server.error = "warden: an upstream connection for a connection no agent was identified on"
            return
        limit = rules.settings.max_connections_per_agent
        if self.counts.open_connections() >= self.counts.max_connections:
            self.counts.refused_process += 1
            server.error = (f"Warden holds {self.counts.max_connections} connections, its limit "
                            f"(warden_max_connections); retry shortly on a new connection")
            return
        if not self.counts.admit_agent(agent, limit):
            self.counts.refused_agent += 1
            server.error = (f"agent '{agent}' already has {limit} connections open through Warden, counting each "
                            f"upstream host beyond the first of one connection (settings.limits."
                            f"max_connections_per_agent); reuse fewer hosts per connection, or close some")
            return
        state.extra_upstreams[server.id] = agent
        self.counts.extra_upstreams += 1

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._release_upstream(data)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self._release_upstream(data)

    def _release_upstream(self, data: server_hooks.ServerConnectionHookData) -> None:
        state = self.connections.peek(data.client)
        agent = state.extra_upstreams.pop(data.server.id, None) if state is not None else None
        if agent is not None:
            self.counts.extra_upstreams -= 1
            self.counts.release_agent(agent)

    def evict_unidentified(self) -> bool:
        """Close the oldest connection no agent was identified on (after a 407, a refusal, or
        an unfinished next head), if it is PENDING_MIN_AGE old: the process limit is reached."""
        now = time.monotonic()
        while self.unidentified:
            client, since = next(iter(self.unidentified.items()))
            if now - since < PENDING_MIN_AGE:
                return False
            del self.unidentified[client]
            if close_client(client, abort=True):
                self.counts.note_closed(str(client.peername[0]), evicted=True)
                logger.info("warden: closed a connection no agent was identified on, at warden_max_connections")
                return True
        return False

    def client_disconnected(self, client: connection.Client) -> None:
        self.unidentified.pop(client, None)
        state = self.connections.peek(client)
        if state is None:
            return
        state.gone = True  # a hook that runs after this one (a pipelined CONNECT) counts nothing (red team 19)
        if state.counted_agent is not None:
            self.counts.release_agent(state.counted_agent)
            state.counted_agent = None
        for agent in state.extra_upstreams.values():  # mitmproxy closes them with the client
            self.counts.extra_upstreams -= 1
            self.counts.release_agent(agent)
        state.extra_upstreams.clear()
