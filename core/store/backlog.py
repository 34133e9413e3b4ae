"""How much work waits in each topic, for metrics and operators: counter - checkpoint, exactly.

Read-only and cheap: one `_id` lookup of the counters and one of the checkpoints for all the topics,
plus the (small) lanes, routes and route-status collections. The topics looked at are those of the
lanes a stage reads (core/store/lanes.py: active and canceling lanes of tenants not suspended) for
every route, enabled or not (a disabled route's messages still wait):

    stage  topic                   consumer     what waits
    route  route~<lane>            router       accepted (and retried) messages not yet routed
    send   send:<route>~<lane>     connector    routed messages not yet submitted
    await  await:<route>           expirer      sent messages the expiry has not passed yet (it stays
                                                one validity period behind: this is not "no receipt")
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.domain.message import await_topic, route_topic, send_topics
from core.domain.routing import RouteStatus
from core.store.errors import StoreUnavailable
from core.store.lanes import LaneBook
from core.store.routes import RouteStore
from core.store.topics import EventLog

CONSUMERS = {"route": "router", "send": "connector", "await": "expirer"}


@dataclass(frozen=True)
class TopicBacklog:
    stage: str  # route | send | await
    route: str  # "" for the route stage
    lane: str  # the lane key ("" = shared); "" for await topics (one per route)
    waiting: int  # counter - checkpoint (>= 0)


async def topic_backlogs(db: AsyncDatabase[Any]) -> list[TopicBacklog]:
    """The backlog of every topic of every readable lane and route (zeros included, so a gauge
    falls back to 0 instead of vanishing). Raises StoreUnavailable when the store does not answer."""
    try:
        book = LaneBook(db)
        await book.refresh(force=True)
        routes = {r.id: r.partitions for r in await RouteStore(db).list(include_disabled=True)}
    except PyMongoError as e:
        raise StoreUnavailable(f"backlog: {e!r}") from e
    lanes = sorted({"", *(lane.key for lane in book.lanes)})
    topics: dict[str, tuple[str, str, str]] = {}
    for lane in lanes:
        topics[route_topic(lane)] = ("route", "", lane)
        for route, partitions in routes.items():
            for topic in send_topics(route, lane, partitions):
                topics[topic] = ("send", route, lane)
    for route in routes:
        topics[await_topic(route)] = ("await", route, "")
    log = EventLog(db)
    counters = await log.counters(topics)
    # A partitioned route's topics add up under one (stage, route, lane).
    summed: dict[tuple[str, str, str], int] = {}
    for stage, consumer in CONSUMERS.items():
        mine = [t for t, (s, _, _) in topics.items() if s == stage]
        checkpoints = await log.load_checkpoints(consumer, mine)
        for t in mine:
            summed[topics[t]] = summed.get(topics[t], 0) + max(0, counters[t] - checkpoints[t])
    return [TopicBacklog(stage, route, lane, n) for (stage, route, lane), n in summed.items()]


async def route_statuses(db: AsyncDatabase[Any], now: datetime) -> dict[str, str]:
    """Each route's status as the router sees it (up, busy, down; down when its heartbeat is stale),
    for every configured route."""
    try:
        store = RouteStore(db)
        routes = [r.id for r in await store.list(include_disabled=True)]
        statuses = await store.statuses(now)
    except PyMongoError as e:
        raise StoreUnavailable(f"route statuses: {e!r}") from e
    return {r: statuses[r].value if r in statuses else RouteStatus.DOWN.value for r in routes}
