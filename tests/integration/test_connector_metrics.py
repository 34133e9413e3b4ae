"""The connector's metrics against the simulator and a real MongoDB: submits, responses by status, binds,
ownership, window, the accepted->submit and submit->receipt histograms, scraped from a worker metrics
server as Prometheus would; no message or SMSC id in any label. And the ports `msgcore up` announces."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from prometheus_client import REGISTRY
from pymongo.asynchronous.database import AsyncDatabase

from core.config import Settings
from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus
from core.metrics_server import MetricsServer, metrics_endpoint
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from ops.up import metrics_base, metrics_lines
from smsc.connector import Connector
from smsc.sim.server import Simulator
from tests.integration.test_metrics import assert_bounded, value
from tests.support.factories import accepted
from tests.support.waiting import wait_for


async def _free_port() -> int:
    probe = MetricsServer("127.0.0.1", 0)
    port = await probe.start()
    await probe.stop()
    return port


async def test_connector_metrics_after_messages_are_sent_and_receipted(mongo_db: AsyncDatabase,
                                                                       simulator: Simulator) -> None:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    now = utcnow()
    rid = f"metrics-{uuid.uuid4().hex[:8]}"  # the registry is process-wide: a route of its own
    route = Route(id=rid, port=simulator.port, price_per_part=3, window=10, tps=500)
    await routes.upsert(route, actor="test", now=now)
    await routes.set_status(rid, RouteStatus.UP, now)
    await mongo_db["tenants"].insert_one({"_id": "acme", "name": "Acme", "spent_minor": 0})
    items = [accepted("acme", now, to=f"+49151{i:07d}", text=f"message {i}") for i in range(20)]
    items.append(accepted("acme", now, to="+491510000999", text="Долгое сообщение " * 10, encoding="ucs2", parts=3))
    await store.accept([w for _, w in items])
    ids = {e.message_id for e, _ in items}

    stop = asyncio.Event()
    connector = Connector(store, routes, route, utcnow, owner="test-connector", batch_size=50)
    tasks = [asyncio.create_task(run_until_stopped("router", Router(store, routes, utcnow).step, stop, 0.02)),
             asyncio.create_task(connector.run(stop))]
    try:
        async with metrics_endpoint(Settings(metrics_port=await _free_port()), "connector", mongo_db) as server:
            assert server is not None

            async def all_billed() -> bool:
                return await mongo_db["events"].count_documents({"type": "billed", "message_id": {"$in": list(ids)}}) \
                    == len(ids)
            await wait_for(all_billed)
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://127.0.0.1:{server.port}/metrics")).text
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    parts = 20 + 3
    assert value(text, "msgcore_smpp_submits_total", route=rid) == parts
    assert value(text, "msgcore_smpp_submit_responses_total", route=rid, status="ESME_ROK") == parts
    assert value(text, "msgcore_smpp_binds", route=rid, state="bound") == 1
    assert value(text, "msgcore_smpp_binds", route=rid, state="down") == 0
    assert value(text, "msgcore_connector_owner", route=rid) == 1
    assert value(text, "msgcore_smpp_window_size", route=rid) == 10
    assert value(text, "msgcore_smpp_tps_limit", route=rid) == 500
    assert (value(text, "msgcore_smpp_window_in_use", route=rid) or 0) >= 0
    assert value(text, "msgcore_accepted_to_submit_seconds_count", route=rid) == len(ids)  # first parts
    assert value(text, "msgcore_submit_to_receipt_seconds_count", route=rid) == len(ids)
    assert (value(text, "msgcore_batch_size_count", stage="connector") or 0) >= 1
    assert (value(text, "msgcore_events_appended_total", type="sent", route=rid) or 0) >= len(ids)
    smsc_ids = {i async for d in mongo_db["events"].find({"type": "sent", "message_id": {"$in": list(ids)}})
                for i in d["data"]["smsc_message_ids"]}
    assert len(smsc_ids) == parts
    assert_bounded(text, ids | smsc_ids)
    assert not any(i in text for i in ids | smsc_ids)

    # Stopped: no longer the owner, no bind counted.
    assert REGISTRY.get_sample_value("msgcore_connector_owner", {"route": rid}) == 0
    assert REGISTRY.get_sample_value("msgcore_smpp_binds", {"route": rid, "state": "bound"}) == 0
    assert REGISTRY.get_sample_value("msgcore_smpp_window_in_use", {"route": rid}) == 0


def test_msgcore_up_announces_a_metrics_endpoint_per_component() -> None:
    assert metrics_base(Settings(metrics_port_base=9500)) == 9500
    assert metrics_base(Settings()) >= 9300  # the first base whose worker ports are free
    assert metrics_lines("http://127.0.0.1:8080", 9300) == [
        "metrics: api http://127.0.0.1:8080/metrics",
        "metrics: router http://127.0.0.1:9301/metrics",
        "metrics: scheduler http://127.0.0.1:9302/metrics",
        "metrics: connector http://127.0.0.1:9303/metrics",
        "metrics: projector http://127.0.0.1:9304/metrics",
        "metrics: webhooks http://127.0.0.1:9305/metrics",
        "metrics: smpp-server http://127.0.0.1:9306/metrics",
        "metrics: mailer http://127.0.0.1:9307/metrics",
    ]
    assert metrics_lines("http://127.0.0.1:8080", 0) == ["metrics: api http://127.0.0.1:8080/metrics"]
