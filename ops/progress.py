"""Where the pipeline stands, read from the log's bookkeeping alone: topic counters, the stages'
checkpoints, the timers, a tenant's spend. Cheap enough to poll while a benchmark or a fault scenario
runs (a handful of `_id` lookups; no read of `events`), so polling does not load the server under test.

- backlog of a topic = its counter - its consumer's checkpoint (exact: positions are dense);
- messages handed to an SMSC = the counters of the `await:<route>` topics (one `sent` each);
- billed money = the tenant's `spent_minor`, written in the same commit as every `billed` event
  (`msgcore verify` checks that it equals their sum), so at a known price per message it counts the
  billed messages with one read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.domain.message import LANE_SEPARATOR

if TYPE_CHECKING:
    from core.store.database import Database

# The consumer of each stage's topics (core/workers/router.py, smsc/connector.py, core/workers/expiry.py).
CONSUMERS = {"route": "router", "send": "connector", "await": "expirer"}


def stage_of_topic(topic: str) -> str:
    """"route~c:42" -> "route"; "send:sim~t:acme" -> "send"; "await:sim" -> "await"."""
    return topic.split(LANE_SEPARATOR, 1)[0].split(":", 1)[0]


def consumer_of(topic: str) -> str | None:
    return CONSUMERS.get(stage_of_topic(topic))


@dataclass
class Progress:
    """One reading of the counters and checkpoints (and the number of timers)."""

    counters: dict[str, int] = field(default_factory=dict)  # topic -> next free position
    checkpoints: dict[str, int] = field(default_factory=dict)  # topic -> its consumer's checkpoint
    timers: int = 0

    def backlog(self, stage: str, lane: str | None = None) -> int:
        """Entries of `stage`'s topics ("route", "send", "await") not yet passed by their consumer;
        only the topics of `lane` when given ("" = the shared lane)."""
        return sum(end - self.checkpoints.get(t, 0) for t, end in self.counters.items()
                   if stage_of_topic(t) == stage and (lane is None or _lane(t) == lane))

    def written(self, stage: str, lane: str | None = None) -> int:
        """Entries ever written into `stage`'s topics (of `lane` when given)."""
        return sum(end for t, end in self.counters.items()
                   if stage_of_topic(t) == stage and (lane is None or _lane(t) == lane))

    def passed(self, stage: str, lane: str | None = None) -> int:
        """Entries `stage`'s consumer has moved past (of `lane` when given)."""
        return self.written(stage, lane) - self.backlog(stage, lane)

    @property
    def sent(self) -> int:
        """`sent` events so far (every one enters an `await` topic)."""
        return self.written("await")

    @property
    def work_left(self) -> int:
        """Entries waiting for the router or a connector, plus messages waiting on a timer."""
        return self.backlog("route") + self.backlog("send") + self.timers

    def summary(self) -> str:
        return (f"route backlog {self.backlog('route')}, send backlog {self.backlog('send')}, sent {self.sent}, "
                f"awaiting expiry pass {self.backlog('await')}, timers {self.timers}")


def _lane(topic: str) -> str:
    return topic.split(LANE_SEPARATOR, 1)[1] if LANE_SEPARATOR in topic else ""


async def read_progress(db: Database, *, with_timers: bool = True) -> Progress:
    """Counters of every topic, their consumers' checkpoints, and the number of timers."""
    counters = {d["_id"]: int(d["pos"]) async for d in db["topics"].find({})}
    wanted = {f"{c}|{t}": t for t in counters if (c := consumer_of(t)) is not None}
    found = db["checkpoints"].find({"_id": {"$in": list(wanted)}})
    checkpoints = {wanted[d["_id"]]: int(d["pos"]) async for d in found}
    timers = await db["timers"].count_documents({}) if with_timers else 0
    return Progress(counters, checkpoints, timers)


async def spent_minor(db: Database, tenant_id: str) -> int:
    """The tenant's billed total (minor units)."""
    doc: dict[str, Any] | None = await db["tenants"].find_one({"_id": tenant_id}, {"spent_minor": 1})
    return int((doc or {}).get("spent_minor") or 0)
