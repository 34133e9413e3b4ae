"""Outcomes reported to a topic: a message submitted with `notify` carries it on every event, and
each of its final events takes a position in that topic (what the SMPP server's receipts consumer
reads by position); other messages' outcomes go to no topic."""

from __future__ import annotations

from typing import Any, cast

from core.domain.events import Event, EventType, utcnow
from core.domain.message import NOTIFY_TYPES, event_doc, fold, state_of_accepted
from core.domain.routing import Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.memory import InMemory
from core.store.routes import RouteStore
from core.store.submission import Submission, accepted
from core.store.topics import Write
from core.workers.router import Router
from tests.unit.test_router_memory import Clock, FixedBook, FixedRoutes

DLR = "dlr:acc1"


def _submitted(mid: str, notify: str | None) -> Write:
    return accepted(mid, "acme", Submission(to="+4915112345678", sender="acme", text="hi", encoding="gsm7", parts=1,
                                            notify=notify), utcnow())


def test_notify_is_carried_by_the_state_and_every_following_event() -> None:
    w = _submitted("m1", DLR)
    doc = w.events[0]
    assert doc["notify"] == DLR and w.topics == ["route"]  # the accepted event keeps its stage topic
    state = state_of_accepted(doc)
    assert state.notify == DLR and fold([Event.from_doc(doc)]) == state
    failed = event_doc(state, EventType.FAILED, utcnow(), {"reason": "x"})
    assert failed["notify"] == DLR
    assert Write("m1", [failed]).topics == [DLR]
    assert "notify" not in _submitted("m2", None).events[0]


def test_only_outcomes_are_handed_to_the_notify_topic() -> None:
    state = state_of_accepted(_submitted("m3", DLR).events[0])
    routed = event_doc(state, EventType.ROUTED, utcnow(), {"route_id": "r1"})
    assert Write("m3", [routed]).topics == [None]
    assert Write("m3", [routed], ["send:r1"]).topics == ["send:r1"]  # an explicit topic wins
    assert {"delivered", "undelivered", "expired", "failed", "rejected", "canceled"} <= NOTIFY_TYPES


async def test_an_outcome_decided_by_the_router_lands_in_the_notify_topic() -> None:
    mem = InMemory()
    routes = FixedRoutes([Route(id="r1", prefixes=("+44",))], {"r1": RouteStatus.UP})  # no route for +49
    router = Router(cast(EventStore, mem.store), cast(RouteStore, routes), Clock(),
                    book=FixedBook(db=cast(Any, None)))
    await mem.store.accept([_submitted("m4", DLR), _submitted("m5", None)])
    assert await router.step() == 2
    assert (await mem.log.counters([DLR]))[DLR] == 1
    [reported] = await mem.log.read(DLR, 0, 1)
    assert (reported["message_id"], reported["type"], reported["pos"]) == ("m4", "failed", 0)
