"""Liveness and readiness over real HTTP servers on 127.0.0.1: /healthz answers without a store round
trip, /readyz names the store or upstream that is missing (a closed port stands for a store that is
down; a stopped SMSC simulator for an SMSC that dropped)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus
from core.metrics_server import metrics_endpoint
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from ops.embedded import free_port
from smsc.connector import Connector
from smsc.sim.server import Simulator
from tests.support.waiting import wait_for


def closed_port() -> int:
    """A loopback port nothing listens on (bound once by the OS, then released)."""
    return free_port()


@asynccontextmanager
async def unreachable_mongo() -> AsyncIterator[AsyncDatabase]:
    client: AsyncMongoClient = AsyncMongoClient(f"mongodb://127.0.0.1:{closed_port()}/?serverSelectionTimeoutMS=300",
                                                tz_aware=True)
    try:
        yield client["x"]
    finally:
        await client.close()


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """The app behind uvicorn on 127.0.0.1 (lifespan off: its index creation needs the store)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: asyncio.sleep(0, result=server.started), timeout_s=10)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_api_healthz_stays_200_while_readyz_reports_mongodb_unreachable() -> None:
    async with unreachable_mongo() as db, serving(create_app(Settings(mongo_url="mongodb://unused.invalid"), db=db)
                                                  ) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/healthz")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        r = await client.get("/readyz")
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "unavailable"
        assert r.json()["checks"]["mongo"].startswith("unavailable")


async def test_api_readyz_is_200_with_its_store(mongo_db: AsyncDatabase) -> None:
    app = create_app(Settings(mongo_url="mongodb://unused.invalid"), db=mongo_db)
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.get("/readyz")
        assert (r.status_code, r.json()) == (200, {"status": "ok", "checks": {"mongo": "ok"}})


async def test_projector_readyz_checks_mongodb_and_postgresql(mongo_db: AsyncDatabase, pg_url: str) -> None:
    async with metrics_endpoint(Settings(metrics_port=free_port(), pg_url=pg_url), "projector", mongo_db,
                                pg=True) as server, httpx.AsyncClient() as client:
        assert server is not None
        r = await client.get(f"http://127.0.0.1:{server.port}/readyz")
        assert (r.status_code, r.json()) == (200, {"status": "ok", "checks": {"mongo": "ok", "postgres": "ok"}})

    down_pg = f"postgresql://postgres@127.0.0.1:{closed_port()}/msgcore"
    async with unreachable_mongo() as db, metrics_endpoint(Settings(metrics_port=free_port(), pg_url=down_pg),
                                                           "projector", db, pg=True) as server:
        assert server is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}  # alive all the same
            r = await client.get("/readyz")
            assert r.status_code == 503
            checks = r.json()["checks"]
            assert checks["mongo"].startswith("unavailable") and checks["postgres"].startswith("unavailable")


async def test_connector_readyz_needs_a_bound_smpp_link_for_its_route(mongo_db: AsyncDatabase) -> None:
    sim = Simulator(port=0, receipt_delay_s=0.05)
    await sim.start()
    store, routes = EventStore(mongo_db), RouteStore(mongo_db)
    await store.ensure_indexes()
    rid = f"ready-{uuid.uuid4().hex[:8]}"  # the bind gauges are process-wide: a route of its own
    route = Route(id=rid, port=sim.port)
    await routes.upsert(route, actor="test", now=utcnow())
    await routes.set_status(rid, RouteStatus.UP, utcnow())
    stop, sim_up = asyncio.Event(), True
    task: asyncio.Task[None] | None = None
    connector = Connector(store, routes, route, utcnow, owner="test-ready", batch_size=10)
    try:
        async with metrics_endpoint(Settings(metrics_port=free_port()), "connector", mongo_db) as server:
            assert server is not None
            url = f"http://127.0.0.1:{server.port}/readyz"
            async with httpx.AsyncClient() as client:

                async def smpp() -> str:
                    return str((await client.get(url)).json()["checks"]["smpp"])

                assert rid not in await smpp()  # not its owner yet: nothing to wait for
                task = asyncio.create_task(connector.run(stop))
                await wait_for(lambda: asyncio.sleep(0, result=sim.stats()["binds_active"] == 1), timeout_s=30)
                await wait_for(lambda: _ok(client, url, rid), timeout_s=30)

                await sim.stop()  # the SMSC unbinds and goes away; the connector keeps trying to bind
                sim_up = False
                await wait_for(lambda: _names(client, url, rid), timeout_s=30)
                r = await client.get(url)
                assert r.status_code == 503
                assert r.json()["checks"]["smpp"] == f"unavailable: no bound SMPP link for route {rid}"
                assert r.json()["checks"]["mongo"] == "ok"

                stop.set()
                await task  # released the route: a standby connector is ready
                task = None
                assert rid not in await smpp()
    finally:
        stop.set()
        if task is not None:
            await task
        if sim_up:
            await sim.stop()


async def _ok(client: httpx.AsyncClient, url: str, rid: str) -> bool:
    """The connector owns `rid` with a bound link, and /readyz is content with that."""
    owned = REGISTRY.get_sample_value("msgcore_connector_owner", {"route": rid}) == 1
    bound = REGISTRY.get_sample_value("msgcore_smpp_binds", {"route": rid, "state": "bound"}) == 1
    r = await client.get(url)
    return owned and bound and rid not in r.json()["checks"]["smpp"] and r.json()["checks"]["mongo"] == "ok"


async def _names(client: httpx.AsyncClient, url: str, rid: str) -> bool:
    return rid in (await client.get(url)).json()["checks"]["smpp"]
