"""Lanes: which topics of a stage are read, and how a stage reads one fair batch from them.

A lane is registered in `lanes` (`_id` = lane key, `tenant_id`, `transactional`, `state`): campaigns
register theirs when created, the API registers a tenant's marketing lane the first time it accepts
marketing traffic. Each lane has one topic per stage (`route~c:42`, `send:sim~c:42`). Only lanes in
state `active` are read; a `canceling` lane is read too, and its consumer cancels what it reads.
Pausing a campaign is one write to its lane; resuming continues from the checkpoint. A suspended
tenant's lanes are skipped. The shared lane (`""`, transactional traffic) is always read.

The reader knows each topic's backlog exactly (counter - checkpoint, one `_id` lookup of all the
counters per batch), so the fair share (core/domain/fairness.py) is planned on what really waits, and
each chosen topic is read as one exact range [position, position + n) through the (topic, pos) index.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.fairness import DEFAULT_WEIGHT, SHARED_LANE, FairShare, Lane, interleave
from core.domain.message import queue_name
from core.store.topics import EventLog, checkpoint_id

ACTIVE = "active"
CANCELING = "canceling"
ALL, SHARED, BULK = "all", "shared", "bulk"  # which lanes a stage reads


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
    """A worker's cached view of the readable lanes, the tenants' weights and who is suspended."""

    db: AsyncDatabase
    TTL_S: float = 1.0
    lanes: list[Lane] = field(default_factory=list)
    canceling: frozenset[str] = frozenset()
    suspended: frozenset[str] = frozenset()
    _loaded_at: float = float("-inf")

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._loaded_at < self.TTL_S:
            return
        tenants = {d["_id"]: d async for d in self.db["tenants"].find({}, {"status": 1, "priority": 1})}
        self.suspended = frozenset(t for t, d in tenants.items() if d.get("status", ACTIVE) != ACTIVE)
        lanes, canceling = [], set()
        async for d in self.db["lanes"].find({"state": {"$in": [ACTIVE, CANCELING]}}):
            tenant = d.get("tenant_id")
            if d["state"] == CANCELING:
                canceling.add(d["_id"])
            elif tenant in self.suspended:
                continue
            weight = int((tenants.get(tenant) or {}).get("priority") or DEFAULT_WEIGHT)
            lanes.append(Lane(d["_id"], tenant, bool(d.get("transactional")), weight))
        self.lanes = lanes
        self.canceling = frozenset(canceling)
        self._loaded_at = time.monotonic()


@dataclass
class Batch:
    """One read of a stage: the entries (event documents with `topic`/`pos`) in the order to work
    them, and the checkpoint moves that commit them (`checkpoint id -> (from, to)`)."""

    entries: list[dict[str, Any]]
    moves: dict[str, tuple[int, int]]
    ranges: dict[str, tuple[int, int]]  # topic -> [from, to)

    def __bool__(self) -> bool:
        return bool(self.entries)


class TopicReader:
    """Reads fair batches for one consumer from the topics of its stage's lanes.

    `position` is where the next read starts in each topic: the checkpoint, or further on while
    batches read earlier are still being committed (a pipelining consumer commits them in order).
    """

    def __init__(self, log: EventLog, consumer: str, stage: str, book: LaneBook,
                 bulk_limit: int | None = None) -> None:
        self.log = log
        self.consumer = consumer
        self.stage = stage
        self.book = book
        self.bulk_limit = bulk_limit
        self.share = FairShare()
        self.position: dict[str, int] = {}
        self.skip: set[str] = set()  # lanes the stage leaves alone for now (e.g. the router's backpressure)
        self.backlog: dict[str, int] = {}  # topic -> counter - position, as of the last read

    def topic(self, lane: str) -> str:
        return queue_name(self.stage, lane)

    def forget_positions(self) -> None:
        """Drop the cached positions (after CheckpointMoved): the next read reloads them."""
        self.position.clear()

    async def _positions(self, topics: list[str]) -> dict[str, int]:
        missing = [t for t in topics if t not in self.position]
        if missing:
            self.position.update(await self.log.load_checkpoints(self.consumer, missing))
        return {t: self.position[t] for t in topics}

    async def read(self, limit: int, scope: str = ALL, bulk_limit: int | None = None) -> Batch:
        """Up to `limit` entries across the lanes in `scope` (ALL, SHARED or BULK), transactional
        first, of the others at most `bulk_limit` (default: the reader's)."""
        if limit <= 0:
            return Batch([], {}, {})
        await self.book.refresh()
        lanes = [] if scope == BULK else [Lane(SHARED_LANE, transactional=True)]
        if scope != SHARED:
            lanes.extend(lane for lane in self.book.lanes if lane.key not in self.skip)
        topics = [self.topic(lane.key) for lane in lanes]
        counters = await self.log.counters(topics)
        positions = await self._positions([t for t in topics if counters[t] > 0])
        self.backlog = {t: counters[t] - positions.get(t, 0) for t in topics}
        waiting = [lane for lane in lanes if self.backlog[self.topic(lane.key)] > 0]
        if not waiting:
            return Batch([], {}, {})
        take = self._plan(waiting, limit, bulk_limit)
        groups, moves, ranges = [], {}, {}
        for lane, n in take:
            topic = self.topic(lane.key)
            start = positions[topic]
            entries = await self.log.read(topic, start, start + n)
            groups.append(entries)
            moves[checkpoint_id(self.consumer, topic)] = (start, start + n)
            ranges[topic] = (start, start + n)
            self.position[topic] = start + n
        return Batch(interleave(groups), moves, ranges)

    def _plan(self, lanes: list[Lane], limit: int, bulk_limit: int | None) -> list[tuple[Lane, int]]:
        remaining = limit
        bulk_left = bulk_limit if bulk_limit is not None else limit if self.bulk_limit is None else self.bulk_limit
        out: list[tuple[Lane, int]] = []
        for tier in FairShare.tiers(lanes):
            shared = tier[0].key == SHARED_LANE
            room = remaining if shared else min(remaining, bulk_left)
            if room <= 0:
                continue
            plan = self.share.plan(tier, room)
            have = {lane.key: self.backlog[self.topic(lane.key)] for lane, _ in plan}
            take = _allocate(plan, have, room)
            self.share.settle(plan, take)
            chosen = [(lane, take[lane.key]) for lane, _ in plan if take[lane.key] > 0]
            out.extend(chosen)
            used = sum(n for _, n in chosen)
            remaining -= used
            if not shared:
                bulk_left -= used
        return out

    def rewind(self, ranges: dict[str, tuple[int, int]]) -> None:
        """Forget a read that will not be committed: the next read starts at its first position."""
        for topic, (start, _) in ranges.items():
            if self.position.get(topic, start) > start:
                self.position[topic] = start


def _allocate(plan: list[tuple[Lane, int]], have: dict[str, int], capacity: int) -> dict[str, int]:
    """Each lane takes up to its quota of what it has; capacity left over goes to lanes that have
    more, in plan order."""
    take = {lane.key: min(quota, have[lane.key]) for lane, quota in plan}
    spare = capacity - sum(take.values())
    for lane, _ in plan:
        if spare <= 0:
            break
        extra = min(spare, have[lane.key] - take[lane.key])
        take[lane.key] += extra
        spare -= extra
    return take
