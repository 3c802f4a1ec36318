"""State Warden keeps per flow and per client connection: the one typed context stages share.

`FlowRecord` (the single `flow.metadata["warden"]` entry) is created once per CONNECT or
HTTP request and carries what the stages learn as the flow travels
identity -> policy -> body plan -> credentials/MCP -> action -> audit, metrics, alerts:

    written by    Identity     agent, identity_method, agent_claimed, auth_failure, request_id
                  Policy       rules (the snapshot every later stage of this flow reads), target,
                               host/port/scheme/method/path, decision, interception,
                               upstream_address, mcp_server
                  BodyPlanner  body and response_body (the BodyPlans, each decided once)
                  Credentials  creds (its typed state), credentials, events
                  Mcp          mcp (its typed state), mcp_server, events
    read by       Outcomes -> Audit, Metrics, Alerts (they never write it)

Cross-cutting facts are decided once and only read afterwards: the canonical `target`
(canonical host, port and percent-decoded path that the decision, the MCP endpoint match and
the credential binding all use) and the `body` plan (buffer / stream and scan / stream /
refuse) that every stage touching the body obeys. A stage that needs the body when the plan
says it was streamed denies; nobody streams a body on its own.

`ConnState` lives as long as the client connection (WeakKeyDictionary keyed by the
mitmproxy Client, as mitmproxy's own proxyauth does): who the agent is after a CONNECT,
which host the tunnel was opened to, and which addresses were checked for it.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from mitmproxy import connection, http

from egresswarden.core.bodyplan import BodyPlan
from egresswarden.core.decision import Decision, Interception, Reason
from egresswarden.core.hostnames import IPAddress
from egresswarden.core.plan import Governed
from egresswarden.core.ruleset import RuleSet

if TYPE_CHECKING:  # typed references to the stages' own state; no import cycle at run time
    from egresswarden.runtime.budget import Reservation
    from egresswarden.stages.credentials import CredentialState
    from egresswarden.stages.mcp import McpFlow

METADATA_KEY = "warden"


def new_request_id() -> str:
    return os.urandom(8).hex()


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes, canonical, decided once by Policy and read by every stage."""

    host: str  # normalised host (IDNA, lower case, no trailing dot); the CONNECT host inside a tunnel
    port: int
    scheme: str
    canonical_path: str | None  # percent-decoded path without query; None when the path was refused


@dataclass
class FlowRecord:
    """What Warden knows about one CONNECT or HTTP request (the per-flow context)."""

    request_id: str
    started: float = field(default_factory=time.monotonic)
    agent: str | None = None
    agent_claimed: str | None = None  # the id a failed login claimed (sanitised), for audit only
    identity_method: str | None = None
    auth_failure: str | None = None  # AuthFailure value when identification failed
    sandbox_id: str | None = None  # set when the agent runs inside `warden sandbox`
    rules: RuleSet | None = None  # the rule-set snapshot this flow is decided with
    target: Target | None = None
    host: str | None = None
    port: int | None = None
    scheme: str | None = None
    method: str | None = None
    path: str | None = None
    decision: Decision | None = None
    interception: Interception | None = None
    body: BodyPlan | None = None  # request body plan
    buffer_reservation: Reservation | None = None  # the buffered request body's share of the agent's budget
    response_body: BodyPlan | None = None
    engine_seconds: float = 0.0
    bytes_up: int = 0  # streamed body bytes (buffered bodies are counted from the flow)
    bytes_down: int = 0
    upstream_address: str | None = None
    credentials: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # alert-worthy events raised on this flow
    creds: CredentialState | None = None
    mcp: McpFlow | None = None
    mcp_server: str | None = None  # id of the MCP server governing this request
    websocket_messages_up: int = 0
    websocket_messages_down: int = 0
    revocation: str | None = None  # set when a reload cut this live flow (runtime/revocation.py)
    audited: bool = False
    mcp_audited: bool = False

    def add_event(self, event: str) -> None:
        if event not in self.events:
            self.events.append(event)


def record_of(flow: http.HTTPFlow) -> FlowRecord:
    rec = flow.metadata.get(METADATA_KEY)
    if rec is None:
        rec = FlowRecord(request_id=new_request_id())
        flow.metadata[METADATA_KEY] = rec
    assert isinstance(rec, FlowRecord)
    return rec


class TunnelMode(StrEnum):
    """How Warden carries a tunnel's bytes; chosen by Interception, never by mitmproxy's defaults."""

    UNDECIDED = "undecided"  # waiting for the client's first bytes
    PASSTHROUGH = "passthrough"  # raw relay after the policy allowed it without interception
    INTERCEPT = "intercept"  # TLS terminated on both legs; every request decided
    EXPLAIN = "explain"  # a refused CONNECT explained in-band: TLS with the client only, never upstream
    CLEARTEXT = "cleartext"  # plain HTTP inside a tunnel that must carry TLS: every request refused
    REFUSED = "refused"  # bytes Warden cannot parse as HTTP: connection closed


@dataclass
class Tunnel:
    """A CONNECT tunnel Warden accepted (allowed, or refused and explained in-band)."""

    agent: str
    host: str  # normalised CONNECT host
    port: int
    decision: Decision  # the CONNECT decision; a deny means every request is answered with it
    request_id: str
    address: IPAddress | None = None
    intercept: bool = False
    sni_mismatch: str | None = None  # the SNI the client sent when it differs from host
    started: float = field(default_factory=time.monotonic)
    bytes_up: int = 0
    bytes_down: int = 0
    mode: TunnelMode = TunnelMode.UNDECIDED
    closed: bool = False
    audited: bool = False  # the tunnel_close record was written
    close_error: str | None = None  # why Warden closed a passthrough tunnel (its tunnel_close `error`)
    raw_tcp: bool = False  # the allowing rule says raw_tcp: true (bytes that are not TLS may pass)
    tls_checked: bool = False  # a ClientHello naming the host, answered by a ServerHello: it carries TLS
    sandbox_id: str | None = None

    @property
    def passthrough(self) -> bool:
        return self.mode is TunnelMode.PASSTHROUGH

    def carries_request_of(self, client: connection.Client) -> bool:
        """Did a request on this tunnel's client connection arrive inside the tunnel? Only once
        Interception chose an HTTP layer for it: TLS with Warden (INTERCEPT, EXPLAIN) or plain
        HTTP inside it (CLEARTEXT, refused). Any other request was read by mitmproxy's HTTP layer
        on the proxy connection itself, after a CONNECT that opened no tunnel (its upstream
        failed, or the client's FIN ended it) from what the client pipelined behind the CONNECT:
        deciding it as a request inside the tunnel sent it upstream in cleartext (red team 17)."""
        if self.mode in (TunnelMode.INTERCEPT, TunnelMode.EXPLAIN):
            return client.tls_established
        return self.mode is TunnelMode.CLEARTEXT


@dataclass
class ConnState:
    """Per client connection."""

    client_ip: str
    client_port: int
    agent: str | None = None
    identity_method: str | None = None
    counted_agent: str | None = None  # the agent whose connection limit this connection counts toward
    gone: bool = False  # client_disconnected ran: nothing may be counted for this connection any more
    # upstream connection id -> agent, for upstreams beyond the first (each counts like a connection)
    extra_upstreams: dict[str, str] = field(default_factory=dict)
    tunnel: Tunnel | None = None
    refusal: tuple[Reason, str] | None = None  # set when Interception closed the connection
    refusal_audited: bool = False
    # (host, port) that reached a governed destination's address under another name -> that destination
    governed: dict[tuple[str, int], Governed] = field(default_factory=dict)
    # upstream (host, port) -> the checked address the connection must use
    pinned: dict[tuple[str, int], IPAddress] = field(default_factory=dict)
    # checked (address, port) -> the one name plain-proxy `https://` requests on this connection
    # reach it under: their upstream TLS is verified for that name (stages/upstream.py)
    tls_names: dict[tuple[IPAddress, int], str] = field(default_factory=dict)


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

    def items(self) -> Iterator[tuple[connection.Client, ConnState]]:
        """Every live client connection and its state (a snapshot: safe while connections close)."""
        return iter(list(self._states.items()))

    def open_tunnels(self) -> list[tuple[connection.Client, ConnState, Tunnel]]:
        """Every allowed CONNECT tunnel whose client is still connected (a snapshot)."""
        return [(client, state, state.tunnel) for client, state in list(self._states.items())
                if state.tunnel is not None and not state.tunnel.closed]
