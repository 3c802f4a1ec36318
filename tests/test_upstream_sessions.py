"""The upstream TLS session store's rules (stages/upstream_tls.UpstreamSessions): single use,
bounds, and the age of the full verification a session descends from."""

from __future__ import annotations

from egresswarden.runtime.context import Connections
from egresswarden.stages import upstream_tls
from egresswarden.stages.upstream_tls import HeldSession, UpstreamSessions
from OpenSSL import SSL


def _key(name: str = "a.test", agent: str = "a1") -> upstream_tls.SessionKey:
    return ("ctx", name, "127.0.0.1", 443, agent)


def _held(at: float = 0.0) -> HeldSession:
    return HeldSession(SSL.Session(), at)


def test_a_session_is_taken_once_newest_first():
    store = UpstreamSessions(Connections())
    old, new = _held(), _held()
    store.put(_key(), old)
    store.put(_key(), new)
    assert store.take(_key(), 1.0) is new
    assert store.take(_key(), 1.0) is old
    assert store.take(_key(), 1.0) is None
    assert len(store) == 0


def test_keys_do_not_mix():
    store = UpstreamSessions(Connections())
    store.put(_key("a.test", "a1"), _held())
    assert store.take(_key("b.test", "a1"), 1.0) is None
    assert store.take(_key("a.test", "a2"), 1.0) is None
    assert store.take(_key("a.test", "a1"), 1.0) is not None


def test_a_session_verified_too_long_ago_is_never_offered():
    store = UpstreamSessions(Connections())
    store.put(_key(), _held(at=0.0))
    store.put(_key(), _held(at=100.0))
    now = upstream_tls.MAX_VERIFIED_AGE + 50.0  # the first is too old, the second is not
    assert store.take(_key(), now) is not None
    assert store.take(_key(), now) is None
    assert len(store) == 0


def test_bounds_per_key_and_in_all(monkeypatch):
    monkeypatch.setattr(upstream_tls, "MAX_SESSIONS", 10)
    store = UpstreamSessions(Connections())
    for _ in range(upstream_tls.SESSIONS_PER_KEY + 5):
        store.put(_key("a.test"), _held())
    assert len(store) == min(upstream_tls.SESSIONS_PER_KEY, 10)
    for i in range(12):
        store.put(_key(f"h{i}.test"), _held())
    assert len(store) == 10
    assert store.take(_key("a.test"), 1.0) is None  # stored into least recently: dropped first
    assert store.take(_key("h11.test"), 1.0) is not None
