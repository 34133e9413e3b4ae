"""Per-tenant submission rate limit: a leaky bucket (the GCRA, counted in messages).

Each tenant has a bucket of `burst` messages that drains at `rate` messages per second. A request of
`cost` messages fits when the bucket's level plus `cost` stays within `burst`; it is then charged
(the level rises by `cost`). A request that does not fit is charged nothing, and the answer is how
long until it would fit. Because the level is kept in messages rather than as a theoretical arrival
time, a changed rate or burst applies at once to what is already in the bucket: the new rate drains
it from the tenant's last charged request on, a lower burst leaves less headroom.

The state lives in memory of one process (the API), so the limit is per API process: N API
processes behind a load balancer admit up to N times a tenant's rate. No I/O here; the caller passes
the time (any monotonic clock, in seconds).

Memory is bounded: a tenant whose bucket has drained is indistinguishable from a new one and is
dropped; beyond `max_tenants` tenants the least recently seen is dropped even if not drained (that
forgives its backlog, which only happens with more active tenants than `max_tenants`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# A full batch of the API (1,000 messages) must fit the default burst, or a slow plan could never
# submit one.
MIN_DEFAULT_BURST = 1000
# Float noise must not turn an exactly fitting request into a 429.
_EPSILON = 1e-9


def effective_burst(rate: float | None, burst: int | None) -> int | None:
    """The burst a tenant gets: its own, else `max(1000, ceil(rate))`; None when it has no rate."""
    if rate is None:
        return None
    if burst is not None:
        return burst
    return max(MIN_DEFAULT_BURST, math.ceil(rate))


@dataclass
class _Bucket:
    level: float  # messages charged and not yet drained, as of `at`
    at: float
    drained_at: float  # when `level` reaches 0 at the rate it was charged with (for eviction)


class SubmissionLimiter:
    """Buckets of the tenants seen recently. Not thread-safe: one event loop calls it, and `check`
    does not await, so concurrent requests of one tenant are charged one after the other."""

    def __init__(self, max_tenants: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_tenants = max_tenants
        self.clock = clock  # what callers pass as `now`; tests replace it
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, tenant_id: str, cost: int, rate: float | None, burst: int, now: float) -> float | None:
        """None if `cost` messages fit now (and they are charged); otherwise the seconds until they
        would fit, charging nothing. `math.inf` if they never can (`cost > burst`: the caller should
        refuse such a request outright). `rate` None means unlimited: always None, nothing kept."""
        if rate is None:
            self._buckets.pop(tenant_id, None)
            return None
        if rate <= 0 or burst < 1 or cost < 0:
            raise ValueError(f"rate limit of tenant {tenant_id}: rate {rate} and burst {burst} must be positive, "
                             f"cost {cost} not negative")
        self._evict(now)
        bucket = self._buckets.get(tenant_id)
        level = 0.0 if bucket is None else max(0.0, bucket.level - max(0.0, now - bucket.at) * rate)
        if cost > burst:
            return math.inf
        excess = level + cost - burst
        if excess > _EPSILON:
            return excess / rate
        level += cost
        self._buckets[tenant_id] = _Bucket(level, now, now + level / rate)
        self._buckets.move_to_end(tenant_id)
        return None

    def forget(self, tenant_id: str) -> None:
        """Drop a tenant's bucket (its backlog is forgiven)."""
        self._buckets.pop(tenant_id, None)

    def _evict(self, now: float) -> None:
        # Least recently charged first: drained buckets at the front go (amortised O(1) per check),
        # then the oldest ones while over the cap.
        while self._buckets:
            tenant_id, bucket = next(iter(self._buckets.items()))
            if bucket.drained_at > now and len(self._buckets) < self.max_tenants:
                break
            del self._buckets[tenant_id]
