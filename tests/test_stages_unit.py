"""Unit tests for the stages' failure paths: layer choice inside tunnels, the upstream guard,
and the Outcomes a closed or refused connection produces. The end-to-end proof of the same
behaviour is in test_bypass_e2e.py; these pin down each branch cheaply."""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any

import pytest
from egresswarden.core.decision import Decision, Reason, Verdict, deny
from egresswarden.record.outcome import Outcome, Outcomes
from egresswarden.runtime.context import Connections, Tunnel, TunnelMode
from egresswarden.stages.interception import CountingTCPLayer, Interception, RefusedLayer
from egresswarden.stages.upstream import UpstreamGuard
from mitmproxy import connection, options
from mitmproxy.proxy import context, events, layer, layers
from mitmproxy.proxy.layers import modes
from mitmproxy.proxy.server_hooks import ServerConnectionHookData
from mitmproxy.test import taddons

ALLOW = Decision(Verdict.ALLOW, Reason.ALLOWED, "r", "allowed", "v1", intercept=True)
PASS = Decision(Verdict.ALLOW, Reason.ALLOWED, "r", "allowed", "v1", intercept=False)
DENIED = deny(Reason.NO_MATCHING_RULE, "no rule", "v1")


def client_hello(sni: str = "api.test", alpn: list[str] | None = None) -> bytes:
    """A real ClientHello from Python's ssl module, captured from a memory BIO."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def tunnel_context(connections: Connections, decision: Decision, *, tls: bool = False,
                   alpn: bytes | None = None, raw_tcp: bool = False) -> tuple[context.Context, Tunnel]:
    client = connection.Client(peername=("127.0.0.1", 5000), sockname=("127.0.0.1", 8080), timestamp_start=0)
    client.state = connection.ConnectionState.OPEN  # a live client, as mitmproxy's server sets it
    ctxt = context.Context(client, options.Options())
    ctxt.server.address = ("api.test", 443)
    modes.HttpProxy(ctxt)  # each layer appends itself to ctxt.layers, as in a real stack
    layers.HttpLayer(ctxt, layers.http.HTTPMode.regular)
    if tls:
        layers.ClientTLSLayer(ctxt)
        client.timestamp_tls_setup = 1.0  # TLS with the client is established (the layer reset it)
        client.alpn = alpn
    state = connections.get(client)
    tunnel = Tunnel("coder", "api.test", 443, decision, "rid",
                    address=ipaddress.ip_address("127.0.0.1"), intercept=decision.intercept, raw_tcp=raw_tcp)
    if tls:
        tunnel.mode = TunnelMode.INTERCEPT if decision.allowed else TunnelMode.EXPLAIN
    state.tunnel = tunnel
    return ctxt, tunnel


def decide_layer(stage: Interception, ctxt: context.Context, client_data: bytes = b"",
                 server_data: bytes = b"") -> layer.NextLayer:
    nl = layer.NextLayer(ctxt)
    if client_data:
        nl.events.append(events.DataReceived(ctxt.client, client_data))
    if server_data:
        nl.events.append(events.DataReceived(ctxt.server, server_data))
    stage.next_layer(nl)
    return nl


@pytest.fixture
def stage() -> Any:
    connections = Connections()
    interception = Interception(connections)
    with taddons.context(interception):
        yield interception, connections


CASES = [
    # (decision, tls already, alpn, client bytes, server bytes, expected layer type or None=wait, mode)
    pytest.param(ALLOW, False, None, b"G", b"", None, TunnelMode.UNDECIDED, id="split first write: wait, not raw relay"),
    pytest.param(ALLOW, False, None, b"GET / HTTP/1.1\r\n", b"", layers.HttpLayer, TunnelMode.CLEARTEXT,
                 id="cleartext HTTP into an intercepted tunnel: parsed, to be refused"),
    pytest.param(ALLOW, False, None, b"\x00\x01\x02garbage\n", b"", RefusedLayer, TunnelMode.REFUSED,
                 id="raw bytes into an intercepted tunnel: closed"),
    pytest.param(ALLOW, False, None, b"", b"SSH-2.0-x\r\n", RefusedLayer, TunnelMode.REFUSED,
                 id="server speaks first into an intercepted tunnel: closed"),
    pytest.param(PASS, False, None, b"", b"SSH-2.0-x\r\n", RefusedLayer, TunnelMode.REFUSED,
                 id="server speaks first into a passthrough without raw_tcp: closed"),
    pytest.param(PASS, False, None, b"\x00\x01raw", b"", RefusedLayer, TunnelMode.REFUSED,
                 id="raw bytes into a passthrough without raw_tcp: closed"),
    pytest.param(ALLOW, True, None, b"GET /x HTTP/1.1\r\n", b"", layers.HttpLayer, TunnelMode.INTERCEPT,
                 id="after TLS without ALPN: a whole request line is HTTP"),
    pytest.param(ALLOW, True, None, b"GE", b"", None, TunnelMode.INTERCEPT, id="after TLS: split request line waits"),
    pytest.param(ALLOW, True, None, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"", RefusedLayer, TunnelMode.REFUSED,
                 id="after TLS: HTTP/2 preface without ALPN is refused"),
    pytest.param(ALLOW, True, None, b"\x16\x03\x01 not http\n", b"", RefusedLayer, TunnelMode.REFUSED,
                 id="after TLS: non-HTTP bytes are refused"),
    pytest.param(ALLOW, True, b"h2", b"", b"", layers.HttpLayer, TunnelMode.INTERCEPT, id="ALPN h2 is HTTP"),
    pytest.param(ALLOW, True, b"imap", b"", b"", RefusedLayer, TunnelMode.REFUSED, id="unknown ALPN is refused"),
    pytest.param(DENIED, True, None, b"GET / HTTP/1.1\r\n", b"", layers.HttpLayer, TunnelMode.EXPLAIN,
                 id="explain tunnel after TLS: HTTP, answered by Policy"),
]


@pytest.mark.parametrize("decision,tls,alpn,client,server,expected,mode", CASES)
def test_layer_choice(stage: Any, decision: Decision, tls: bool, alpn: bytes | None, client: bytes, server: bytes,
                      expected: type | None, mode: TunnelMode) -> None:
    interception, connections = stage
    ctxt, tunnel = tunnel_context(connections, decision, tls=tls, alpn=alpn)
    nl = decide_layer(interception, ctxt, client, server)
    if expected is None:
        assert nl.layer is None
    else:
        assert type(nl.layer) is expected or isinstance(nl.layer, expected)
    assert tunnel.mode is mode
    state = connections.peek(ctxt.client)
    assert (state.refusal is not None) == (expected is RefusedLayer)
    if expected is RefusedLayer:
        assert state.refusal[0] is Reason.NOT_HTTP


def test_client_hello_intercept_and_passthrough(stage: Any) -> None:
    interception, connections = stage
    ctxt, tunnel = tunnel_context(connections, ALLOW)
    nl = decide_layer(interception, ctxt, client_hello()[:20])
    assert nl.layer is None, "a partial ClientHello waits"
    nl = decide_layer(interception, ctxt, client_hello())
    assert isinstance(nl.layer, layers.ServerTLSLayer) and tunnel.mode is TunnelMode.INTERCEPT
    ctxt, tunnel = tunnel_context(connections, PASS)
    nl = decide_layer(interception, ctxt, client_hello("evil.test"))
    assert isinstance(nl.layer, layers.ServerTLSLayer), "SNI fronting forces interception"
    assert tunnel.sni_mismatch == "evil.test"
    ctxt, tunnel = tunnel_context(connections, DENIED)
    nl = decide_layer(interception, ctxt, client_hello())
    assert isinstance(nl.layer, layers.ClientTLSLayer), "explain: TLS with the client only, no upstream"


def test_layer_decision_outside_a_tunnel_is_refused(stage: Any) -> None:
    interception, connections = stage
    client = connection.Client(peername=("127.0.0.1", 5001), sockname=("127.0.0.1", 8080), timestamp_start=0)
    ctxt = context.Context(client, options.Options())
    modes.HttpProxy(ctxt)
    assert decide_layer(interception, ctxt, b"GET http://x/ HTTP/1.1\r\n").layer is None  # mitmproxy's proxy layer
    ctxt.layers.pop()  # the NextLayer decide_layer pushed
    layers.HttpLayer(ctxt, layers.http.HTTPMode.regular)
    assert isinstance(decide_layer(interception, ctxt, b"anything").layer, RefusedLayer)


def test_rawtcp_and_insecure_options(stage: Any) -> None:
    interception, _ = stage
    from mitmproxy import ctx, exceptions

    ctx.options.update(rawtcp=True)
    assert ctx.options.rawtcp is False, "rawtcp is switched off whenever it is set"
    with pytest.raises(exceptions.OptionsError):
        ctx.options.update(ssl_insecure=True)


def test_upstream_guard_refuses_unchecked_destinations() -> None:
    connections = Connections()
    guard = UpstreamGuard(connections)
    client = connection.Client(peername=("127.0.0.1", 5002), sockname=("127.0.0.1", 8080), timestamp_start=0)
    server = connection.Server(address=("api.test", 443))
    guard.server_connect(ServerConnectionHookData(server, client))
    assert server.error is not None and "without a checked client" in server.error
    state = connections.get(client)
    server = connection.Server(address=("api.test", 443))
    guard.server_connect(ServerConnectionHookData(server, client))
    assert server.error and "not checked by policy" in server.error
    state.pinned[("api.test", 443)] = ipaddress.ip_address("127.0.0.1")
    server = connection.Server(address=("api.test", 443))
    guard.server_connect(ServerConnectionHookData(server, client))
    assert server.error is None and server.address == ("127.0.0.1", 443) and server.sni == "api.test"
    server = connection.Server(address=("10.9.9.9", 443))
    guard.server_connect(ServerConnectionHookData(server, client))
    assert server.error and "not checked by policy" in server.error


@pytest.mark.parametrize("client,server", [(b"", b"SSH-2.0-x\r\n"), (b"\x00\x01raw", b"")],
                         ids=["server speaks first", "client sends raw bytes"])
def test_a_raw_tcp_rule_relays_bytes_that_are_not_tls(stage: Any, client: bytes, server: bytes) -> None:
    interception, connections = stage
    ctxt, tunnel = tunnel_context(connections, PASS, raw_tcp=True)
    nl = decide_layer(interception, ctxt, client, server)
    assert isinstance(nl.layer, CountingTCPLayer) and tunnel.mode is TunnelMode.PASSTHROUGH
    assert nl.layer.guard is None  # nothing TLS to check


def test_outcomes_audit_a_refused_connection_and_a_passthrough_once(stage: Any) -> None:
    interception, connections = stage
    outcomes = Outcomes(connections)
    seen: list[Outcome] = []
    outcomes.add_sink(seen.append)
    ctxt, tunnel = tunnel_context(connections, ALLOW)
    nl = decide_layer(interception, ctxt, b"\x00\x01raw\n")
    outcomes.next_layer(nl)
    outcomes.next_layer(nl)
    refused = [o for o in seen if o.event == "tunnel_refused"]
    assert len(refused) == 1 and refused[0].decision is not None
    assert refused[0].decision.reason is Reason.NOT_HTTP and refused[0].host == "api.test"
    ctxt, tunnel = tunnel_context(connections, PASS, raw_tcp=True)
    decide_layer(interception, ctxt, b"\x00raw")
    interception.client_disconnected(ctxt.client)
    outcomes.client_disconnected(ctxt.client)
    outcomes.client_disconnected(ctxt.client)
    closes = [o for o in seen if o.event == "tunnel_close"]
    assert len(closes) == 1 and closes[0].host == "api.test"
    assert interception.active_tunnels == 0


def test_live_flow_revocation_fails_closed_when_the_redecision_raises() -> None:
    """A live flow that cannot be decided again (here: no recorded target) is cut, not kept."""
    import time

    from egresswarden.runtime.context import record_of
    from egresswarden.runtime.revocation import LiveFlows, Revocation
    from egresswarden.runtime.rulestore import RuleStore
    from mitmproxy.test import tflow

    emitted: list[Outcome] = []
    live = LiveFlows()
    flow = tflow.tflow(ws=True)
    record = record_of(flow)
    record.agent, record.method, record.path = "coder", "GET", "/ws"
    live.websocket_start(flow)
    with taddons.context():
        revocation = Revocation(RuleStore(), Connections(), emitted.append, live)
        revocation._redecide_flow(object(), flow, time.perf_counter())
    assert record.revocation == "denied" and record.decision is not None
    assert record.decision.reason is Reason.INTERNAL_ERROR
    assert flow.error is not None and not flow.live and flow.id not in live.flows
    assert [(o.event, o.revocation, o.decision.reason if o.decision else None) for o in emitted] == [
        ("tunnel_revoked", "denied", Reason.INTERNAL_ERROR)]


def test_no_tunnel_starts_for_a_client_that_already_left(stage: Any) -> None:
    """Red team 18: the layer decision can run after client_disconnected (a reset while the
    next_layer hook was pending); a passthrough started then was never counted down and never
    got its tunnel_close record."""
    interception, connections = stage
    ctxt, tunnel = tunnel_context(connections, PASS)
    interception.client_disconnected(ctxt.client)
    nl = decide_layer(interception, ctxt, client_hello("api.test"))
    assert isinstance(nl.layer, RefusedLayer)
    assert tunnel.mode is TunnelMode.UNDECIDED and interception.active_tunnels == 0


def test_no_tls_handshake_for_a_client_that_finished_sending(stage: Any) -> None:
    """Red team 19: a denied CONNECT explained in band, a ClientHello and a FIN: mitmproxy's TLS
    layer started for a client that cannot finish a handshake crashed on its close."""
    interception, connections = stage
    for decision in (DENIED, ALLOW):  # explained, intercepted
        ctxt, tunnel = tunnel_context(connections, decision)
        ctxt.client.state = connection.ConnectionState.CAN_WRITE  # its FIN was read
        nl = decide_layer(interception, ctxt, client_hello())
        assert isinstance(nl.layer, RefusedLayer) and tunnel.mode is TunnelMode.REFUSED
    ctxt, tunnel = tunnel_context(connections, PASS)  # passed through: the hello and the FIN go on
    ctxt.client.state = connection.ConnectionState.CAN_WRITE
    nl = decide_layer(interception, ctxt, client_hello())
    assert tunnel.mode is TunnelMode.PASSTHROUGH
