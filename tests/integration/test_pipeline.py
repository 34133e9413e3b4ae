"""Router and SMPP connector in one process against the simulator and a real MongoDB: accepted ->
routed -> sent -> delivered + billed (the receipt commit bills: no separate biller).

The e2e suite runs the same flow as separate processes; this one is quicker to debug.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import utcnow
from core.domain.message import await_topic, routed_message, send_topic, state_of_accepted
from core.domain.routing import Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.store.topics import Write
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from smsc.connector import Connector
from smsc.sim.server import Simulator
from tests.support.factories import accepted
from tests.support.waiting import wait_for

LIFECYCLE = ["accepted", "routed", "sent", "delivered", "billed"]


async def last_types(mongo_db: AsyncDatabase, ids: list[str]) -> dict[str, str]:
    """The type of each message's newest event."""
    out: dict[str, tuple[int, str]] = {}
    async for d in mongo_db["events"].find({"message_id": {"$in": ids}}, {"message_id": 1, "seq": 1, "type": 1}):
        if d["seq"] > out.get(d["message_id"], (0, ""))[0]:
            out[d["message_id"]] = (d["seq"], d["type"])
    return {m: t for m, (_, t) in out.items()}


async def test_messages_flow_to_billed_through_the_simulator(mongo_db: AsyncDatabase, simulator: Simulator,
                                                             tmp_path: Path) -> None:
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
    await store.accept([w for _, w in items])
    ids = [e.message_id for e, _ in items]

    stop = asyncio.Event()
    router = Router(store, routes, utcnow, batch_size=100)
    connector = Connector(store, routes, route, utcnow, owner="test-connector", batch_size=100)
    tasks = [asyncio.create_task(run_until_stopped("router", router.step, stop, 0.02)),
             asyncio.create_task(connector.run(stop))]
    try:
        async def all_billed() -> bool:
            return set((await last_types(mongo_db, ids)).values()) == {"billed"}
        await wait_for(all_billed)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    for event, _ in items:
        events = await store.load_events(event.message_id)
        assert [e.type.value for e in events] == LIFECYCLE, event.message_id
        assert [e.seq for e in events] == [1, 2, 3, 4, 5]
        sent = events[2].data
        assert sent["attempt"] == 1 and sent["price_per_part"] == 7 and "possible_duplicate" not in sent
        assert sent["expires_at"] == events[0].at + timedelta(seconds=3600)
    long_id = items[-1][0].message_id
    billed = (await store.load_events(long_id))[-1]
    assert billed.data["amount"] == 3 * 7 and billed.data["parts"] == 3
    tenant = await mongo_db["tenants"].find_one({"_id": "acme"})
    assert tenant["spent_minor"] == 300 * 7 + 3 * 7
    # The log is the queue: every `sent` is in the route's await topic, gapless; the connector's
    # checkpoint is past every routed entry; its attempts are resolved.
    positions = sorted([d["pos"] async for d in mongo_db["events"].find({"topic": await_topic("sim")})])
    assert positions == list(range(len(items)))
    checkpoint = await mongo_db["checkpoints"].find_one({"_id": f"connector|{send_topic('sim', '')}"})
    assert checkpoint["pos"] == len(items)
    attempts = [d async for d in mongo_db["attempts"].find({"owner": "connector|send:sim"})]
    assert attempts and sum(len(a["message_ids"]) for a in attempts) == len(items)
    assert connector.stats["sent"] == len(items) and connector.stats["receipts"] == 300 + 3
    owner = await mongo_db["owners"].find_one({"_id": "connector|send:sim"})
    assert owner["holder"] == "test-connector" and owner["lease_until"] <= utcnow()  # released at stop

    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == 300 + 3
    singles = sorted(j["destination"] for j in journal if j["udh_hex"] is None)
    assert singles == sorted(e.data["to"].lstrip("+") for e, _ in items[:-1])
    parts = sorted((j for j in journal if j["udh_hex"]), key=lambda j: j["udh_hex"])
    assert "".join(j["text"] for j in parts) == long_text


async def test_a_message_whose_validity_passed_before_sending_expires_unsent(mongo_db: AsyncDatabase,
                                                                             simulator: Simulator) -> None:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    now = utcnow()
    route = Route(id="sim", port=simulator.port)
    await routes.upsert(route, actor="test", now=now)
    await routes.set_status("sim", RouteStatus.UP, now)
    old = now - timedelta(seconds=120)
    event, write = accepted("acme", old, validity_s=60)  # accepted two minutes ago, valid for one
    await store.accept([Write(write.message_id, write.events)])  # not handed to the router
    # Routed while still valid (the router would expire it now), then the route's connector was away.
    state = state_of_accepted(event.to_doc())
    routed = {"message_id": state.message_id, "seq": 2, "type": "routed", "at": old, "tenant_id": "acme",
              "route_id": "sim", "channel": "sms", "v": 1,
              "data": {"route_id": "sim", "price_per_part": 0, "currency": "EUR", "strategy": "failover",
                       "message": routed_message(state)}}
    await store.log.commit([Write(state.message_id, [routed], [send_topic("sim", "")])])

    stop = asyncio.Event()
    connector = Connector(store, routes, route, utcnow, owner="test")
    task = asyncio.create_task(connector.run(stop))
    try:
        async def expired() -> bool:
            return (await last_types(mongo_db, [event.message_id])).get(event.message_id) == "expired"
        await wait_for(expired, timeout_s=20)
    finally:
        stop.set()
        await task
    events = await store.load_events(event.message_id)
    assert [e.type.value for e in events] == ["accepted", "routed", "expired"]
    assert "topic" not in (await mongo_db["events"].find_one({"message_id": event.message_id, "seq": 3}))
    assert await mongo_db["timers"].count_documents({}) == 0  # never sent, so nothing waits or is billed
    assert simulator.stats()["submit_sm"] == 0
    assert connector.stats["expired"] == 1
