"""The upstream TLS session store's rules (stages/upstream_tls.UpstreamSessions): single use,
bounds, and the age of the full verification a session descends from."""

from __future__ import annotations

from egresswarden.core.decision import Reason, deny
from egresswarden.runtime.context import Connections, Tunnel, TunnelMode
from egresswarden.stages import upstream_tls
from egresswarden.stages.upstream_tls import HeldSession, UpstreamSessions
from mitmproxy import connection
from OpenSSL import SSL


def _key(name: str = "a.test", agent: str = "a1") -> upstream_tls.SessionKey:
    return ("ctx", name, "127.0.0.1", 443, agent)


def _held(at: float = 0.0, size: int = upstream_tls.SESSION_OVERHEAD_BYTES) -> HeldSession:
    return HeldSession(SSL.Session(), at, size)


def test_a_session_is_taken_once_newest_first():
    store = UpstreamSessions(Connections())
    old, new = _held(), _held()
    store.put(_key(), old, 0.0)
    store.put(_key(), new, 0.0)
    assert store.take(_key(), 1.0) is new
    assert store.take(_key(), 1.0) is old
    assert store.take(_key(), 1.0) is None
    assert len(store) == 0


def test_keys_do_not_mix():
    store = UpstreamSessions(Connections())
    store.put(_key("a.test", "a1"), _held(), 0.0)
    assert store.take(_key("b.test", "a1"), 1.0) is None
    assert store.take(_key("a.test", "a2"), 1.0) is None
    assert store.take(_key("a.test", "a1"), 1.0) is not None


def test_a_session_verified_too_long_ago_is_never_offered():
    store = UpstreamSessions(Connections())
    store.put(_key(), _held(at=0.0), 0.0)
    store.put(_key(), _held(at=100.0), 100.0)
    now = upstream_tls.MAX_VERIFIED_AGE + 50.0  # the first is too old, the second is not
    assert store.take(_key(), now) is not None
    assert store.take(_key(), now) is None
    assert len(store) == 0


def test_bounds_per_key_and_in_all(monkeypatch):
    monkeypatch.setattr(upstream_tls, "MAX_SESSIONS", 10)
    store = UpstreamSessions(Connections())
    for _ in range(upstream_tls.SESSIONS_PER_KEY + 5):
        store.put(_key("a.test"), _held(), 0.0)
    assert len(store) == min(upstream_tls.SESSIONS_PER_KEY, 10)
    for i in range(12):
        store.put(_key(f"h{i}.test"), _held(), 0.0)
    assert len(store) == 10
    assert store.take(_key("a.test"), 1.0) is None  # stored into least recently: dropped first
    assert store.take(_key("h11.test"), 1.0) is not None


def test_the_bytes_held_stay_within_the_budget(monkeypatch):
    monkeypatch.setattr(upstream_tls, "MAX_SESSION_BYTES", 100_000)
    store = UpstreamSessions(Connections())
    for i in range(10):
        store.put(_key(f"h{i}.test"), _held(size=30_000), 0.0)
    assert store.held_bytes == 90_000 and len(store) == 3
    assert store.take(_key("h9.test"), 1.0) is not None and store.take(_key("h0.test"), 1.0) is None
    assert store.held_bytes == 60_000


def test_sessions_nobody_may_use_any_more_are_dropped_as_the_store_is_used():
    store = UpstreamSessions(Connections())
    for i in range(5):
        store.put(_key(f"old{i}.test"), _held(at=0.0), 0.0)
    later = upstream_tls.MAX_VERIFIED_AGE + 1.0
    store.put(_key("new.test"), _held(at=later), later)
    assert len(store) == 1 and store.held_bytes == upstream_tls.SESSION_OVERHEAD_BYTES


def test_only_an_intercepted_tunnel_names_the_agent_a_session_is_kept_for():
    """Red team 22: the connection's `agent` is set by a CONNECT, and a plain proxy request for
    an https:// URL behind another agent's refused CONNECT resumed that agent's session."""
    connections = Connections()
    store = UpstreamSessions(connections)
    client = connection.Client(peername=("127.0.0.1", 40000), sockname=("127.0.0.1", 8080), timestamp_start=0)
    state = connections.get(client)
    state.agent = "alice"  # a CONNECT identified alice, and opened no tunnel
    assert store.agent_of(client) is None
    decision = deny(Reason.NO_MATCHING_RULE, "refused", "v1")
    state.tunnel = Tunnel("alice", "a.test", 443, decision, "r1", mode=TunnelMode.EXPLAIN)
    assert store.agent_of(client) is None
    state.tunnel = Tunnel("alice", "a.test", 443, decision, "r1", mode=TunnelMode.INTERCEPT)
    assert store.agent_of(client) == "alice"
