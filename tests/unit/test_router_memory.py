"""The router's decisions on the in-memory log (core/store/memory.py): no server, milliseconds.

What the router writes is asserted on the log itself (events, topics, checkpoints, timers), as the
integration tests do against MongoDB; the contract suite (tests/contract/) is what makes the two
logs interchangeable here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

import core.workers.router as router_module
from core.domain.events import EventType
from core.domain.fairness import Lane
from core.domain.message import event_doc, route_topic, send_topic
from core.domain.routing import Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.lanes import SHARED, LaneBook
from core.store.memory import InMemory
from core.store.routes import RouteStore
from core.store.timers import HOLD_S, timer_doc
from core.store.topics import Write, checkpoint_id
from core.workers.router import Router
from tests.support.factories import accepted

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DE = "+4915112345678"


@dataclass
class FixedBook(LaneBook):
    """Lanes, canceling lanes and suspended tenants as the test sets them (no database)."""

    async def refresh(self, force: bool = False) -> None:
        return None


class FixedRoutes:
    """The two reads the router makes of the route store."""

    def __init__(self, routes: list[Route], status: dict[str, RouteStatus]) -> None:
        self.routes = routes
        self.status = status

    async def list(self, include_disabled: bool = True) -> list[Route]:
        return [r for r in self.routes if include_disabled or r.enabled]

    async def statuses(self, now: datetime) -> dict[str, RouteStatus]:
        return dict(self.status)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class World:
    mem: InMemory
    book: FixedBook
    clock: Clock
    routes: FixedRoutes

    def router(self, **kw: Any) -> Router:
        # The router is typed for the MongoDB store; the in-memory one offers what it uses (`.log`,
        # `states`), and `book` replaces the LaneBook it would build over `store.db`.
        return Router(cast(EventStore, self.mem.store), cast(RouteStore, self.routes), self.clock,
                      book=self.book, **kw)

    async def accept(self, n: int = 1, tenant: str = "acme", **data: Any) -> list[str]:
        items = [accepted(tenant, self.clock.now, to=DE, **data) for _ in range(n)]
        await self.mem.store.accept([w for _, w in items])
        return [e.message_id for e, _ in items]

    async def types(self, mid: str) -> list[str]:
        return [e["type"] for e in await self.mem.log.load_events(mid)]

    async def topic(self, name: str) -> list[dict[str, Any]]:
        end = (await self.mem.log.counters([name]))[name]
        return await self.mem.log.read(name, 0, end)

    async def checkpoint(self, topic: str) -> int:
        return (await self.mem.log.load_checkpoints("router", [topic]))[topic]


@pytest.fixture
def world() -> World:
    routes = [Route(id="r1", prefixes=("+49",), price_per_part=5, priority=1),
              Route(id="r2", prefixes=("+49",), price_per_part=7, priority=2)]
    return World(InMemory(), FixedBook(db=cast(Any, None)), Clock(),
                 FixedRoutes(routes, {"r1": RouteStatus.UP, "r2": RouteStatus.UP}))


async def test_routes_each_lane_into_its_send_topic_and_moves_the_checkpoints(world: World) -> None:
    world.book.lanes = [Lane("c:42", "acme")]
    shared = await world.accept(3)
    campaign = await world.accept(2, campaign_id="42", priority=0)
    router = world.router()
    assert await router.step() == 5
    assert [e["message_id"] for e in await world.topic("send:r1")] == shared
    sent_c = await world.topic(send_topic("r1", "c:42"))
    assert [e["message_id"] for e in sent_c] == campaign
    doc = sent_c[0]
    assert doc["type"] == "routed" and doc["seq"] == 2 and doc["route_id"] == "r1"
    assert doc["data"]["price_per_part"] == 5 and doc["data"]["message"]["to"] == DE
    assert doc["data"]["message"]["attempt"] == 0 and doc["data"]["message"]["campaign_id"] == "42"
    assert (await world.checkpoint("route"), await world.checkpoint("route~c:42")) == (3, 2)
    assert router.routed == 5 and await router.step() == 0


async def test_the_shared_scope_leaves_bulk_lanes_alone(world: World) -> None:
    world.book.lanes = [Lane("c:42", "acme")]
    shared = await world.accept(2)
    await world.accept(2, campaign_id="42", priority=0)
    assert await world.router(scope=SHARED).step() == 2
    assert [e["message_id"] for e in await world.topic("send:r1")] == shared
    assert await world.checkpoint("route~c:42") == 0


async def test_a_message_past_its_validity_expires_instead_of_routing(world: World) -> None:
    [old] = await world.accept(validity_s=60)
    world.clock.now = T0 + timedelta(seconds=61)
    [fresh] = await world.accept(validity_s=60)
    await world.router().step()
    assert await world.types(old) == ["accepted", "expired"]
    assert await world.types(fresh) == ["accepted", "routed"]
    assert await world.checkpoint("route") == 2


async def test_no_route_fails_the_message(world: World) -> None:
    items = [accepted("acme", T0, to="+3312345678")]
    await world.mem.store.accept([w for _, w in items])
    await world.router().step()
    [_, failed] = await world.mem.log.load_events(items[0][0].message_id)
    assert failed["type"] == "failed" and failed["data"]["error_name"] == "NO_ROUTE" and "topic" not in failed


async def retry_later(world: World, mid: str, attempt: int) -> None:
    """What a connector does on a temporary failure after the router's `routed`: a `retry` (no
    topic) and a timer back into the message's route topic."""
    state = await world.mem.store.state(mid)
    assert state is not None and state.state == "routed"
    doc = event_doc(state, EventType.RETRY, world.clock.now,
                    {"attempt": attempt, "exclude_route": True, "error_name": "ESME_RTHROTTLED"})
    await world.mem.log.commit([Write(mid, [doc], timer=timer_doc(
        message_id=mid, tenant_id=state.tenant_id, topic=route_topic(""), seq=doc["seq"],
        due_at=world.clock.now + timedelta(seconds=10), reason="retry"))])


async def release(world: World, at: datetime) -> list[str]:
    res = await world.mem.timers.release_due(at, 100, lambda tenant: tenant in world.book.suspended,
                                             canceling=world.book.canceling)
    return res.released


async def test_a_retry_comes_back_through_its_timer_and_avoids_the_failed_route(world: World) -> None:
    router = world.router(max_attempts=3)
    [mid] = await world.accept()
    await router.step()
    await retry_later(world, mid, attempt=1)
    assert await release(world, T0) == []  # not due yet
    assert await release(world, T0 + timedelta(seconds=10)) == [mid]
    assert await router.step() == 1
    assert await world.types(mid) == ["accepted", "routed", "retry", "released", "routed"]
    [again] = await world.topic("send:r2")
    assert again["message_id"] == mid and again["seq"] == 5 and again["data"]["message"]["attempt"] == 1


async def test_a_message_is_dead_lettered_once_its_attempts_reach_the_maximum(world: World) -> None:
    router = world.router(max_attempts=2)
    [mid] = await world.accept()
    await router.step()
    await retry_later(world, mid, attempt=2)
    await release(world, T0 + timedelta(seconds=10))
    await router.step()
    events = await world.mem.log.load_events(mid)
    assert [e["type"] for e in events] == ["accepted", "routed", "retry", "released", "dead_lettered"]
    assert events[-1]["data"]["attempts"] == 2 and "topic" not in events[-1]
    assert await world.checkpoint("route") == 2


async def test_a_canceling_lane_cancels_what_it_reads(world: World) -> None:
    world.book.lanes = [Lane("c:7", "acme")]
    world.book.canceling = frozenset({"c:7"})
    ids = await world.accept(3, campaign_id="7", priority=0)
    router = world.router()
    assert await router.step() == 3
    for mid in ids:
        [_, canceled] = await world.mem.log.load_events(mid)
        assert canceled["type"] == "canceled" and canceled["data"]["attempted"] is False
    assert await world.topic(send_topic("r1", "c:7")) == [] and router.canceled == 3
    assert await world.checkpoint("route~c:7") == 3


async def test_a_suspended_tenants_message_waits_on_a_timer_and_comes_back(world: World) -> None:
    world.book.suspended = frozenset({"bravo"})
    [held] = await world.accept(tenant="bravo")
    [other] = await world.accept(tenant="acme")
    router = world.router()
    assert await router.step() == 2
    assert await world.types(held) == ["accepted"] and router.held == 1
    assert await world.types(other) == ["accepted", "routed"]
    assert await world.mem.timers.count({"tenant_id": "bravo", "reason": "tenant_suspended"}) == 1
    assert await world.checkpoint("route") == 2
    # While the tenant stays suspended the scheduler postpones the timer; afterwards it is released.
    assert await release(world, T0 + timedelta(seconds=HOLD_S)) == []
    world.book.suspended = frozenset()
    assert await release(world, T0 + timedelta(seconds=2 * HOLD_S)) == [held]
    await router.step()
    assert await world.types(held) == ["accepted", "released", "routed"]
    assert await world.mem.timers.count() == 0


async def test_a_suspended_tenants_held_campaign_message_is_canceled_when_the_campaign_is(world: World) -> None:
    world.book.lanes = [Lane("c:7", "bravo")]
    world.book.suspended = frozenset({"bravo"})
    [mid] = await world.accept(tenant="bravo", campaign_id="7", priority=0)
    router = world.router()
    assert await router.step() == 1 and router.held == 1
    # The campaign is canceled while its tenant is still suspended: the held message is released
    # into its lane's topic at the next due time, and the router cancels it there.
    world.book.canceling = frozenset({"c:7"})
    assert await release(world, T0 + timedelta(seconds=HOLD_S)) == [mid]
    await router.step()
    assert await world.types(mid) == ["accepted", "released", "canceled"]
    assert await world.mem.timers.count() == 0


async def test_a_message_that_moved_on_meanwhile_is_left_alone(world: World) -> None:
    [mid, ok] = await world.accept(2)
    state = await world.mem.store.state(mid)
    assert state is not None
    # An operator cancels it after it was accepted and before the router commits its decision.
    await world.mem.log.commit([Write(mid, [event_doc(state, EventType.CANCELED, T0, {"reason": "x"})])])
    await world.router().step()
    assert await world.types(mid) == ["accepted", "canceled"]
    assert [e["message_id"] for e in await world.topic("send:r1")] == [ok]
    assert await world.checkpoint("route") == 2


async def test_a_router_behind_another_reads_again_and_routes_nothing_twice(world: World) -> None:
    a, b = world.router(), world.router()
    first = await world.accept(3)
    await b.step()  # b's cached position: 3
    second = await world.accept(3)
    await a.step()  # a routes 3..6; b's position is now stale
    third = await world.accept(2)
    await b.step()  # b reads [3, 5) again: its commit finds the checkpoint moved, writes nothing
    assert [e["message_id"] for e in await world.topic("send:r1")] == first + second
    await b.step()  # from the checkpoint this time
    assert [e["message_id"] for e in await world.topic("send:r1")] == first + second + third
    assert await world.checkpoint("route") == 8


async def test_backpressure_holds_a_bulk_lane_while_its_send_topics_are_full(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(router_module, "BACKLOG_MAX", 3)
    world.book.lanes = [Lane("c:1", "acme")]
    router = world.router()
    await world.accept(4, campaign_id="1", priority=0)
    assert await router.step() == 4
    more = await world.accept(2, campaign_id="1", priority=0)
    router._backlog_checked = float("-inf")
    assert await router.step() == 0  # 4 wait for the connector
    topic = send_topic("r1", "c:1")
    await world.mem.log.commit([], moves={checkpoint_id("connector", topic): (0, 4)})
    router._backlog_checked = float("-inf")
    assert await router.step() == 2
    assert [e["message_id"] for e in await world.topic(topic)][4:] == more
