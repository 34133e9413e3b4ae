"""A connector died after recording its attempt (and perhaps sending) but before committing the
outcome: the next owner of the route finds the attempt open past its checkpoint and applies the
route's policy to exactly those messages, `resend` or `hold`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus, UnknownOutcomePolicy
from core.store.deadletters import requeue
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook, TopicReader
from core.store.owners import Owners
from core.store.routes import RouteStore
from core.workers.router import Router
from smsc.connector import Connector
from smsc.session import SmppSession
from smsc.sim.server import Simulator
from tests.support.factories import accepted
from tests.support.waiting import wait_for

KEY = "connector|send:sim"


async def dead_owner(mongo_db: AsyncDatabase, port: int, *, send: bool, lease_s: float = 0.3) -> list[str]:
    """What a connector process does up to its crash: own the route, read a batch, record the
    attempt, (maybe) submit every message; then it is gone, nothing committed. Returns the ids."""
    store = EventStore(mongo_db)
    owners = Owners(mongo_db)
    own = await owners.acquire(KEY, "dead-connector", utcnow(), lease_s)
    assert own is not None
    reader = TopicReader(store.log, "connector", "send:sim", LaneBook(mongo_db))
    batch = await reader.read(1000)
    ids = [e["message_id"] for e in batch.entries]
    await owners.record_attempt(own, batch.ranges, ids, utcnow())
    if send:
        session = SmppSession("127.0.0.1", port, system_id="dead", password="x", on_deliver=lambda d: None)
        await session.open()
        for e in batch.entries:  # no receipt asked for: the dead process would not be there to take it
            result = await session.submit(source="msgcore", destination=e["data"]["message"]["to"].lstrip("+"),
                                          short_message=e["data"]["message"]["text"].encode(), data_coding=0,
                                          registered_delivery=0)
            assert result.status == 0
        await session.close()
    await asyncio.sleep(lease_s + 0.1)  # its lease runs out with no outcome recorded
    return ids


async def orphaned_attempts(mongo_db: AsyncDatabase, sim: Simulator, policy: UnknownOutcomePolicy, n: int = 5,
                            send: bool = False) -> tuple[EventStore, RouteStore, Route, list[str]]:
    """n messages routed to a route with `policy`, then attempted by a connector that 'dies' at once."""
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    now = utcnow()
    route = Route(id="sim", port=sim.port, price_per_part=5, on_unknown_outcome=policy)
    await routes.upsert(route, actor="test", now=now)
    await routes.set_status("sim", RouteStatus.UP, now)
    items = [accepted("acme", now, to=f"+49151{i:07d}") for i in range(n)]
    await store.accept([w for _, w in items])
    assert await Router(store, routes, utcnow).step() == n
    ids = await dead_owner(mongo_db, sim.port, send=send)
    assert sorted(ids) == sorted(e.message_id for e, _ in items)
    return store, routes, route, ids


async def run_connector(store: EventStore, routes: RouteStore, route: Route,
                        until: Callable[[], Awaitable[bool]]) -> Connector:
    stop = asyncio.Event()
    connector = Connector(store, routes, route, utcnow, owner="new-connector")
    task = asyncio.create_task(connector.run(stop))
    try:
        await wait_for(until)
    finally:
        stop.set()
        await task
    return connector


def journal(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def all_in(mongo_db: AsyncDatabase, ids: list[str], kind: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(await mongo_db["events"].distinct("message_id", {"message_id": {"$in": ids}, "type": kind})) \
            == len(ids)
    return check


async def test_resend_policy_sends_again_and_marks_a_possible_duplicate(mongo_db: AsyncDatabase,
                                                                        simulator: Simulator,
                                                                        tmp_path: Path) -> None:
    store, routes, route, ids = await orphaned_attempts(mongo_db, simulator, UnknownOutcomePolicy.RESEND)
    connector = await run_connector(store, routes, route, all_in(mongo_db, ids, "billed"))
    for mid in ids:
        events = await store.load_events(mid)
        assert [e.type.value for e in events] == ["accepted", "routed", "sent", "delivered", "billed"]
        # The dead owner's attempt counts: this send is the message's second.
        assert events[2].data["possible_duplicate"] is True and events[2].data["attempt"] == 2
    assert connector.stats["possible_duplicates"] == len(ids)

    async def journaled() -> bool:  # the simulator flushes its journal every 200 ms
        return len(journal(tmp_path)) >= len(ids)

    await wait_for(journaled)
    assert len(journal(tmp_path)) == len(ids)


async def test_hold_policy_parks_the_message_for_the_operator(mongo_db: AsyncDatabase, simulator: Simulator,
                                                              tmp_path: Path) -> None:
    store, routes, route, ids = await orphaned_attempts(mongo_db, simulator, UnknownOutcomePolicy.HOLD)
    connector = await run_connector(store, routes, route, all_in(mongo_db, ids, "unknown"))
    for mid in ids:
        events = await store.load_events(mid)
        assert [e.type.value for e in events] == ["accepted", "routed", "unknown"]
        assert "lease expired" in events[2].data["reason"]
    # Nothing hands them on: no topic entry, no timer; only an operator moves them.
    assert await mongo_db["events"].count_documents({"message_id": {"$in": ids}, "type": "unknown",
                                                     "topic": {"$exists": True}}) == 0
    assert await mongo_db["timers"].count_documents({}) == 0
    assert connector.stats["held_unknown"] == len(ids)
    await asyncio.sleep(0.3)
    assert journal(tmp_path) == []  # nothing was sent again

    # The operator decides to send them after all: requeue appends, and they go out.
    result = await requeue(store, ids, "test-operator", "checked with the carrier", utcnow(), state="unknown")
    assert sorted(result.requeued) == sorted(ids)
    assert await Router(store, routes, utcnow).step() == len(ids)
    await run_connector(store, routes, route, all_in(mongo_db, ids, "billed"))

    async def journaled() -> bool:
        return len(journal(tmp_path)) >= len(ids)

    await wait_for(journaled)
    assert len(journal(tmp_path)) == len(ids)
    events = await store.load_events(ids[0])
    assert [e.type.value for e in events] == ["accepted", "routed", "unknown", "requeued", "routed", "sent",
                                              "delivered", "billed"]
    assert "possible_duplicate" not in events[5].data  # a new position: no open attempt covers it
