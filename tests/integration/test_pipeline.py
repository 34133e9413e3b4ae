"""Router, SMPP connector and biller in one process against the simulator and a real MongoDB.

The e2e suite runs the same flow as separate processes; this one is quicker to debug.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.workers.biller import Biller
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from smsc.connector import Connector
from smsc.simulator import Simulator
from tests.support.factories import accepted
from tests.support.waiting import wait_for

LIFECYCLE = ["accepted", "routed", "sent", "delivered", "billed"]




async def test_messages_flow_to_billed_through_the_simulator(mongo_db, simulator: Simulator, tmp_path: Path) -> None:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    now = utcnow()
    route = Route(id="sim", port=simulator.port, price_per_part=7, window=20)
    await routes.upsert(route, actor="test", now=now)
    await routes.set_status("sim", RouteStatus.UP, now)
    await mongo_db["tenants"].insert_one({"_id": "acme", "name": "Acme", "spent_minor": 0})

    long_text = "Долгое сообщение " * 10  # UCS-2, several parts
    items = [accepted("acme", now, to=f"+49151{i:07d}", text=f"message {i}") for i in range(300)]
    items.append(accepted("acme", now, to="+491510000999", text=long_text, encoding="ucs2", parts=3))
    await store.accept(items)

    stop = asyncio.Event()
    router = Router(store, routes, utcnow, batch_size=100)
    biller = Biller(store, utcnow, batch_size=100)
    connector = Connector(store, routes, route, utcnow, owner="test-connector", batch_size=100)
    tasks = [asyncio.create_task(run_until_stopped("router", router.step, stop, 0.02)),
             asyncio.create_task(run_until_stopped("biller", biller.step, stop, 0.02)),
             asyncio.create_task(connector.run(stop))]
    try:
        async def all_billed() -> bool:
            return await mongo_db["streams"].count_documents({"billed": True}) == len(items)
        await wait_for(all_billed)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    for event, _ in items:
        events = await store.load_events(event.message_id)
        assert [e.type.value for e in events] == LIFECYCLE, event.message_id
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    long_id = items[-1][0].message_id
    billed = (await store.load_events(long_id))[-1]
    assert billed.data["amount"] == 3 * 7 and billed.data["parts"] == 3
    tenant = await mongo_db["tenants"].find_one({"_id": "acme"})
    assert tenant["spent_minor"] == 300 * 7 + 3 * 7

    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == 300 + 3
    singles = sorted(j["destination"] for j in journal if j["udh_hex"] is None)
    assert singles == sorted(e.data["to"].lstrip("+") for e, _ in items[:-1])
    parts = sorted((j for j in journal if j["udh_hex"]), key=lambda j: j["udh_hex"])
    assert "".join(j["text"] for j in parts) == long_text


async def test_a_message_whose_validity_passed_before_sending_expires_unsent(mongo_db, simulator: Simulator,
                                                                             tmp_path: Path) -> None:
    from datetime import timedelta

    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    now = utcnow()
    route = Route(id="sim", port=simulator.port)
    await routes.upsert(route, actor="test", now=now)
    await routes.set_status("sim", RouteStatus.UP, now)
    old = now - timedelta(seconds=120)
    stale = accepted("acme", old, validity_s=60)  # accepted two minutes ago, valid for one
    await store.accept([stale])
    # Routed while still valid (the router would expire it now), then the route's connector was away.
    from core.domain.events import EventType
    from core.domain.message import evolve, next_event
    from core.store.eventstore import Transition
    state = evolve(None, stale[0])
    routed = next_event(state, EventType.ROUTED, old, {"route_id": "sim", "price_per_part": 0, "currency": "EUR",
                                                       "strategy": "failover"}, route_id="sim")
    await store.commit([Transition(1, [routed], evolve(state, routed))], old)

    stop = asyncio.Event()
    connector = Connector(store, routes, route, utcnow, owner="test")
    task = asyncio.create_task(connector.run(stop))
    try:
        async def expired() -> bool:
            head = await store.head(stale[0].message_id)
            return head is not None and head["state"] == "expired"
        await wait_for(expired, timeout_s=20)
    finally:
        stop.set()
        await task
    assert [e.type.value for e in await store.load_events(stale[0].message_id)] == ["accepted", "routed", "expired"]
    head = await store.head(stale[0].message_id)
    assert head is not None and head["queue"] is None  # never sent, so nothing to bill
    assert simulator.stats()["submit_sm"] == 0
