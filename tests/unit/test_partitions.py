"""Partitions of a route's send topics: which partition a message goes to, the topic names, each
owner's share of the route's TPS, and the router writing into the partitions (in-memory log)."""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Any, cast

from core.domain.message import partition_of, send_stage, send_topic, send_topics
from core.domain.routing import Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.memory import InMemory
from core.store.routes import RouteStore
from core.workers.router import Router
from tests.support.factories import accepted
from tests.unit.test_router_memory import T0, Clock, FixedBook, FixedRoutes


def test_a_message_always_goes_to_the_same_partition_by_crc32_of_its_id() -> None:
    assert partition_of("01ABC", 1) is None  # unpartitioned
    assert partition_of("01ABC", 8) == zlib.crc32(b"01ABC") % 8
    ids = [f"01M{i:020d}" for i in range(8000)]
    spread = Counter(partition_of(m, 8) for m in ids)
    assert set(spread) == set(range(8))
    assert min(spread.values()) > 800  # ~1000 each: no partition starves or floods


def test_topic_names_put_the_partition_before_the_lane() -> None:
    assert send_stage("sim") == "send:sim" and send_stage("sim", 3) == "send:sim#3"
    assert send_topic("sim", "c:42") == "send:sim~c:42" and send_topic("sim", "c:42", 3) == "send:sim#3~c:42"
    assert send_topics("sim", "", 1) == ["send:sim"]
    assert send_topics("sim", "t:acme", 3) == ["send:sim#0~t:acme", "send:sim#1~t:acme", "send:sim#2~t:acme"]


def test_each_owner_takes_its_share_of_the_routes_tps() -> None:
    assert Route(id="a", tps=100, partitions=4).tps_per_owner == 25
    assert Route(id="a", tps=0, partitions=4).tps_per_owner == 0
    assert Route(id="a", tps=30).tps_per_owner == 30


async def test_the_router_writes_each_message_into_its_partition() -> None:
    mem = InMemory()
    routes = FixedRoutes([Route(id="r1", prefixes=("+49",), partitions=4)], {"r1": RouteStatus.UP})
    router = Router(cast(EventStore, mem.store), cast(RouteStore, routes), Clock(),
                    book=FixedBook(db=cast(Any, None)))
    items = [accepted("acme", T0, to="+4915112345678") for _ in range(40)]
    await mem.store.accept([w for _, w in items])
    assert await router.step() == 40
    found: dict[str, int] = {}
    for topic in send_topics("r1", "", 4):
        end = (await mem.log.counters([topic]))[topic]
        for doc in await mem.log.read(topic, 0, end):
            found[doc["message_id"]] = int(topic.split("#")[1])
    assert found == {e.message_id: partition_of(e.message_id, 4) for e, _ in items}
    assert not (await mem.log.counters(["send:r1"]))["send:r1"]  # nothing in the unpartitioned topic


