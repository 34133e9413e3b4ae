"""How a stage shares one batch of capacity between the lanes that have work.

Pure: no I/O. The stage (router or connector) asks `FairShare.plan(lanes, capacity)` for a quota per
lane, fetches up to that many due messages from each lane, and reports back with `settle(...)` how
many each lane actually had.

The rules, in order:

1. Tiers are strict. The shared transactional lane is served first with the whole capacity; then
   transactional campaigns; then marketing (campaigns and tenants' marketing lanes). "Mohamed waits
   for Ahmed" cannot happen: a one-time password never queues behind a campaign. Transactional
   traffic is kept from flooding its tier by the per-tenant submission limit at the API (429).
2. Within a tier, capacity is shared between *tenants* by weight (the tenant's `priority`, default
   10): deficit round robin. Each plan gives every tenant `capacity * weight / total_weight` plus the
   fraction it was owed from earlier plans, so small batches still add up to exact shares over time.
   A tenant whose lanes had less than its quota loses its credit (no banking while idle).
3. Within a tenant, its lanes (campaigns) share its quota equally, the first lane rotating.
4. What a tier leaves unused goes to the next tier; what lanes leave unused inside a tier goes, in a
   second round, to the lanes of that tier that filled their quota (they may have more).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

T = TypeVar("T")

SHARED_LANE = ""
DEFAULT_WEIGHT = 10


@dataclass(frozen=True)
class Lane:
    key: str  # "" for the shared lane, "c:<campaign>", "t:<tenant>"
    tenant_id: str | None = None
    transactional: bool = False
    weight: int = DEFAULT_WEIGHT
    since: datetime | None = None  # no head of this lane is due before this (its first write)

    @property
    def tier(self) -> int:
        if self.key == SHARED_LANE:
            return 0
        return 1 if self.transactional else 2


@dataclass
class FairShare:
    """Deficit round robin state for one stage (kept between batches)."""

    credit: dict[str, float] = field(default_factory=dict)  # tenant -> fraction of a message owed
    _rotation: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _turn: int = 0

    @staticmethod
    def tiers(lanes: Iterable[Lane]) -> list[list[Lane]]:
        by_tier: dict[int, list[Lane]] = defaultdict(list)
        for lane in lanes:
            by_tier[lane.tier].append(lane)
        return [by_tier[t] for t in sorted(by_tier)]

    def plan(self, lanes: Sequence[Lane], capacity: int) -> list[tuple[Lane, int]]:
        """Quotas for the lanes of one tier, summing to at most `capacity`, in the order to fetch them
        (the tenant that goes first rotates, so rounding never favours the same tenant)."""
        if capacity <= 0 or not lanes:
            return []
        tenants: dict[str, list[Lane]] = defaultdict(list)
        for lane in lanes:
            tenants[lane.tenant_id or ""].append(lane)
        names = sorted(tenants)
        self._turn = (self._turn + 1) % len(names)
        names = names[self._turn:] + names[:self._turn]
        weights = {t: max(1, max(lane.weight for lane in tenants[t])) for t in names}
        total = sum(weights.values())
        quotas: dict[str, int] = {}
        for t in names:
            owed = capacity * weights[t] / total + self.credit.get(t, 0.0)
            quotas[t] = int(owed)
            self.credit[t] = owed - quotas[t]
        # Rounding down may leave a few messages over; hand them out in turn order.
        spare = capacity - sum(quotas.values())
        for t in sorted(names, key=lambda t: -self.credit[t]):
            if spare <= 0:
                break
            quotas[t] += 1
            self.credit[t] -= 1.0
            spare -= 1
        out: list[tuple[Lane, int]] = []
        for t in names:
            out.extend(self._split(t, sorted(tenants[t], key=lambda lane: lane.key), quotas[t]))
        return [(lane, q) for lane, q in out if q > 0]

    def _split(self, tenant: str, lanes: list[Lane], quota: int) -> list[tuple[Lane, int]]:
        start = self._rotation[tenant] % len(lanes)
        self._rotation[tenant] += 1
        lanes = lanes[start:] + lanes[:start]
        base, extra = divmod(quota, len(lanes))
        return [(lane, base + (1 if i < extra else 0)) for i, lane in enumerate(lanes)]

    def settle(self, planned: Sequence[tuple[Lane, int]], got: dict[str, int]) -> None:
        """Record what each lane had: a tenant that did not use its quota keeps no credit."""
        short: set[str] = set()
        for lane, quota in planned:
            if got.get(lane.key, 0) < quota:
                short.add(lane.tenant_id or "")
        for tenant in short:
            self.credit[tenant] = min(self.credit.get(tenant, 0.0), 0.0)

    def forget(self, active_tenants: Iterable[str]) -> None:
        """Drop the state of tenants that have no active lane any more (bounded memory)."""
        keep = set(active_tenants)
        for tenant in [t for t in self.credit if t not in keep]:
            del self.credit[tenant]
        for tenant in [t for t in self._rotation if t not in keep]:
            del self._rotation[tenant]


def interleave(batches: Sequence[list[T]]) -> list[T]:
    """One item from each batch in turn: the order in which the stage then works (and the connector
    submits) mixes tenants instead of sending one tenant's whole share first."""
    out: list[T] = []
    longest = max((len(b) for b in batches), default=0)
    for i in range(longest):
        out.extend(b[i] for b in batches if i < len(b))
    return out
