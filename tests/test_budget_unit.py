"""runtime/budget.py in isolation: BufferBudget's reservations and DecodeMeter's token bucket."""

from __future__ import annotations

import gc

from egresswarden.runtime.budget import BufferBudget, DecodeMeter


class _Owner:
    pass


def test_reservations_add_up_per_agent_and_release_once() -> None:
    budget, owner = BufferBudget(), _Owner()
    first = budget.reserve("a", 600, 1000, owner)
    assert first is not None and budget.held("a") == 600
    assert budget.reserve("a", 500, 1000, owner) is None  # 1100 > 1000
    assert budget.reserve("b", 500, 1000, owner) is not None  # another agent
    second = budget.reserve("a", 400, 1000, owner)
    assert second is not None and budget.held("a") == 1000
    first.release()
    first.release()  # idempotent
    assert budget.held("a") == 400
    second.release()
    assert budget.snapshot() == {"b": 500}


def test_one_body_is_admitted_when_the_agent_holds_nothing() -> None:
    budget, owner = BufferBudget(), _Owner()  # the owner must live: its collection releases
    big = budget.reserve("a", 5000, 1000, owner)
    assert big is not None and budget.held("a") == 5000
    assert budget.reserve("a", 1, 1000, owner) is None


def test_a_reservation_whose_owner_is_collected_is_released() -> None:
    budget = BufferBudget()
    owner = _Owner()
    assert budget.reserve("a", 700, 1000, owner) is not None
    del owner
    gc.collect()
    assert budget.held("a") == 0


def test_decode_meter_is_a_token_bucket_per_agent() -> None:
    now = [0.0]
    meter = DecodeMeter(clock=lambda: now[0])
    rate, burst = 100.0, 1000.0
    assert meter.admit("a", rate, burst)
    meter.charge("a", 1500, rate, burst)  # into debt: -500
    assert not meter.admit("a", rate, burst)
    assert meter.admit("b", rate, burst)  # another agent
    now[0] = 4.9  # -500 + 490 = -10
    assert not meter.admit("a", rate, burst)
    now[0] = 5.2
    assert meter.admit("a", rate, burst)
    now[0] = 1000.0  # refills to the burst, not beyond
    meter.charge("a", 999, rate, burst)
    assert meter.admit("a", rate, burst)
    meter.charge("a", 1, rate, burst)
    assert not meter.admit("a", rate, burst)
