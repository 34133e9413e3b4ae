"""The per-tenant submission limiter (core/domain/ratelimit.py): a bucket of `burst` messages
draining at `rate` per second, with the clock passed in."""

from __future__ import annotations

import math

import pytest

from core.domain.ratelimit import SubmissionLimiter, effective_burst


def test_a_burst_fits_at_once_then_the_next_waits_for_the_drain() -> None:
    limiter = SubmissionLimiter()
    for _ in range(5):
        assert limiter.check("acme", 1, rate=2.0, burst=5, now=100.0) is None
    assert limiter.check("acme", 1, rate=2.0, burst=5, now=100.0) == pytest.approx(0.5)
    assert limiter.check("acme", 3, rate=2.0, burst=5, now=100.0) == pytest.approx(1.5)


def test_a_refused_request_is_not_charged() -> None:
    limiter = SubmissionLimiter()
    assert limiter.check("acme", 4, rate=1.0, burst=5, now=0.0) is None
    for _ in range(10):
        assert limiter.check("acme", 3, rate=1.0, burst=5, now=0.0) == pytest.approx(2.0)
    assert limiter.check("acme", 1, rate=1.0, burst=5, now=0.0) is None  # the refusals cost nothing


def test_the_bucket_refills_at_the_rate() -> None:
    limiter = SubmissionLimiter()
    assert limiter.check("acme", 10, rate=10.0, burst=10, now=0.0) is None
    assert limiter.check("acme", 1, rate=10.0, burst=10, now=0.05) == pytest.approx(0.05)
    assert limiter.check("acme", 1, rate=10.0, burst=10, now=0.1) is None
    assert limiter.check("acme", 5, rate=10.0, burst=10, now=0.6) is None  # drained 5 more meanwhile
    assert limiter.check("acme", 6, rate=10.0, burst=10, now=100.0) is None  # never more than burst saved up
    assert limiter.check("acme", 5, rate=10.0, burst=10, now=100.0) == pytest.approx(0.1)


def test_an_exact_fit_after_fractional_drains_is_allowed() -> None:
    limiter = SubmissionLimiter()
    assert limiter.check("acme", 3, rate=3.0, burst=3, now=0.0) is None
    now = 0.0
    for _ in range(30):
        now += 1 / 3
        assert limiter.check("acme", 1, rate=3.0, burst=3, now=now) is None, now


def test_a_cost_over_the_burst_never_fits_and_is_not_charged() -> None:
    limiter = SubmissionLimiter()
    assert limiter.check("acme", 11, rate=100.0, burst=10, now=0.0) == math.inf
    assert limiter.check("acme", 10, rate=100.0, burst=10, now=0.0) is None


def test_a_changed_rate_or_burst_applies_at_once() -> None:
    limiter = SubmissionLimiter()
    assert limiter.check("acme", 10, rate=1.0, burst=10, now=0.0) is None
    assert limiter.check("acme", 5, rate=1.0, burst=10, now=1.0) == pytest.approx(4.0)  # level 9
    # The new rate drains the bucket from the last charge on: 10 - 1 s * 100/s = 0.
    assert limiter.check("acme", 5, rate=100.0, burst=10, now=1.0) is None
    assert limiter.check("acme", 10, rate=100.0, burst=10, now=1.0) == pytest.approx(0.05)
    # A lower burst leaves less headroom over the same level (5).
    assert limiter.check("acme", 1, rate=100.0, burst=4, now=1.0) == pytest.approx(0.02)


def test_tenants_are_independent_and_unlimited_tenants_keep_no_state() -> None:
    limiter = SubmissionLimiter()
    assert limiter.check("acme", 5, rate=1.0, burst=5, now=0.0) is None
    assert limiter.check("acme", 1, rate=1.0, burst=5, now=0.0) is not None
    assert limiter.check("other", 5, rate=1.0, burst=5, now=0.0) is None
    assert limiter.check("free", 10**6, rate=None, burst=1, now=0.0) is None
    assert len(limiter) == 2


def test_drained_tenants_are_evicted_and_memory_is_capped() -> None:
    limiter = SubmissionLimiter(max_tenants=100)
    for i in range(50):
        assert limiter.check(f"t{i}", 1, rate=1.0, burst=5, now=0.0) is None
    assert len(limiter) == 50
    assert limiter.check("late", 1, rate=1.0, burst=5, now=10.0) is None  # the others drained by now
    assert len(limiter) == 1
    for i in range(1000):
        limiter.check(f"busy{i}", 5, rate=1.0, burst=5, now=20.0)
    assert len(limiter) <= 100


def test_forget_drops_the_backlog() -> None:
    limiter = SubmissionLimiter()
    assert limiter.check("acme", 5, rate=1.0, burst=5, now=0.0) is None
    limiter.forget("acme")
    assert limiter.check("acme", 5, rate=1.0, burst=5, now=0.0) is None


def test_invalid_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        SubmissionLimiter().check("acme", 1, rate=0.0, burst=5, now=0.0)
    with pytest.raises(ValueError, match="must be positive"):
        SubmissionLimiter().check("acme", 1, rate=1.0, burst=0, now=0.0)


def test_the_default_burst_holds_a_full_batch() -> None:
    assert effective_burst(None, None) is None
    assert effective_burst(None, 50) is None
    assert effective_burst(5.0, None) == 1000
    assert effective_burst(2500.5, None) == 2501
    assert effective_burst(5.0, 20) == 20
