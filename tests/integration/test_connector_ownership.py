"""One owner per route: the connector sends only while it owns `connector|send:<route>`, and its
commits are fenced by the owner's epoch.

- Two connectors of one route, the first paused between its submits and its commit while the second
  takes the route over (its clock says the first one's lease ran out): the stale one is Fenced,
  nothing of its batch lands; the new owner resends exactly that batch as possible duplicates.
- An owner whose renewals fail stops at its local lease deadline and drops its batch; a store
  outage shorter than the lease only delays the commit (outcomes wait in memory, nothing resent).
- A crash between the attempt and the commit: the next owner resends exactly the attempted messages
  marked possible_duplicate (policy resend), or appends `unknown` for them (policy hold); the others
  are sent normally.
- A campaign lane canceled while its messages are being sent: each message is sent exactly once or
  canceled, never both.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus, UnknownOutcomePolicy
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.lanes import ACTIVE, CANCELING, LaneStore
from core.store.routes import RouteStore
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from smsc.connector import Connector
from smsc.sim.server import Simulator
from tests.integration.test_unknown_outcome import dead_owner
from tests.support.factories import accepted
from tests.support.waiting import wait_for

KEY = "connector|send:sim"


async def setup(mongo_db: AsyncDatabase, port: int, n: int, **route: Any) -> tuple[EventStore, RouteStore, Route,
                                                                                    list[str]]:
    """Route `sim` and n messages routed to it (in its send topic)."""
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    r = Route(id="sim", port=port, **route)
    await routes.upsert(r, actor="test", now=utcnow())
    await routes.set_status("sim", RouteStatus.UP, utcnow())
    ids = await accept(store, n)
    assert await Router(store, routes, utcnow).step() == n
    return store, routes, r, ids


async def accept(store: EventStore, n: int, first: int = 0, **data: Any) -> list[str]:
    items = [accepted("acme", utcnow(), to=f"+49151{i:07d}", **data) for i in range(first, first + n)]
    await store.accept([w for _, w in items])
    return [e.message_id for e, _ in items]


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def types_of(mongo_db: AsyncDatabase, ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[tuple[int, str]]] = {m: [] for m in ids}
    async for d in mongo_db["events"].find({"message_id": {"$in": ids}}, {"message_id": 1, "seq": 1, "type": 1}):
        out[d["message_id"]].append((d["seq"], d["type"]))
    return {m: [t for _, t in sorted(v)] for m, v in out.items()}


def each_has(mongo_db: AsyncDatabase, ids: list[str], kinds: set[str]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(kinds & set(t) for t in (await types_of(mongo_db, ids)).values())
    return check


async def _is(value: bool) -> bool:
    return value


async def test_a_paused_owner_is_fenced_and_nothing_of_its_batch_lands(mongo_db: AsyncDatabase,
                                                                        simulator: Simulator,
                                                                        tmp_path: Path) -> None:
    n = 20
    store, routes, route, ids = await setup(mongo_db, simulator.port, n)
    # A: its own store handle, so its batch commit can be held at the door (a process frozen between
    # its submits and its commit). Its own system_id, so the SMSC sends its receipts to it alone.
    a_store = EventStore(mongo_db)
    gate, at_gate = asyncio.Event(), asyncio.Event()
    real_commit = a_store.log.commit

    async def frozen_commit(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("fence") is not None:
            at_gate.set()
            await gate.wait()
        return await real_commit(*args, **kwargs)

    a_store.log.commit = frozen_commit  # type: ignore[method-assign]
    a = Connector(a_store, routes, route.model_copy(update={"system_id": "stale"}), utcnow, owner="a", lease_s=30)
    # B's clock runs 40 s ahead: for B, A's 30 s lease has run out (A never noticed: it is frozen).
    b = Connector(store, routes, route, lambda: utcnow() + timedelta(seconds=40), owner="b", lease_s=30)
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    task_a = asyncio.create_task(a.run(stop_a, grace_s=2.0))
    task_b: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(at_gate.wait(), timeout=30)
        await wait_for(lambda: _is(simulator.stats()["submit_sm"] == n), timeout_s=20)
        assert a.owning

        task_b = asyncio.create_task(b.run(stop_b, grace_s=2.0))
        await wait_for(each_has(mongo_db, ids, {"billed"}), timeout_s=30)
        gate.set()  # A wakes up and commits: fenced, nothing written
        await wait_for(lambda: _is(a.stats["fenced"] == 1), timeout_s=20)
        assert not a.owning and a.stats["sent"] == 0 and a.stats["dropped_batches"] >= 1
        await asyncio.sleep(0.5)
        assert not a.owning  # a standby now: B's lease runs
    finally:
        gate.set()
        stop_a.set()
        stop_b.set()
        await asyncio.gather(task_a, *([task_b] if task_b else []))

    types = await types_of(mongo_db, ids)
    assert all(t == ["accepted", "routed", "sent", "delivered", "billed"] for t in types.values()), types
    sent = [d async for d in mongo_db["events"].find({"message_id": {"$in": ids}, "type": "sent"})]
    assert len(sent) == n and all(d["data"]["possible_duplicate"] is True for d in sent)  # B's resends
    assert b.stats["possible_duplicates"] == n and b.stats["sent"] == n
    epochs = Counter([d["epoch"] async for d in mongo_db["attempts"].find({"owner": KEY})])
    assert epochs == {1: 1, 2: 1}  # A's attempt (epoch 1) and B's (epoch 2), one per batch
    owner = await mongo_db["owners"].find_one({"_id": KEY})
    assert owner["epoch"] == 2 and owner["holder"] == "b"
    await asyncio.sleep(0.3)  # the simulator flushes its journal every 0.2 s
    assert Counter(j["destination"] for j in journal(tmp_path / "journal.jsonl")) == {
        f"49151{i:07d}": 2 for i in range(n)}  # every duplicate is by policy, counted and marked


async def test_an_owner_that_cannot_renew_stops_sending_before_its_lease_runs_out(
        mongo_db: AsyncDatabase, simulator: Simulator, tmp_path: Path) -> None:
    """The store refuses the renewals while the batch waits for its commit: the owner stops at its
    local lease deadline, drops the batch uncommitted and unbinds; owning again later (a new epoch),
    it finds its own attempt open and resends it as possible duplicates."""
    n = 10
    store, routes, route, ids = await setup(mongo_db, simulator.port, n)
    connector = Connector(store, routes, route, utcnow, owner="a", lease_s=1.0)
    real_renew, real_commit = connector.owners.renew, store.log.commit
    broken = True

    async def failing_renew(*args: Any, **kwargs: Any) -> Any:
        if broken:
            raise StoreUnavailable("renewal refused")
        return await real_renew(*args, **kwargs)

    async def stuck_first_commit(*args: Any, **kwargs: Any) -> Any:
        fence = kwargs.get("fence")
        if fence is not None and fence[1] == 1:
            await asyncio.Event().wait()  # the epoch-1 batch never gets to commit
        return await real_commit(*args, **kwargs)

    connector.owners.renew = failing_renew  # type: ignore[method-assign]
    store.log.commit = stuck_first_commit  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop, grace_s=1.0))
    try:
        await wait_for(lambda: _is(connector.stats["lease_lapsed"] == 1), timeout_s=20)
        broken = False
        await wait_for(each_has(mongo_db, ids, {"billed"}), timeout_s=30)
    finally:
        stop.set()
        await task
    assert connector.stats["acquired"] >= 2 and connector.stats["possible_duplicates"] == n
    sent = [d async for d in mongo_db["events"].find({"message_id": {"$in": ids}, "type": "sent"})]
    assert len(sent) == n and all(d["data"]["possible_duplicate"] is True for d in sent)
    await asyncio.sleep(0.3)
    assert set(Counter(j["destination"] for j in journal(tmp_path / "journal.jsonl")).values()) == {2}


async def test_outcomes_wait_in_memory_through_a_store_outage(mongo_db: AsyncDatabase, simulator: Simulator,
                                                              tmp_path: Path) -> None:
    """The batch commit fails a few times (store unavailable, shorter than the lease): the outcomes
    stay in memory and commit once it is back; nothing is sent twice."""
    n = 30
    store, routes, route, ids = await setup(mongo_db, simulator.port, n)
    connector = Connector(store, routes, route, utcnow, owner="a", lease_s=30)
    real_commit = store.log.commit
    failures = 4

    async def flaky_commit(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if kwargs.get("fence") is not None and failures > 0:
            failures -= 1
            raise StoreUnavailable("primary stepped down")
        return await real_commit(*args, **kwargs)

    store.log.commit = flaky_commit  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        await wait_for(each_has(mongo_db, ids, {"billed"}), timeout_s=30)
    finally:
        stop.set()
        await task
    assert failures == 0 and connector.stats["sent"] == n and connector.stats["possible_duplicates"] == 0
    types = await types_of(mongo_db, ids)
    assert all(t == ["accepted", "routed", "sent", "delivered", "billed"] for t in types.values())
    await asyncio.sleep(0.3)
    assert sorted(Counter(j["destination"] for j in journal(tmp_path / "journal.jsonl")).values()) == [1] * n


@pytest.mark.parametrize("policy", [UnknownOutcomePolicy.RESEND, UnknownOutcomePolicy.HOLD])
async def test_a_crash_between_attempt_and_commit_applies_the_policy_to_exactly_that_attempt(
        mongo_db: AsyncDatabase, simulator: Simulator, tmp_path: Path, policy: UnknownOutcomePolicy) -> None:
    store, routes, route, _ = await setup(mongo_db, simulator.port, 0, on_unknown_outcome=policy)
    attempted = await accept(store, 4)
    assert await Router(store, routes, utcnow).step() == 4
    assert sorted(await dead_owner(mongo_db, simulator.port, send=True)) == sorted(attempted)
    later = await accept(store, 3, first=100, text="after the crash")
    assert await Router(store, routes, utcnow).step() == 3

    stop = asyncio.Event()
    connector = Connector(store, routes, route, utcnow, owner="next")
    task = asyncio.create_task(connector.run(stop))
    try:
        await wait_for(each_has(mongo_db, later, {"billed"}), timeout_s=30)
        await wait_for(each_has(mongo_db, attempted, {"billed", "unknown"}), timeout_s=30)
    finally:
        stop.set()
        await task
    types = await types_of(mongo_db, attempted + later)
    for mid in later:
        assert types[mid] == ["accepted", "routed", "sent", "delivered", "billed"]
        assert "possible_duplicate" not in (await mongo_db["events"].find_one({"message_id": mid, "type": "sent"}))[
            "data"]
    await asyncio.sleep(0.3)
    sent_twice = [d for d, k in Counter(j["destination"] for j in journal(tmp_path / "journal.jsonl")).items()
                  if k > 1]
    if policy == UnknownOutcomePolicy.RESEND:
        for mid in attempted:
            assert types[mid] == ["accepted", "routed", "sent", "delivered", "billed"]
            sent = await mongo_db["events"].find_one({"message_id": mid, "type": "sent"})
            assert sent["data"]["possible_duplicate"] is True and sent["data"]["attempt"] == 2
        assert connector.stats["possible_duplicates"] == len(attempted)
        assert len(sent_twice) == len(attempted)  # exactly the attempted ones went out twice
    else:
        for mid in attempted:
            assert types[mid] == ["accepted", "routed", "unknown"]
        assert connector.stats["held_unknown"] == len(attempted) and connector.stats["possible_duplicates"] == 0
        assert sent_twice == []


async def test_a_lane_canceled_while_its_messages_are_sent_sends_each_once_or_cancels_it(
        mongo_db: AsyncDatabase, simulator: Simulator, tmp_path: Path) -> None:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    route = Route(id="sim", port=simulator.port, tps=100, window=10)
    await routes.upsert(route, actor="test", now=utcnow())
    await routes.set_status("sim", RouteStatus.UP, utcnow())
    lanes = LaneStore(mongo_db)
    await lanes.ensure("c:camp1", "acme", transactional=False, state=ACTIVE, now=utcnow(), campaign_id="camp1")
    n = 400
    ids = await accept(store, n, campaign_id="camp1", priority=0)

    stop = asyncio.Event()
    connector = Connector(store, routes, route, utcnow, owner="test")
    tasks = [asyncio.create_task(run_until_stopped("router", Router(store, routes, utcnow).step, stop, 0.02)),
             asyncio.create_task(connector.run(stop))]
    try:
        await wait_for(lambda: _is(simulator.stats()["submit_sm"] >= 50), timeout_s=30)
        await lanes.set_state("c:camp1", CANCELING, utcnow())
        await wait_for(each_has(mongo_db, ids, {"billed", "canceled"}), timeout_s=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    types = await types_of(mongo_db, ids)
    sent = {m for m, t in types.items() if "sent" in t}
    canceled = {m for m, t in types.items() if "canceled" in t}
    assert sent and canceled and not sent & canceled and len(sent | canceled) == n
    assert all(t.count("sent") <= 1 and t.count("canceled") <= 1 for t in types.values())
    # Canceled by the connector (read from its send topic) or by the router (never routed).
    assert connector.stats["canceled"] > 0
    canceled_events = [d async for d in mongo_db["events"].find({"message_id": {"$in": ids}, "type": "canceled"})]
    assert all(d["data"]["attempted"] is False for d in canceled_events)  # no earlier owner's attempt was open
    await asyncio.sleep(0.3)
    destinations = Counter(j["destination"] for j in journal(tmp_path / "journal.jsonl"))
    assert sum(destinations.values()) == len(sent) and set(destinations.values()) == {1}
