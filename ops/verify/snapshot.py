"""What `verify` reads whole before the scan: spend, checkpoints, counters, lanes and tenants (small)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.domain.message import lane_of_topic

if TYPE_CHECKING:  # the driver's types only: the driver itself is core/store's business
    from core.store.database import Database

READABLE_LANE_STATES = frozenset({"active", "canceling"})


@dataclass
class LogSnapshot:
    """The small documents read before the events, in this order: spend, checkpoints, counters, lanes
    and tenants. `consumers[topic]` = {consumer: checkpoint position}."""

    spend_before: dict[str, int]
    checkpoints: dict[str, int]  # "<consumer>|<topic>" -> pos
    counters: dict[str, int]  # topic -> next free position
    lane_states: dict[str, str]  # lane key -> state
    lane_tenants: dict[str, str]  # lane key -> tenant
    suspended: frozenset[str]
    consumers: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for cid, pos in self.checkpoints.items():
            consumer, _, topic = cid.partition("|")
            self.consumers.setdefault(topic, {})[consumer] = pos

    def lane_readable(self, topic: str) -> bool:
        """Whether a consumer reads this topic now (a paused lane or a suspended tenant's is skipped)."""
        lane = lane_of_topic(topic)
        if not lane or topic.startswith("await:"):
            return True
        if self.lane_states.get(lane) not in READABLE_LANE_STATES:
            return False
        return self.lane_states.get(lane) == "canceling" or self.lane_tenants.get(lane) not in self.suspended


async def read_spend(db: Database) -> dict[str, int]:
    return {d["_id"]: int(d.get("spent_minor") or 0) async for d in db["tenants"].find({}, {"spent_minor": 1})}


async def read_snapshot(db: Database) -> LogSnapshot:
    spend = await read_spend(db)
    checkpoints = {d["_id"]: int(d["pos"]) async for d in db["checkpoints"].find({})}
    counters = {d["_id"]: int(d["pos"]) async for d in db["topics"].find({})}
    lanes = [d async for d in db["lanes"].find({}, {"state": 1, "tenant_id": 1})]
    suspended = frozenset([d["_id"] async for d in db["tenants"].find({"status": {"$nin": ["active", None]}},
                                                                       {"_id": 1})])
    return LogSnapshot(spend, checkpoints, counters, {d["_id"]: d.get("state", "") for d in lanes},
                       {d["_id"]: d.get("tenant_id", "") for d in lanes}, suspended)
