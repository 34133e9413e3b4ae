"""Metrics and probes against real servers: the api's /metrics, /readyz; a worker's metrics server on
127.0.0.1; the router's event counters; label values stay bounded (no message id ever)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core import metrics
from core.config import Settings
from core.domain.events import utcnow
from core.metrics_server import MetricsServer, ProjectorLagEvents, metrics_endpoint, metrics_port_for
from core.metrics_store import StoreGauges
from core.readiness import mongo_check
from core.store.change_feed import ChangeFeed
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from core.workers.router import Router
from ops.embedded import free_port
from projections.writer import ProjectorStats
from tests.support.api import app_client
from tests.support.waiting import wait_for

MSG = {"to": "+4915112345678", "from": "Acme", "text": "Your code is 1234"}
# Label values allowed to vary freely; every other label must come from a small set.
MAX_VALUES_PER_LABEL = 60


@pytest.fixture
def settings() -> Settings:
    return Settings(mongo_url="mongodb://unused.invalid")


@pytest_asyncio.fixture(loop_scope="session")
async def api(settings: Settings, mongo_db: AsyncDatabase) -> AsyncIterator[dict[str, Any]]:
    key = await TenantStore(mongo_db).create("acme", "Acme", utcnow())
    async with app_client(create_app(settings, db=mongo_db)) as client:
        yield {"client": client, "auth": {"Authorization": f"Bearer {key}"}, "db": mongo_db}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


def assert_bounded(text: str, forbidden: set[str]) -> None:
    """No label value is one of `forbidden` (message ids) and no label takes too many values."""
    values: dict[tuple[str, str], set[str]] = {}
    for (name, labels), _ in samples(text).items():
        for k, v in labels:
            assert v not in forbidden, f"{name} has {k}={v}"
            if k != "le":
                values.setdefault((name, k), set()).add(v)
    wide = {key: len(v) for key, v in values.items() if len(v) > MAX_VALUES_PER_LABEL}
    assert not wide, wide


async def test_api_metrics_count_requests_by_route_template(api: dict[str, Any]) -> None:
    client, auth = api["client"], api["auth"]
    r = await client.post("/v1/messages", json=MSG, headers=auth)
    assert r.status_code == 202, r.text
    message_id = r.json()["id"]
    assert (await client.get(f"/v1/messages/{message_id}", headers=auth)).status_code == 200
    assert (await client.get(f"/no/such/{message_id}")).status_code == 404

    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert (value(text, "msgcore_api_requests_total", method="POST", handler="/v1/messages", status="202")
            or 0) >= 1
    assert (value(text, "msgcore_api_requests_total", method="GET", handler="/v1/messages/{message_id}",
                  status="200") or 0) >= 1
    assert (value(text, "msgcore_api_requests_total", method="GET", handler="unmatched", status="404") or 0) >= 1
    assert (value(text, "msgcore_api_request_duration_seconds_count", method="POST", handler="/v1/messages")
            or 0) >= 1
    # The store gauges: the accepted message waits in the router's topic of the shared lane.
    assert value(text, "msgcore_backlog_messages", stage="route", route="", lane="shared") == 1
    assert message_id not in text
    assert_bounded(text, {message_id})


async def test_metrics_and_readyz_stay_out_of_the_openapi_document(api: dict[str, Any]) -> None:
    paths = (await api["client"].get("/openapi.json")).json()["paths"]
    assert "/metrics" not in paths and "/readyz" not in paths and "/healthz" in paths


async def test_api_readyz_names_the_store_that_failed(api: dict[str, Any], settings: Settings) -> None:
    r = await api["client"].get("/readyz")
    assert (r.status_code, r.json()) == (200, {"status": "ok", "checks": {"mongo": "ok"}})

    mongo: AsyncMongoClient = AsyncMongoClient("mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200", tz_aware=True)
    try:
        app = create_app(settings, db=mongo["x"])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            r = await client.get("/readyz")
            assert r.status_code == 503
            assert r.json()["status"] == "unavailable"
            assert r.json()["checks"]["mongo"].startswith("unavailable")
    finally:
        await mongo.close()


async def test_router_counts_the_events_it_commits(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"], api["db"]
    assert (await client.post("/v1/messages", json=MSG, headers=auth)).status_code == 202
    before = REGISTRY.get_sample_value("msgcore_events_appended_total", {"type": "failed", "route": ""}) or 0
    batches = REGISTRY.get_sample_value("msgcore_batch_size_count", {"stage": "router"}) or 0

    assert await Router(EventStore(db), RouteStore(db), utcnow).step() == 1  # no route: NO_ROUTE failure

    assert REGISTRY.get_sample_value("msgcore_events_appended_total", {"type": "failed", "route": ""}) == before + 1
    assert REGISTRY.get_sample_value("msgcore_batch_size_count", {"stage": "router"}) == batches + 1


async def test_worker_metrics_server_answers_on_loopback(mongo_db: AsyncDatabase) -> None:
    gauges = StoreGauges(mongo_db, utcnow)
    server = MetricsServer("127.0.0.1", 0, {"mongo": mongo_check(mongo_db)}, gauges)
    port = await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            r = await client.get("/readyz")
            assert (r.status_code, r.json()) == (200, {"status": "ok", "checks": {"mongo": "ok"}})
            r = await client.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            assert value(r.text, "msgcore_backlog_messages", stage="route", route="", lane="shared") == 0
            assert "msgcore_events_appended_total" in r.text or "msgcore_events_appended" in r.text
            assert (await client.get("/other")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
    finally:
        await server.stop()


async def test_worker_readyz_is_503_when_mongodb_is_unreachable() -> None:
    mongo: AsyncMongoClient = AsyncMongoClient("mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200", tz_aware=True)
    server = MetricsServer("127.0.0.1", 0, {"mongo": mongo_check(mongo["x"])}, StoreGauges(mongo["x"], utcnow))
    port = await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/readyz")
            assert r.status_code == 503 and r.json()["checks"]["mongo"].startswith("unavailable")
            assert (await client.get("/healthz")).status_code == 200  # alive all the same
            r = await client.get("/metrics")  # the store gauges are left empty, the error counted
            assert r.status_code == 200
            assert (value(r.text, "msgcore_store_gauge_errors_total") or 0) >= 1
    finally:
        await server.stop()
        await mongo.close()


async def test_metrics_endpoint_uses_the_component_port(mongo_db: AsyncDatabase) -> None:
    assert metrics_port_for(Settings(), "router") == 0
    assert metrics_port_for(Settings(metrics_port_base=9300), "scheduler") == 9302
    assert metrics_port_for(Settings(metrics_port=9400, metrics_port_base=9300), "scheduler") == 9400
    async with metrics_endpoint(Settings(), "router", mongo_db) as off:
        assert off is None
    probe = MetricsServer("127.0.0.1", 0)
    free = await probe.start()
    await probe.stop()
    async with metrics_endpoint(Settings(metrics_port=free), "router", mongo_db) as server:
        assert server is not None and server.port == free
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{free}/healthz")).status_code == 200


def test_the_projector_gauges_read_its_stats_at_scrape_time() -> None:
    stats = ProjectorStats()
    now = utcnow()
    metrics.watch_projector(stats, lambda: now)
    assert REGISTRY.get_sample_value("msgcore_projector_active") == 0
    stats.active, stats.received, stats.last_event_at = True, 10, now - timedelta(seconds=3)
    # Each read is a scrape: the first after new events shows the lag, the next (none since) is idle.
    assert REGISTRY.get_sample_value("msgcore_projector_lag_seconds") == 3.0
    assert REGISTRY.get_sample_value("msgcore_projector_lag_seconds") == 0.0
    assert REGISTRY.get_sample_value("msgcore_projector_active") == 1


async def test_the_projector_times_its_batches_and_counts_its_lag_in_events(mongo_db: AsyncDatabase, pg_url: str,
                                                                              pg_schema: str) -> None:
    from projections.projector import Projector
    from tests.integration.test_projector import events_collection, lifecycle

    events = await events_collection(mongo_db)
    now = utcnow()
    docs = [{**d, "at": now} for i in range(5) for d in lifecycle(i)]
    await events.insert_many(docs)
    # The histogram's `_count` is how many batches were recorded (a count, never a duration).
    batches_before = REGISTRY.get_sample_value("msgcore_projector_batch_seconds_count") or 0
    projector = Projector(events, pg_url, pg_schema, batch_wait_s=0.1)
    metrics.watch_projector(projector.stats, utcnow)
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        async with metrics_endpoint(Settings(metrics_port=free_port(), pg_url=pg_url), "projector", mongo_db,
                                    pg=True) as server, httpx.AsyncClient() as client:
            assert server is not None
            await wait_for(lambda: asyncio.sleep(0, result=projector.applied == len(docs)), timeout_s=30)  # replayed
            more = [{**d, "at": utcnow()} for d in lifecycle(99)]
            await events.insert_many(more)  # through the change stream
            await wait_for(lambda: asyncio.sleep(0, result=projector.applied == len(docs) + len(more)), timeout_s=30)
            text = (await client.get(f"http://127.0.0.1:{server.port}/metrics")).text
            batches_recorded = value(text, "msgcore_projector_batch_seconds_count") or 0
            assert batches_recorded > batches_before  # the batches of this test were recorded
            assert value(text, "msgcore_projector_lag_events") == 0  # caught up
            assert value(text, "msgcore_projector_active") == 1
    finally:
        stop.set()
        await task


async def test_the_lag_in_events_counts_the_log_past_the_newest_applied(mongo_db: AsyncDatabase) -> None:
    stats = ProjectorStats(active=True, last_event_at=utcnow() - timedelta(seconds=30))
    metrics.watch_projector(stats, utcnow)
    await mongo_db["events"].insert_many([{"message_id": f"m{i}", "seq": 1, "at": utcnow()} for i in range(7)])
    await ProjectorLagEvents(ChangeFeed(mongo_db["events"]), ttl_s=0).refresh()
    assert REGISTRY.get_sample_value("msgcore_projector_lag_events") == 7
    stats.last_event_at = utcnow()  # everything seen: nothing from a later second
    await ProjectorLagEvents(ChangeFeed(mongo_db["events"]), ttl_s=0).refresh()
    assert REGISTRY.get_sample_value("msgcore_projector_lag_events") == 0

    mongo: AsyncMongoClient = AsyncMongoClient(f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=200",
                                               tz_aware=True)
    try:
        stats.last_event_at = utcnow() - timedelta(seconds=30)
        await ProjectorLagEvents(ChangeFeed(mongo["x"]["events"]), ttl_s=0).refresh()
        assert math.isnan(REGISTRY.get_sample_value("msgcore_projector_lag_events") or 0.0)  # unknown, not 0
    finally:
        await mongo.close()
        metrics.watch_projector(ProjectorStats(), utcnow)
