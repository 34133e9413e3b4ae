"""The route's circuit breaker (core/domain/circuit_breaker.py) with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.domain.circuit_breaker import BreakerSettings, BreakerState, CircuitBreaker

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def breaker(**settings: float) -> CircuitBreaker:
    return CircuitBreaker("mail", BreakerSettings(**settings))  # type: ignore[arg-type]


def test_opens_after_the_failure_count_within_the_window() -> None:
    b = breaker(max_failures=3, window_s=10, min_calls=100)
    assert b.record(at(0), failed=True) is None
    assert b.record(at(1), failed=False) is None
    assert b.record(at(2), failed=True) is None
    change = b.record(at(3), failed=True)
    assert change is not None and (change.before, change.after) == (BreakerState.CLOSED, BreakerState.OPEN)
    assert "3 failures" in change.reason and change.at == at(3)
    assert b.allow(at(4)) == (False, None)


def test_failures_older_than_the_window_do_not_count() -> None:
    b = breaker(max_failures=2, window_s=10, min_calls=100)
    b.record(at(0), failed=True)
    assert b.record(at(11), failed=True) is None  # the first fell out of the window
    assert b.state == BreakerState.CLOSED
    assert b.record(at(12), failed=True) is not None


def test_opens_on_the_failure_ratio_once_enough_calls_were_made() -> None:
    b = breaker(max_failures=100, failure_ratio=0.5, min_calls=4, window_s=60)
    assert b.record(at(0), failed=True) is None  # 1 of 1, but fewer than min_calls
    assert b.record(at(1), failed=False) is None
    assert b.record(at(2), failed=False) is None
    change = b.record(at(3), failed=True)  # 2 of 4
    assert change is not None and change.after == BreakerState.OPEN and "2 of 4" in change.reason


def test_a_success_never_opens_it() -> None:
    b = breaker(max_failures=1, failure_ratio=0.1, min_calls=1)
    for i in range(20):
        assert b.record(at(i), failed=False) is None
    assert b.state == BreakerState.CLOSED


def test_half_open_after_the_cool_down_lets_one_probe_through() -> None:
    b = breaker(max_failures=1, cool_down_s=30, probes=1)
    b.record(at(0), failed=True)
    assert b.state_at(at(29)) == BreakerState.OPEN
    assert b.allow(at(29)) == (False, None)
    assert b.state_at(at(30)) == BreakerState.HALF_OPEN
    allowed, change = b.allow(at(30))
    assert allowed and change is not None and (change.before, change.after) == (BreakerState.OPEN,
                                                                                BreakerState.HALF_OPEN)
    assert b.allow(at(30.5)) == (False, None)  # one probe at a time


def test_a_successful_probe_closes_it_with_an_empty_window() -> None:
    b = breaker(max_failures=2, cool_down_s=5)
    b.record(at(0), failed=True)
    b.record(at(1), failed=True)
    b.allow(at(6))
    change = b.record(at(6), failed=False)
    assert change is not None and (change.before, change.after) == (BreakerState.HALF_OPEN, BreakerState.CLOSED)
    assert b.record(at(7), failed=True) is None  # the failures before the opening are forgotten
    assert b.allow(at(7)) == (True, None)


def test_a_failed_probe_opens_it_again_for_a_new_cool_down() -> None:
    b = breaker(max_failures=1, cool_down_s=10)
    b.record(at(0), failed=True)
    b.allow(at(10))
    change = b.record(at(10), failed=True)
    assert change is not None and (change.before, change.after) == (BreakerState.HALF_OPEN, BreakerState.OPEN)
    assert b.state_at(at(19)) == BreakerState.OPEN
    assert b.state_at(at(20)) == BreakerState.HALF_OPEN


def test_a_released_probe_lets_the_next_one_through() -> None:
    b = breaker(max_failures=1, cool_down_s=0)
    b.record(at(0), failed=True)
    assert b.allow(at(1))[0]
    assert not b.allow(at(1))[0]
    b.release_probe()
    assert b.allow(at(1))[0]


def test_outcomes_of_calls_let_through_before_it_opened_are_ignored() -> None:
    b = breaker(max_failures=1, cool_down_s=60)
    b.record(at(0), failed=True)
    assert b.record(at(1), failed=False) is None and b.state == BreakerState.OPEN
    assert b.opened_at == at(0)
