"""State Warden keeps per flow and per client connection.

`FlowRecord` (in `flow.metadata["warden"]`) accumulates what the addons learn about one
CONNECT or HTTP request as it travels identity -> policy -> credentials/MCP -> audit,
metrics, alerts. The last three only read it, so they always report the same decision.

`ConnState` lives as long as the client connection (WeakKeyDictionary keyed by the
mitmproxy Client, as mitmproxy's own proxyauth does): who the agent is after a CONNECT,
which host the tunnel was opened to, and which addresses were checked for it.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import connection, http

from egresswarden.core.decision import Decision, Interception
from egresswarden.core.hostnames import IPAddress

METADATA_KEY = "warden"


def new_request_id() -> str:
    return os.urandom(8).hex()


@dataclass
class FlowRecord:
    """What Warden knows about one CONNECT or HTTP request."""

    kind: str  # "connect" | "request"
    request_id: str
    started: float = field(default_factory=time.monotonic)
    agent: str | None = None
    agent_claimed: str | None = None  # the id a failed login claimed (sanitised), for audit only
    identity_method: str | None = None
    host: str | None = None
    port: int | None = None
    scheme: str | None = None
    method: str | None = None
    path: str | None = None
    decision: Decision | None = None
    interception: Interception | None = None
    engine_seconds: float = 0.0
    upstream_address: str | None = None
    credentials: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # alert-worthy events raised on this flow
    extra: dict[str, Any] = field(default_factory=dict)
    audited: bool = False
    sandbox_id: str | None = None  # set when the agent was identified by a `warden sandbox` session


def record_of(flow: http.HTTPFlow) -> FlowRecord:
    rec = flow.metadata.get(METADATA_KEY)
    if rec is None:
        rec = FlowRecord(kind="connect" if flow.request.method == "CONNECT" else "request", request_id=new_request_id())
        flow.metadata[METADATA_KEY] = rec
    return rec


@dataclass
class Tunnel:
    """A CONNECT tunnel that was allowed."""

    agent: str
    host: str  # normalised CONNECT host
    port: int
    decision: Decision
    request_id: str
    address: IPAddress | None = None
    intercept: bool = False
    sni_mismatch: str | None = None  # the SNI the client sent when it differs from host
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    passthrough: bool = False
    layer_decided: bool = False
    closed: bool = False
    sandbox_id: str | None = None


@dataclass
class ConnState:
    """Per client connection."""

    client_ip: str
    client_port: int
    agent: str | None = None
    identity_method: str | None = None
    sandbox_id: str | None = None
    tunnel: Tunnel | None = None
    # upstream (host, port) -> the checked address the connection must use
    pinned: dict[tuple[str, int], IPAddress] = field(default_factory=dict)


class Connections:
    """Registry of ConnState by mitmproxy Client; entries vanish with the connection."""

    def __init__(self) -> None:
        self._states: weakref.WeakKeyDictionary[connection.Client, ConnState] = weakref.WeakKeyDictionary()

    def get(self, client: connection.Client) -> ConnState:
        state = self._states.get(client)
        if state is None:
            peer = client.peername or ("", 0)
            state = ConnState(str(peer[0]), int(peer[1]) if len(peer) > 1 else 0)
            self._states[client] = state
        return state

    def peek(self, client: connection.Client) -> ConnState | None:
        return self._states.get(client)
