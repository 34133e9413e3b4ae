"""The route manager against real simulators and a real MongoDB: routes added, changed, disabled and
enabled at run time take effect without a restart (connectors start, rebind elsewhere, unbind)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from smsc.route_manager import RouteManager
from smsc.sim.server import Simulator
from tests.support.factories import accepted
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(loop_scope="session")
async def sims(tmp_path: Path) -> AsyncIterator[list[Simulator]]:
    started = [Simulator(port=0, receipt_delay_s=0.05, journal_path=tmp_path / f"sim{i}.jsonl") for i in (1, 2)]
    for s in started:
        await s.start()
    yield started
    for s in started:
        await s.stop()


def journal(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def journaled(path: Path, destinations: list[str]) -> bool:
    """The simulator's journal (flushed every 0.2 s) holds exactly these destinations."""
    return [j["destination"] for j in journal(path)] == destinations


async def status_is(routes: RouteStore, route_id: str, want: RouteStatus) -> bool:
    return (await routes.statuses(utcnow())).get(route_id, RouteStatus.DOWN) == want


async def send_one(store: EventStore, to: str) -> str:
    event, write = accepted("acme", utcnow(), to=to)
    await store.accept([write])
    return event.message_id


async def delivered(store: EventStore, message_id: str) -> bool:
    state = await store.state(message_id)
    return state is not None and state.state == "delivered" and state.billed


async def test_routes_changed_at_run_time_take_effect_without_a_restart(mongo_db: AsyncDatabase,
                                                                       sims: list[Simulator],
                                                                       tmp_path: Path) -> None:
    sim1, sim2 = sims
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    stop = asyncio.Event()
    manager = RouteManager(store, routes, utcnow, owner_prefix="test", interval_s=0.2, grace_s=2.0)
    router = Router(store, routes, utcnow, batch_size=50)
    tasks = [asyncio.create_task(manager.run(stop)),
             asyncio.create_task(run_until_stopped("router", router.step, stop, 0.02))]
    try:
        await asyncio.sleep(0.5)
        assert manager.running == {} and sim1.stats()["binds_total"] == 0  # no route, no connector

        # Added at run time: its connector starts and binds; traffic flows.
        route = Route(id="r1", port=sim1.port, binds=2, window=5)
        await routes.upsert(route, actor="test", now=utcnow())
        await wait_for(lambda: _binds(sim1, 2), timeout_s=20)
        await wait_for(lambda: status_is(routes, "r1", RouteStatus.UP), timeout_s=20)
        first = await send_one(store, "+491510000001")
        await wait_for(lambda: delivered(store, first), timeout_s=20)
        await wait_for(lambda: journaled(tmp_path / "sim1.jsonl", ["491510000001"]), timeout_s=5)

        # A port change: the connector stops gracefully and reconnects to the new simulator.
        route = route.model_copy(update={"port": sim2.port})
        await routes.upsert(route, actor="test", now=utcnow())
        await wait_for(lambda: _binds(sim2, 2), timeout_s=20)
        await wait_for(lambda: _binds(sim1, 0), timeout_s=20)
        assert sim1.stats()["unbind_received"] == 2  # unbound cleanly, not dropped
        assert manager.starts == 2
        second = await send_one(store, "+491510000002")
        await wait_for(lambda: delivered(store, second), timeout_s=20)
        await wait_for(lambda: journaled(tmp_path / "sim2.jsonl", ["491510000002"]), timeout_s=5)
        assert len(journal(tmp_path / "sim1.jsonl")) == 1

        # A change only the router reads (priority, price): the binds stay up, nothing restarts.
        route = route.model_copy(update={"priority": 3, "price_per_part": 9})
        await routes.upsert(route, actor="test", now=utcnow())
        await wait_for(lambda: _same(manager.running["r1"].connector.route, route), timeout_s=20)
        assert manager.starts == 2 and sim2.stats()["binds_total"] == 2

        # Disabled: it unbinds and is reported DOWN. Enabled: it binds again.
        await routes.disable("r1", actor="test", now=utcnow())
        await wait_for(lambda: _binds(sim2, 0), timeout_s=20)
        await wait_for(lambda: status_is(routes, "r1", RouteStatus.DOWN), timeout_s=20)
        assert "r1" not in manager.running
        await routes.enable("r1", actor="test", now=utcnow())
        await wait_for(lambda: _binds(sim2, 2), timeout_s=20)
        await wait_for(lambda: status_is(routes, "r1", RouteStatus.UP), timeout_s=20)

        # Removed from the collection altogether: stopped too.
        await mongo_db["routes"].delete_one({"_id": "r1"})
        await wait_for(lambda: _binds(sim2, 0), timeout_s=20)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert manager.running == {}
    assert sim1.stats()["binds_active"] == 0 and sim2.stats()["binds_active"] == 0


async def test_a_manager_given_route_ids_runs_only_those(mongo_db: AsyncDatabase, sims: list[Simulator]) -> None:
    sim1, sim2 = sims
    store = EventStore(mongo_db)
    routes = RouteStore(mongo_db)
    await routes.upsert(Route(id="mine", port=sim1.port), actor="test", now=utcnow())
    await routes.upsert(Route(id="theirs", port=sim2.port), actor="test", now=utcnow())
    await routes.upsert(Route(id="off", port=sim2.port, enabled=False), actor="test", now=utcnow())
    stop = asyncio.Event()
    manager = RouteManager(store, routes, utcnow, owner_prefix="test", route_ids=["mine", "off"], interval_s=0.2,
                           grace_s=2.0)
    task = asyncio.create_task(manager.run(stop))
    try:
        await wait_for(lambda: _binds(sim1, 1), timeout_s=20)
        await asyncio.sleep(0.5)
        assert set(manager.running) == {"mine"}
        assert sim2.stats()["binds_total"] == 0
        await routes.enable("off", actor="test", now=utcnow())
        await wait_for(lambda: _binds(sim2, 1), timeout_s=20)
        assert set(manager.running) == {"mine", "off"}
    finally:
        stop.set()
        await task


async def test_the_connector_command_picks_up_routes_added_after_it_started(mongo_db: AsyncDatabase,
                                                                          mongo_url: str, sims: list[Simulator],
                                                                          tmp_path: Path) -> None:
    sim1, _ = sims
    routes = RouteStore(mongo_db)
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": mongo_db.name,
           "MSGCORE_DATA_DIR": str(tmp_path), "MSGCORE_LOG_LEVEL": "INFO"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ops.cli", "connector", cwd=REPO, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(1.0)
        assert proc.returncode is None  # no route yet is not an error: it waits for one
        await routes.upsert(Route(id="late", port=sim1.port), actor="test", now=utcnow())
        await wait_for(lambda: _binds(sim1, 1), timeout_s=30)
        await wait_for(lambda: status_is(routes, "late", RouteStatus.UP), timeout_s=30)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "route=late" in err.decode()
    await wait_for(lambda: _binds(sim1, 0), timeout_s=10)
    assert sim1.stats()["unbind_received"] == 1


async def _binds(sim: Simulator, n: int) -> bool:
    return sim.stats()["binds_active"] == n


async def _same(a: Route, b: Route) -> bool:
    return a == b
