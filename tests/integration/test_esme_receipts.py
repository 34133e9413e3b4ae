"""Receipts back to ESMEs through the whole pipeline (router, connector, SMSC simulator): each final
event lands in the account's `dlr:` topic and goes back as a deliver_sm matched by
receipted_message_id; an ESME that is away or does not answer loses nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from smsc.connector import Connector
from smsc.sim.server import Simulator
from tests.integration.esme_client import Esme
from tests.integration.test_esme_server import Running, bound, resp_of, start_server
from tests.support.waiting import wait_for


@pytest.fixture
async def pipeline(mongo_db: AsyncDatabase, simulator: Simulator) -> AsyncIterator[Running]:
    """The SMPP server, a router and the simulator's connector, all running."""
    r = await start_server(mongo_db, max_binds=4, window=200)
    store, routes = EventStore(mongo_db), RouteStore(mongo_db)
    route = Route(id="sim", port=simulator.port, window=100)
    await routes.upsert(route, actor="test", now=utcnow())
    await routes.set_status("sim", RouteStatus.UP, utcnow())
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_until_stopped("router", Router(store, routes, utcnow, batch_size=200).step,
                                                   stop, 0.02)),
             asyncio.create_task(Connector(store, routes, route, utcnow, owner="t", batch_size=200).run(stop))]
    yield r
    stop.set()
    await asyncio.gather(*tasks)
    await r.server.stop()


async def submit_all(esme: Esme, n: int, window: int = 100) -> list[str]:
    """Submit `n` messages keeping at most `window` unanswered, as an ESME does."""
    resps = []
    for first in range(0, n, window):
        count = min(window, n - first)
        seqs = await asyncio.to_thread(lambda f=first, c=count: [esme.submit(f"49151{i:07d}", b"receipt please")
                                                                 for i in range(f, f + c)])
        resps += [await resp_of(esme, s) for s in seqs]
    assert all(r.status == 0 for r in resps)  # type: ignore[attr-defined]
    return [r.message_id.decode() for r in resps]  # type: ignore[attr-defined]


def receipted(esme: Esme) -> Counter[str]:
    with esme.lock:
        return Counter(p.receipted_message_id.decode() for p in esme.delivered)


async def test_a_thousand_submits_get_a_thousand_receipts(pipeline: Running) -> None:
    esme = await bound(pipeline)
    try:
        ids = await submit_all(esme, 1000)

        async def all_back() -> bool:
            return len(receipted(esme)) == 1000
        await wait_for(all_back, timeout_s=240, interval_s=0.2)
        await asyncio.sleep(0.5)  # nothing more may come
        got = receipted(esme)
    finally:
        esme.close()
    assert set(got) == set(ids) and set(got.values()) == {1}  # each matched, none twice
    sample = next(p for p in esme.delivered if p.receipted_message_id.decode() == ids[0])
    assert sample.esm_class == 0x04 and sample.message_state == 2
    text = sample.short_message.decode()
    assert text.startswith(f"id:{ids[0]} sub:001 dlvrd:001 submit date:") and "stat:DELIVRD err:000" in text
    assert sample.destination_addr.decode() == "acme" and sample.source_addr.decode() == "491510000000"
    checkpoint = await pipeline.db["checkpoints"].find_one({"_id": "esme|dlr:acme1"})
    assert checkpoint is not None and checkpoint["pos"] == 1000


async def test_receipts_wait_for_an_esme_that_is_away(pipeline: Running) -> None:
    tx = await bound(pipeline, "transmitter")
    try:
        ids = await submit_all(tx, 30)
    finally:
        tx.close()

    async def all_final() -> bool:
        counters = await EventStore(pipeline.db).log.counters(["dlr:acme1"])
        return counters["dlr:acme1"] == 30
    await wait_for(all_final, timeout_s=60)
    rx = await bound(pipeline, "receiver")
    try:
        async def all_back() -> bool:
            return len(receipted(rx)) == 30
        await wait_for(all_back, timeout_s=60)
    finally:
        rx.close()
    assert set(receipted(rx)) == set(ids)


async def test_an_unanswered_deliver_sm_is_sent_again(pipeline: Running) -> None:
    silent = await bound(pipeline, answer=False)
    try:
        [mid] = await submit_all(silent, 1)

        async def twice() -> bool:
            return receipted(silent)[mid] >= 2
        await wait_for(twice, timeout_s=60)
    finally:
        silent.close()
    sender = pipeline.server.senders["acme1"]
    assert sender.stats["redelivered"] >= 1
    checkpoint = await pipeline.db["checkpoints"].find_one({"_id": "esme|dlr:acme1"})
    assert checkpoint is None or checkpoint["pos"] == 0  # never answered: not done
    answering = await bound(pipeline)
    try:
        async def acked() -> bool:
            doc = await pipeline.db["checkpoints"].find_one({"_id": "esme|dlr:acme1"})
            return doc is not None and doc["pos"] == 1
        await wait_for(acked, timeout_s=60)
    finally:
        answering.close()
    assert receipted(answering)[mid] >= 1
