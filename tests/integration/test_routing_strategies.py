"""Routing strategies against two or three real simulators and a real MongoDB, with the router and the
connectors in this process (as in test_pipeline.py).

A route is DOWN while its connection is down: here its simulator is stopped, its connector's binds
drop and its heartbeat says `down`; starting a simulator again on the same port brings it back. Which
route carried a message is read from the log (`routed` events) and checked at the simulators' journals.
BUSY (window full) cannot be produced on demand with the simulator (it answers every submit_sm at
once), so the BUSY tests set the route status in the RouteStore directly and run the router alone.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import Event, EventType, utcnow
from core.domain.message import event_doc, evolve, lane_of, route_topic, routed_message
from core.domain.routing import Route, RouteStatus, Strategy
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.routes import ROUTES_TTL_S, RouteStore
from core.store.timers import Timers, timer_doc
from core.store.topics import Write
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from core.workers.timers import TimerReleaser
from smsc.connector import Connector
from smsc.pdu import ESME_RSYSERR
from smsc.sim.server import Simulator
from tests.support.factories import accepted
from tests.support.waiting import wait_for


class Network:
    """Named simulators (one per route), the routes' connectors and a router, all in this process."""

    def __init__(self, db: AsyncDatabase, tmp_path: Path) -> None:
        self.db = db
        self.tmp_path = tmp_path
        self.store = EventStore(db)
        self.routes = RouteStore(db)
        self.sims: dict[str, Simulator] = {}
        self.ports: dict[str, int] = {}
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.connectors: dict[str, Connector] = {}
        self.router = Router(self.store, self.routes, utcnow, batch_size=100, rng=random.Random(7))
        self.batches = 0

    async def start_sim(self, name: str, **faults: Any) -> Simulator:
        """Start (or start again, on its old port) the simulator of route `name`."""
        sim = Simulator(port=self.ports.get(name, 0), receipt_delay_s=0.05,
                        journal_path=self.tmp_path / f"{name}.jsonl")
        if faults:
            sim.set_faults(**faults)
        await sim.start()
        self.sims[name], self.ports[name] = sim, sim.port
        return sim

    async def stop_sim(self, name: str) -> None:
        await self.sims.pop(name).stop()

    async def run(self, *routes: Route) -> None:
        await self.store.ensure_indexes()
        for r in routes:
            await self.routes.upsert(r, actor="test", now=utcnow())
            self.connectors[r.id] = Connector(self.store, self.routes, r, utcnow, owner=f"test/{r.id}", batch_size=100)
            self.tasks.append(asyncio.create_task(self.connectors[r.id].run(self.stop, grace_s=2.0)))
        self.tasks.append(asyncio.create_task(run_until_stopped("router", self.router.step, self.stop, 0.02)))
        timers = TimerReleaser(Timers(self.db), LaneBook(self.db), utcnow)
        self.tasks.append(asyncio.create_task(run_until_stopped("timers", timers.step, self.stop, 0.1)))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        for sim in list(self.sims.values()):
            await sim.stop()

    async def wait_status(self, want: dict[str, RouteStatus]) -> None:
        """Until the connectors' heartbeats say `want`; then long enough for the router's route cache to
        be reloaded before it routes the next message (it reloads at most every ROUTES_TTL_S)."""
        async def reached() -> bool:
            status = await self.routes.statuses(utcnow())
            return all(status.get(rid, RouteStatus.DOWN) == s for rid, s in want.items())
        await wait_for(reached, timeout_s=60)
        await asyncio.sleep(ROUTES_TTL_S + 0.1)

    async def send(self, n: int) -> dict[str, str]:
        """Accept `n` messages (unique destinations) and wait until every one is delivered; returns
        destination (as the SMSC sees it) -> message id."""
        self.batches += 1
        items = [accepted("acme", utcnow(), to=f"+4915{self.batches:03d}{i:05d}") for i in range(n)]
        await self.store.accept([w for _, w in items])
        ids = [e.message_id for e, _ in items]

        async def all_delivered() -> bool:
            folded = await self.store.states(ids)
            return len(folded) == n and all(s.state == "delivered" and s.billed for s in folded.values())
        await wait_for(all_delivered, timeout_s=90)
        return {e.data["to"].lstrip("+"): e.message_id for e, _ in items}

    async def routed_to(self, ids: list[str]) -> Counter[str]:
        """Route of every `routed` event of these messages."""
        return Counter([e["route_id"] async for e in self.db["events"].find(
            {"message_id": {"$in": ids}, "type": "routed"}, {"route_id": 1})])

    def journal(self, name: str) -> list[dict[str, Any]]:
        path = self.tmp_path / f"{name}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    async def carried(self, batch: dict[str, str]) -> dict[str, int]:
        """How many of the batch each route carried, by the log; checked against the journals."""
        routed = await self.routed_to(list(batch.values()))
        await asyncio.sleep(0.3)  # the simulators flush their journals every 0.2 s
        at_sims = {name: len({j["destination"] for j in self.journal(name)} & set(batch)) for name in self.ports}
        assert at_sims == {name: routed.get(name, 0) for name in self.ports}, (at_sims, routed)
        return at_sims


@pytest_asyncio.fixture(loop_scope="session")
async def net(mongo_db: AsyncDatabase, tmp_path: Path) -> AsyncIterator[Network]:
    n = Network(mongo_db, tmp_path)
    try:
        yield n
    finally:
        await n.close()


# ---- DOWN and back, with real connections ------------------------------------------------------------

@pytest.mark.parametrize("strategy", [Strategy.FAILOVER, Strategy.LOAD_BALANCE])
async def test_traffic_leaves_a_route_while_it_is_down_and_returns_when_it_is_back(net: Network,
                                                                                   strategy: Strategy) -> None:
    await net.start_sim("a")
    await net.start_sim("b")
    await net.run(Route(id="a", port=net.ports["a"], priority=1, strategy=strategy),
                  Route(id="b", port=net.ports["b"], priority=2, strategy=strategy))
    up, down = RouteStatus.UP, RouteStatus.DOWN
    await net.wait_status({"a": up, "b": up})
    assert await net.carried(await net.send(30)) == {"a": 30, "b": 0}

    await net.stop_sim("a")  # the SMSC goes away: binds drop, the heartbeat says down
    await net.wait_status({"a": down, "b": up})
    assert await net.carried(await net.send(30)) == {"a": 0, "b": 30}

    await net.start_sim("a")  # back on the same port: the connector rebinds
    await net.wait_status({"a": up, "b": up})
    assert await net.carried(await net.send(30)) == {"a": 30, "b": 0}


async def test_smart_balances_by_weight_and_fails_over_only_when_a_whole_level_is_down(net: Network) -> None:
    for name in ("a", "b", "c"):
        await net.start_sim(name)
    smart = Strategy.SMART
    await net.run(Route(id="a", port=net.ports["a"], priority=1, weight=3, strategy=smart),
                  Route(id="b", port=net.ports["b"], priority=1, weight=1, strategy=smart),
                  Route(id="c", port=net.ports["c"], priority=2, weight=1, strategy=smart))
    up, down = RouteStatus.UP, RouteStatus.DOWN
    await net.wait_status({"a": up, "b": up, "c": up})
    split = await net.carried(await net.send(400))
    # 3:1 by weight: a expects 300 (standard deviation about 9); the lower level gets nothing.
    assert split["c"] == 0 and 250 <= split["a"] <= 350 and split["a"] + split["b"] == 400, split

    await net.stop_sim("a")  # one route of the level down: the other one carries it all
    await net.wait_status({"a": down, "b": up, "c": up})
    assert await net.carried(await net.send(40)) == {"a": 0, "b": 40, "c": 0}

    await net.stop_sim("b")  # the whole level down: over to priority 2
    await net.wait_status({"a": down, "b": down, "c": up})
    assert await net.carried(await net.send(40)) == {"a": 0, "b": 0, "c": 40}

    await net.start_sim("a")
    await net.start_sim("b")
    await net.wait_status({"a": up, "b": up, "c": up})
    split = await net.carried(await net.send(200))
    assert split["c"] == 0 and split["a"] > split["b"] > 0, split


# ---- BUSY (status set directly: the simulator cannot hold a window full on demand) -------------------

async def _route_with_status(mongo_db: AsyncDatabase, statuses: dict[str, RouteStatus], *routes: Route,
                             n: int = 50) -> Counter[str]:
    """Route `n` messages with the router alone, the route statuses set as given; the routes they got."""
    store, routes_store = EventStore(mongo_db), RouteStore(mongo_db)
    await store.ensure_indexes()
    now = utcnow()
    for r in routes:
        await routes_store.upsert(r, actor="test", now=now)
    for rid, status in statuses.items():
        await routes_store.set_status(rid, status, now)
    items = [accepted("acme", now, to=f"+49151{i:07d}") for i in range(n)]
    await store.accept([w for _, w in items])
    router = Router(store, routes_store, utcnow, batch_size=100, rng=random.Random(3))
    while await router.step():
        pass
    return Counter([e["route_id"] async for e in mongo_db["events"].find({"type": "routed"})])


@pytest.mark.parametrize(("strategy", "expected"), [
    (Strategy.LOAD_BALANCE, {"b": 50}),  # next route when the current one is BUSY
    (Strategy.FAILOVER, {"a": 50}),  # stays on the highest priority unless it is DOWN
])
async def test_a_busy_route(mongo_db: AsyncDatabase, strategy: Strategy, expected: dict[str, int]) -> None:
    routed = await _route_with_status(mongo_db, {"a": RouteStatus.BUSY, "b": RouteStatus.UP},
                                      Route(id="a", priority=1, strategy=strategy),
                                      Route(id="b", priority=2, strategy=strategy))
    assert routed == expected


async def test_load_balance_stays_on_a_busy_route_when_the_others_are_down(mongo_db: AsyncDatabase) -> None:
    routed = await _route_with_status(mongo_db, {"a": RouteStatus.BUSY, "b": RouteStatus.DOWN},
                                      Route(id="a", priority=1, strategy=Strategy.LOAD_BALANCE),
                                      Route(id="b", priority=2, strategy=Strategy.LOAD_BALANCE))
    assert routed == {"a": 50}


async def test_smart_prefers_the_free_route_of_a_level_over_a_busy_one(mongo_db: AsyncDatabase) -> None:
    smart = Strategy.SMART
    routed = await _route_with_status(mongo_db, {"a": RouteStatus.BUSY, "b": RouteStatus.UP, "c": RouteStatus.UP},
                                      Route(id="a", priority=1, weight=5, strategy=smart),
                                      Route(id="b", priority=1, weight=1, strategy=smart),
                                      Route(id="c", priority=2, strategy=smart))
    assert routed == {"b": 50}


# ---- route exceptions ------------------------------------------------------------------------------

async def test_a_route_that_failed_a_message_while_up_is_not_tried_again_for_it(net: Network) -> None:
    """Route a answers every submit_sm with a temporary error (ESME_RSYSERR) while staying up: each
    message gets `retry` with exclude_route on a, then goes to b, and never back to a."""
    await net.start_sim("a", error_ratio=1.0, permanent_share=0.0, temporary_codes=[ESME_RSYSERR])
    await net.start_sim("b")
    fo = Strategy.FAILOVER
    await net.run(Route(id="a", port=net.ports["a"], priority=1, strategy=fo),
                  Route(id="b", port=net.ports["b"], priority=2, strategy=fo))
    await net.wait_status({"a": RouteStatus.UP, "b": RouteStatus.UP})
    batch = await net.send(20)
    for mid in batch.values():
        events = await net.store.load_events(mid)
        trail = [(e.type.value, e.route_id or e.data.get("route_id")) for e in events]
        assert trail == [("accepted", None), ("routed", "a"), ("retry", "a"), ("released", None), ("routed", "b"),
                         ("sent", "b"), ("delivered", "b"), ("billed", "b")], trail
        retry = events[2]
        assert retry.data["exclude_route"] is True and retry.data["error_name"] == "ESME_RSYSERR"
        state = await net.store.state(mid)
        assert state is not None and state.excluded_routes == ("a",)
    assert net.sims["a"].stats()["submit_sm"] == 20  # each message was tried on a exactly once
    assert (await net.routes.statuses(utcnow()))["a"] == RouteStatus.UP  # a failed them while up
    assert await net.routed_to(list(batch.values())) == {"a": 20, "b": 20}
    await asyncio.sleep(0.3)  # journals flush every 0.2 s
    assert net.journal("a") == []  # a journals only what it accepted: nothing
    assert sorted(j["destination"] for j in net.journal("b")) == sorted(batch)


async def fail(store: EventStore, mid: str, route_id: str, *, exclude: bool) -> None:
    """Route `route_id` gave the message back (exclude_route as given), as router and connector write
    it: `routed` on that route first unless the message is routed there already, then `retry` with its
    timer, due at once."""
    now = utcnow()
    state = await store.state(mid)
    assert state is not None
    events = []
    if not (state.state == "routed" and state.route_id == route_id):
        routed = event_doc(state, EventType.ROUTED, now, {
            "route_id": route_id, "price_per_part": 0, "currency": "EUR", "strategy": "failover",
            "message": routed_message(state)}, route_id=route_id)
        events.append(routed)
        state = evolve(state, Event.from_doc(routed))
    retry = event_doc(state, EventType.RETRY, now, {
        "route_id": route_id, "attempt": state.attempts + 1, "error_code": ESME_RSYSERR if exclude else None,
        "error_name": "ESME_RSYSERR" if exclude else "NOT_SENT", "next_at": now, "exclude_route": exclude})
    events.append(retry)
    lane = lane_of(state)
    timer = timer_doc(message_id=mid, tenant_id=state.tenant_id, topic=route_topic(lane), seq=retry["seq"],
                      due_at=now, reason="retry", lane=lane)
    result = await store.log.commit([Write(mid, events, timer=timer)])
    assert result.committed == [mid]


async def test_the_router_honours_the_exceptions_of_each_message(mongo_db: AsyncDatabase) -> None:
    """Router level, all routes UP: a message that failed on a goes to b, then (failing on b too) to c;
    one that was not sent for want of a bind (no exception) goes back to a; one that failed on every
    route tries them again rather than failing for want of a route."""
    store, routes = EventStore(mongo_db), RouteStore(mongo_db)
    await store.ensure_indexes()
    now = utcnow()
    for rid, prio in (("a", 1), ("b", 2), ("c", 3)):
        await routes.upsert(Route(id=rid, priority=prio), actor="test", now=now)
        await routes.set_status(rid, RouteStatus.UP, now)
    items = [accepted("acme", now, to=f"+49151{i:07d}") for i in range(3)]
    await store.accept([w for _, w in items])
    excluded_once, not_sent, everywhere = (e.message_id for e, _ in items)
    router = Router(store, routes, utcnow)
    timers = TimerReleaser(Timers(mongo_db), LaneBook(mongo_db), utcnow)
    assert await router.step() == 3  # all on a, the first by priority

    async def routed_last(mid: str) -> str | None:
        while await timers.step() + await router.step():
            pass
        return [e for e in await store.load_events(mid) if e.type == EventType.ROUTED][-1].route_id

    await fail(store, excluded_once, "a", exclude=True)
    await fail(store, not_sent, "a", exclude=False)
    for r in ("a", "b", "c"):
        await fail(store, everywhere, r, exclude=True)
    assert await routed_last(excluded_once) == "b"
    assert await routed_last(not_sent) == "a"
    assert await routed_last(everywhere) == "a"

    # The routed(b) event above is the router's; now b fails it too: it goes to c, never back to a.
    await fail(store, excluded_once, "b", exclude=True)
    assert await routed_last(excluded_once) == "c"
    state = await store.state(excluded_once)
    assert state is not None and state.excluded_routes == ("a", "b")


# ---- TPS -------------------------------------------------------------------------------------------

async def test_a_routes_tps_limit_holds_at_the_simulator(net: Network) -> None:
    """200 messages on a route with tps=20 and two binds: count the submit_sm per second in the
    simulator's journal. No second may carry more than the limit (+1 where the bucket's single token and
    a second boundary meet), the first second of the burst included."""
    await net.start_sim("a")
    await net.run(Route(id="a", port=net.ports["a"], tps=20, binds=2, window=50))
    await net.wait_status({"a": RouteStatus.UP})
    batch = await net.send(200)
    assert await net.carried(batch) == {"a": 200}
    per_second = sorted(Counter(j["at"][:19] for j in net.journal("a")).items())  # ("YYYY-MM-DDTHH:MM:SS", n)
    assert sum(n for _, n in per_second) == 200
    assert all(n <= 21 for _, n in per_second), per_second
    assert len(per_second) >= 200 // 21
