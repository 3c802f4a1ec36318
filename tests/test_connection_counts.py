"""ConnectionCounts (runtime/connlimits.py): a slot handed from the fast listener to mitmproxy's
side stays counted until it is claimed, and goes back if nobody claims it."""

from __future__ import annotations

from egresswarden.runtime import connlimits
from egresswarden.runtime.connlimits import ConnectionCounts


def test_a_handed_over_slot_stays_counted_until_claimed():
    counts = ConnectionCounts()
    assert counts.admit_agent("a1", 1)
    counts.hand_over(("127.0.0.1", 5000), "a1")
    assert not counts.admit_agent("a1", 1)  # no other connection can take it meanwhile
    assert counts.claim_handed_over(("127.0.0.1", 5001)) is None
    assert counts.claim_handed_over(("127.0.0.1", 5000)) == "a1"
    assert counts.per_agent == {"a1": 1}  # claimed, still counted: released when it closes
    counts.release_agent("a1")
    assert counts.per_agent == {}


def test_an_unclaimed_slot_goes_back(monkeypatch):
    counts = ConnectionCounts()
    assert counts.admit_agent("a1", 1)
    monkeypatch.setattr(connlimits.time, "monotonic", lambda: 100.0)
    counts.hand_over(("127.0.0.1", 5000), "a1")
    counts.expire_handed_over(100.0 + connlimits.HANDED_OVER_MAX_AGE / 2)
    assert counts.per_agent == {"a1": 1}
    counts.expire_handed_over(100.0 + connlimits.HANDED_OVER_MAX_AGE + 1)
    assert counts.per_agent == {} and counts.handed_over == {}
