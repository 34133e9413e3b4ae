"""A partitioned route against a real simulator and a real MongoDB: two connector "processes" (route
managers) each own one partition and send only its messages; every message is sent once and
delivered. Repartitioning is refused while the route could still hold work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.domain.message import partition_of
from core.domain.routing import Route
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from smsc.route_manager import RouteManager
from smsc.sim.server import Simulator
from tests.integration.test_route_manager import journal
from tests.support.api import app_client, assert_error
from tests.support.factories import accepted
from tests.support.waiting import wait_for

ADMIN_KEY = "adm_partitions_0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
N = 120


@pytest_asyncio.fixture(loop_scope="session")
async def sim(tmp_path: Path) -> AsyncIterator[Simulator]:
    s = Simulator(port=0, receipt_delay_s=0.05, journal_path=tmp_path / "sim.jsonl")
    await s.start()
    yield s
    await s.stop()


async def _all_delivered(store: EventStore, ids: list[str]) -> bool:
    states = await store.states(ids)
    return all(s.state == "delivered" and s.billed for s in states.values()) and len(states) == len(ids)


async def test_two_processes_share_the_partitions_and_send_each_message_once(
        mongo_db: AsyncDatabase, sim: Simulator, tmp_path: Path) -> None:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    await routes.upsert(Route(id="p2", port=sim.port, window=10, partitions=2), actor="test", now=utcnow())
    stop = asyncio.Event()
    first = RouteManager(store, routes, utcnow, owner_prefix="proc-a", partitions=[0], interval_s=0.2, grace_s=2.0)
    second = RouteManager(store, routes, utcnow, owner_prefix="proc-b", partitions=[1], interval_s=0.2, grace_s=2.0)
    router = Router(store, routes, utcnow, batch_size=50)
    tasks = [asyncio.create_task(first.run(stop)), asyncio.create_task(second.run(stop)),
             asyncio.create_task(run_until_stopped("router", router.step, stop, 0.02))]
    try:
        items = [accepted("acme", utcnow(), to=f"+49151{i:07d}") for i in range(N)]
        await store.accept([w for _, w in items])
        ids = [e.message_id for e, _ in items]
        await wait_for(lambda: _all_delivered(store, ids), timeout_s=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    # Each partition had its own owner, and each owner sent exactly its partition's messages.
    holders = {d["_id"]: d["holder"] async for d in mongo_db["owners"].find({"_id": {"$regex": "^connector"}})}
    assert holders == {"connector|send:p2#0": "proc-a/p2#0", "connector|send:p2#1": "proc-b/p2#1"}
    sent_by = {}
    async for d in mongo_db["events"].find({"type": "sent", "message_id": {"$in": ids}}):
        sent_by[d["message_id"]] = d
    assert len(sent_by) == N
    for mid in ids:
        routed = await mongo_db["events"].find_one({"message_id": mid, "type": "routed"})
        assert routed is not None and routed["topic"] == f"send:p2#{partition_of(mid, 2)}"
    destinations = [j["destination"] for j in journal(tmp_path / "sim.jsonl")]
    assert len(destinations) == N and len(set(destinations)) == N  # each sent once


async def test_partitions_change_only_while_the_route_is_disabled_and_drained(mongo_db: AsyncDatabase) -> None:
    app = create_app(Settings(mongo_url="mongodb://unused.invalid", admin_key=ADMIN_KEY), db=mongo_db)
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    async with app_client(app) as client:
        r = await client.post("/v1/admin/routes", headers=ADMIN, json={"id": "rp", "prefixes": ["49"]})
        assert r.status_code == 201, r.text
        assert_error(await client.patch("/v1/admin/routes/rp", headers=ADMIN, json={"partitions": 4}),
                     409, "route_not_drained")
        assert (await client.patch("/v1/admin/routes/rp", headers=ADMIN, json={"enabled": False})).status_code == 200
        # A message routed to it and not yet sent: still refused, the route is not drained.
        router = Router(store, RouteStore(mongo_db), utcnow)
        await RouteStore(mongo_db).upsert(Route(id="rp", prefixes=("49",)), actor="test", now=utcnow())
        await store.accept([accepted("acme", utcnow(), to="+4915100000001")[1]])
        assert await router.step() == 1
        await RouteStore(mongo_db).set_enabled("rp", False, actor="test", now=utcnow())
        r = await client.patch("/v1/admin/routes/rp", headers=ADMIN, json={"partitions": 4})
        assert_error(r, 409, "route_not_drained")
        assert "1 messages wait" in r.json()["error"]["message"]
        # Its connector sent it (checkpoint moved past it): now drained, the change is taken.
        await mongo_db["checkpoints"].update_one({"_id": "connector|send:rp"}, {"$set": {"pos": 1}}, upsert=True)
        r = await client.patch("/v1/admin/routes/rp", headers=ADMIN, json={"partitions": 4})
        assert r.status_code == 200, r.text
        assert r.json()["route"]["partitions"] == 4


