"""Lanes: which queues of a stage are claimable, and how a stage fetches a fair batch from them.

A lane is registered in `lanes` (`_id` = lane key, `tenant_id`, `transactional`, `state`): campaigns
register theirs when created, the API registers a tenant's marketing lane the first time it accepts
marketing traffic. Only lanes in state `active` are claimed: pausing a campaign is one write to its
lane, and every stage stops taking its messages within `LaneBook.TTL_S`; its heads keep their place
in the queue, so resuming carries on where it stopped. A suspended tenant's lanes are skipped the
same way. The shared lane (`""`, transactional traffic) is always claimed.

Workers read the registry and the tenants' weights at most once per `TTL_S`, so a stage costs the
registry two small reads a second, whatever its rate.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.fairness import DEFAULT_WEIGHT, SHARED_LANE, FairShare, Lane, interleave
from core.domain.message import queue_name
from core.store.cursor import QueueCursor
from core.store.eventstore import LEASE_PROJECTION, Claimed, EventStore
from core.store.heads import state_from_head

ACTIVE = "active"
ALL, SHARED, BULK = "all", "shared", "bulk"  # which lanes a stage reads
IDLE_LANE_S = 0.25  # a lane found empty is not probed again for this long (the shared lane always is)
BULK_CURSOR_SWEEP_S = 300.0  # how often a deep lane's cursor goes back to the lane's floor (a safety net)
DEEP_SLICE_S = 0.2  # a campaign uploads a few thousand rows a second: a slice holds about a batch


class LaneStore:
    """The registry of lanes (collection `lanes`)."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.lanes = db["lanes"]

    async def ensure(self, key: str, tenant_id: str, *, transactional: bool, state: str, now: datetime,
                     campaign_id: str | None = None, session: AsyncClientSession | None = None) -> None:
        """Register a lane unless it exists (an existing lane keeps its state)."""
        await self.lanes.update_one(
            {"_id": key},
            {"$setOnInsert": {"tenant_id": tenant_id, "transactional": transactional, "state": state,
                              "campaign_id": campaign_id, "created_at": now, "updated_at": now}},
            upsert=True, session=session)

    async def set_state(self, key: str, state: str, now: datetime, session: AsyncClientSession | None = None) -> None:
        await self.lanes.update_one({"_id": key}, {"$set": {"state": state, "updated_at": now}}, session=session)


@dataclass
class LaneBook:
    """A worker's cached view of the claimable lanes, the tenants' weights and who is suspended."""

    db: AsyncDatabase
    TTL_S: float = 1.0
    lanes: list[Lane] = field(default_factory=list)
    suspended: frozenset[str] = frozenset()
    _loaded_at: float = float("-inf")

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._loaded_at < self.TTL_S:
            return
        tenants = {d["_id"]: d async for d in self.db["tenants"].find({}, {"status": 1, "priority": 1})}
        self.suspended = frozenset(t for t, d in tenants.items() if d.get("status", ACTIVE) != ACTIVE)
        lanes = []
        async for d in self.db["lanes"].find({"state": ACTIVE}):
            tenant = d.get("tenant_id")
            if tenant in self.suspended:
                continue
            weight = int((tenants.get(tenant) or {}).get("priority") or DEFAULT_WEIGHT)
            lanes.append(Lane(d["_id"], tenant, bool(d.get("transactional")), weight,
                              since=d.get("since") or d.get("created_at")))
        self.lanes = lanes
        self._loaded_at = time.monotonic()


class LaneClaimer:
    """Fetches one batch for a stage across its lanes, fairly (see core/domain/fairness.py).

    Each lane has its own cursor. A lane is asked for a little more than its quota, so that what one
    lane leaves unused can go to another without a second round trip; heads fetched but not used are
    left alone (the lane's cursor is moved back to the last one used, so none is skipped)."""

    def __init__(self, store: EventStore, stage: str, book: LaneBook, bulk_limit: int | None = None) -> None:
        self.store = store
        self.stage = stage
        self.book = book
        # At most this many campaign/marketing heads per batch: a batch is committed as a whole, so a
        # smaller bulk share bounds how long a one-time password arriving meanwhile waits for it.
        self.bulk_limit = bulk_limit
        self.share = FairShare()
        self.cursors: dict[str, QueueCursor] = {SHARED_LANE: QueueCursor()}
        self._idle_until: dict[str, float] = {}
        self.skip: set[str] = set()  # lanes the stage leaves alone for now (e.g. the router's backpressure)

    async def due(self, now: datetime, limit: int, scope: str = ALL) -> list[Claimed]:
        """Due heads across the lanes, not leased (for stages guarded by the version alone). `scope`:
        ALL, SHARED (only the shared lane) or BULK (only the other lanes)."""
        docs = await self._gather(now, limit, projection=None, scope=scope)
        return [Claimed(state_from_head(d)) for d in docs]

    async def claim(self, now: datetime, limit: int, owner: str, lease_s: float,
                    bulk_limit: int | None = None) -> list[Claimed]:
        """Lease up to `limit` due heads across the lanes, transactional ones first, and of the others
        at most `bulk_limit` (default: the claimer's)."""
        found = await self._gather(now, limit, projection=LEASE_PROJECTION, bulk_limit=bulk_limit)
        won = {c.state.message_id: c for c in await self.store.lease(found, now, owner, lease_s)}
        return [won[d["_id"]] for d in found if d["_id"] in won]

    async def _gather(self, now: datetime, limit: int, projection: dict[str, int] | None, scope: str = ALL,
                      bulk_limit: int | None = None) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        await self.book.refresh()
        lanes = [] if scope == BULK else [Lane(SHARED_LANE, transactional=True)]
        if scope != SHARED:
            lanes.extend(self.book.lanes)
        self._forget_gone(lanes)
        out: list[dict[str, Any]] = []
        remaining = limit
        clock = time.monotonic()
        bulk_left = bulk_limit if bulk_limit is not None else limit if self.bulk_limit is None else self.bulk_limit
        for tier in FairShare.tiers(lanes):
            tier = [lane for lane in tier if self._idle_until.get(lane.key, 0.0) <= clock and lane.key not in self.skip]
            room = remaining if tier and tier[0].key == SHARED_LANE else min(remaining, bulk_left)
            if room <= 0 or not tier:
                continue
            plan = self.share.plan(tier, room)
            found = {lane.key: await self._fetch(lane, now, min(room, 2 * quota + 10), projection)
                     for lane, quota in plan}
            used = _allocate(plan, found, room)
            self.share.settle(plan, {k: len(v) for k, v in used.items()})
            for lane, _ in plan:
                taken, fetched = used[lane.key], found[lane.key]
                if not fetched and lane.key != SHARED_LANE:
                    self._idle_until[lane.key] = clock + IDLE_LANE_S
                if len(taken) < len(fetched):
                    self.cursors[lane.key].rewind(taken[-1]["due_at"] if taken else fetched[0]["due_at"])
            batch = interleave([used[lane.key] for lane, _ in plan])
            out.extend(batch)
            remaining -= len(batch)
            if tier[0].key != SHARED_LANE:
                bulk_left -= len(batch)
        return out

    async def _fetch(self, lane: Lane, now: datetime, limit: int,
                     projection: dict[str, int] | None) -> list[dict[str, Any]]:
        cursor = self.cursors.get(lane.key)
        if cursor is None:
            cursor = self.cursors[lane.key] = deep_cursor(lane.since)
        if lane.since is not None:
            cursor.floor = lane.since
        return await self.store.scan(queue_name(self.stage, lane.key), now, limit, cursor, projection)

    def _forget_gone(self, lanes: Sequence[Lane]) -> None:
        """Keep per-lane state only for claimable lanes. A paused lane's cursor is kept: resuming
        starts where it stopped (and a lost cursor costs only one full scan)."""
        if len(self.cursors) > 4 * len(lanes) + 64:
            keep = {lane.key for lane in lanes}
            self.cursors = {k: c for k, c in self.cursors.items() if k in keep}
            self._idle_until = {k: v for k, v in self._idle_until.items() if k in keep}
        self.share.forget({lane.tenant_id or "" for lane in lanes})


def deep_cursor(floor: datetime | None) -> QueueCursor:
    """A cursor for a lane that may hold millions of heads: only ever read in slices from `floor`."""
    return QueueCursor(slice_s=DEEP_SLICE_S, sweep_s=BULK_CURSOR_SWEEP_S, deep=True, floor=floor)


async def lane_has_heads(store: EventStore, queue: str, cursor: QueueCursor, now: datetime,
                         horizon: timedelta = timedelta(days=1), max_probes: int = 60) -> bool:
    """Whether `queue` holds any head due up to `now + horizon` (leases and retry back-offs end well
    within that), probing slice by slice from the cursor: on a deep queue an unbounded query would
    cost the whole queue. The cursor stays at the first head found, so a later call starts there."""
    end = now + horizon
    for _ in range(max_probes):
        lo, hi = cursor.window(end)
        doc = await store.streams.find_one({"queue": queue, "due_at": {"$gte": lo, "$lte": hi}}, {"due_at": 1})
        if doc is not None:
            cursor.position = min(doc["due_at"], now)
            cursor.width_s = cursor.slice_s
            return True
        cursor.advance(end, hi, False, None)
        if hi >= end:
            cursor.position = now  # new heads are written due now or later: never look past now
            return False
    cursor.position = min(cursor.position or now, now)
    return True  # not settled within the probes: assume there is work


def _allocate(plan: Sequence[tuple[Lane, int]], found: dict[str, list[dict[str, Any]]],
              capacity: int) -> dict[str, list[dict[str, Any]]]:
    """Each lane takes up to its quota; capacity left over goes to lanes that found more, in plan order."""
    take = {lane.key: min(quota, len(found[lane.key])) for lane, quota in plan}
    spare = capacity - sum(take.values())
    while spare > 0:
        grew = False
        for lane, _ in plan:
            if spare > 0 and take[lane.key] < len(found[lane.key]):
                take[lane.key] += 1
                spare -= 1
                grew = True
        if not grew:
            break
    return {lane.key: found[lane.key][:take[lane.key]] for lane, _ in plan}
