"""A connector died after recording an attempt (lease) but before recording its outcome: the next
claim knows the outcome is unknown and applies the route's policy, `resend` or `hold`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus, UnknownOutcomePolicy
from core.store.deadletters import requeue
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.workers.router import Router
from smsc.connector import Connector
from smsc.simulator import Simulator
from tests.support.factories import accepted
from tests.support.waiting import wait_for


async def orphaned_attempts(mongo_db, sim: Simulator, policy: UnknownOutcomePolicy, n: int = 5):
    """n messages routed to a route with `policy`, then leased by a connector that 'dies' at once."""
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    now = utcnow()
    route = Route(id="sim", port=sim.port, price_per_part=5, on_unknown_outcome=policy)
    await routes.upsert(route, actor="test", now=now)
    await routes.set_status("sim", RouteStatus.UP, now)
    items = [accepted("acme", now, to=f"+49151{i:07d}") for i in range(n)]
    await store.accept(items)
    assert await Router(store, routes, utcnow).step() == n
    dead = await store.claim("send:sim", utcnow(), n, owner="dead-connector", lease_s=0.3)
    assert len(dead) == n
    await asyncio.sleep(0.4)  # its lease runs out with no outcome recorded
    return store, routes, route, [e.message_id for e, _ in items]


async def run_connector(store, routes, route, until) -> None:
    stop = asyncio.Event()
    connector = Connector(store, routes, route, utcnow, owner="new-connector")
    task = asyncio.create_task(connector.run(stop))
    try:
        await wait_for(until)
    finally:
        stop.set()
        await task


def journal(tmp_path: Path) -> list[dict]:
    path = tmp_path / "journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_resend_policy_sends_again_and_marks_a_possible_duplicate(mongo_db, simulator, tmp_path) -> None:
    store, routes, route, ids = await orphaned_attempts(mongo_db, simulator, UnknownOutcomePolicy.RESEND)

    async def delivered() -> bool:
        return await mongo_db["streams"].count_documents({"state": "delivered"}) == len(ids)

    await run_connector(store, routes, route, delivered)
    for mid in ids:
        events = await store.load_events(mid)
        assert [e.type.value for e in events] == ["accepted", "routed", "sent", "delivered"]
        assert events[2].data["possible_duplicate"] is True and events[2].data["attempt"] == 2

    async def journaled() -> bool:  # the simulator flushes its journal every 200 ms
        return len(journal(tmp_path)) >= len(ids)

    await wait_for(journaled)
    assert len(journal(tmp_path)) == len(ids)


async def test_hold_policy_parks_the_message_for_the_operator(mongo_db, simulator, tmp_path) -> None:
    store, routes, route, ids = await orphaned_attempts(mongo_db, simulator, UnknownOutcomePolicy.HOLD)

    async def held() -> bool:
        return await mongo_db["streams"].count_documents({"state": "unknown"}) == len(ids)

    await run_connector(store, routes, route, held)
    for mid in ids:
        events = await store.load_events(mid)
        assert [e.type.value for e in events] == ["accepted", "routed", "unknown"]
        assert "lease expired" in events[2].data["reason"]
        head = await store.head(mid)
        assert head is not None and head["queue"] is None
    await asyncio.sleep(0.3)
    assert journal(tmp_path) == []  # nothing was sent again

    # The operator decides to send them after all: requeue appends, and they go out.
    result = await requeue(store, ids, "test-operator", "checked with the carrier", utcnow(), state="unknown")
    assert sorted(result.requeued) == sorted(ids)
    assert await Router(store, routes, utcnow).step() == len(ids)

    async def delivered() -> bool:
        return await mongo_db["streams"].count_documents({"state": "delivered"}) == len(ids)

    await run_connector(store, routes, route, delivered)

    async def journaled() -> bool:
        return len(journal(tmp_path)) >= len(ids)

    await wait_for(journaled)
    assert len(journal(tmp_path)) == len(ids)
    events = await store.load_events(ids[0])
    assert [e.type.value for e in events] == ["accepted", "routed", "unknown", "requeued", "routed", "sent",
                                              "delivered"]
