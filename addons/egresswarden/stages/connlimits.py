"""ConnectionLimits addon: the connection bounds of runtime/connlimits.py on mitmproxy's path.

Runs right after Identity. A CONNECT, or the first identified plain-HTTP request of a client
connection, counts that connection for its agent until the client disconnects; past the
agent's `settings.limits.max_connections_per_agent` it is denied 429 `connection_limit`
(later stages see the response and skip it, Outcomes audits it). Requests inside a tunnel
ride on their CONNECT's count. The process bound is checked where connections are accepted:
by the fast CONNECT listener (runtime/fastconnect.FrontDoor), or here in `client_connected`
when mitmproxy's own listener runs (`warden_fast_connect=false`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import connection, ctx, exceptions, http

from egresswarden.core.decision import Reason, deny
from egresswarden.runtime.connlimits import (
    ConnectionCounts,
    agent_limit_text,
    default_max_connections,
    process_limit_answer,
)
from egresswarden.runtime.context import Connections, record_of
from egresswarden.runtime.failsafe import refusal_response
from egresswarden.runtime.rulestore import RuleStore
from egresswarden.runtime.sockets import connection_handler

logger = logging.getLogger("warden")


class ConnectionLimits:
    def __init__(self, store: RuleStore, connections: Connections, counts: ConnectionCounts,
                 fast_listener: Callable[[], bool]) -> None:
        self.store = store
        self.connections = connections
        self.counts = counts
        self.fast_listener = fast_listener  # True: the fast listener admits connections itself

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
        if self.fast_listener():
            return  # admitted (or refused) by the fast listener, before mitmproxy saw it
        proxyserver = ctx.master.addons.get("proxyserver")
        open_now = len(getattr(proxyserver, "connections", ()))
        if not self.counts.over_process_limit(open_now):
            return
        handler = connection_handler(client)
        transport = handler.transports.get(client) if handler is not None else None
        if transport is not None and transport.writer is not None:
            transport.writer.write(process_limit_answer(self.counts.max_connections))
        client.error = "connection_limit"  # mitmproxy closes the connection without reading it

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._admit(flow)

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
        if state.counted_agent is not None:
            return  # the connection already counts (for its first agent)
        limit = rules.settings.max_connections_per_agent
        if self.counts.admit_agent(record.agent, limit):
            state.counted_agent = record.agent
            return
        self.counts.refused_agent += 1
        record.decision = deny(Reason.CONNECTION_LIMIT, agent_limit_text(record.agent, limit), rules.version)
        flow.response = refusal_response(record.decision, record.agent)

    def client_disconnected(self, client: connection.Client) -> None:
        state = self.connections.peek(client)
        if state is not None and state.counted_agent is not None:
            self.counts.release_agent(state.counted_agent)
            state.counted_agent = None
