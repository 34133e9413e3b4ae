"""The event log and heads against a real MongoDB-wire server: version guards, leases, batches."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from pymongo.errors import DuplicateKeyError

from core.domain.events import EventType, utcnow
from core.domain.message import evolve, fold, next_event
from core.store.eventstore import EventStore, Transition
from tests.support.factories import accepted


@pytest.fixture
async def store(mongo_db):
    s = EventStore(mongo_db)
    await s.ensure_indexes()
    return s


async def test_unique_message_seq(store: EventStore) -> None:
    now = utcnow()
    event, head = accepted("acme", now)
    await store.accept([(event, head)])
    with pytest.raises(DuplicateKeyError):
        await store.events.insert_one(event.to_doc())


async def test_concurrent_appends_to_one_message_only_one_wins_a_seq(store: EventStore) -> None:
    now = utcnow()
    event, head = accepted("acme", now)
    await store.accept([(event, head)])
    state = evolve(None, event)

    def routed_via(route: str) -> Transition:
        e = next_event(state, EventType.ROUTED, now, {"route_id": route, "price_per_part": 1, "currency": "EUR",
                                                      "strategy": "failover"}, route_id=route)
        return Transition(state.version, [e], evolve(state, e))

    results = await asyncio.gather(*(store.commit([routed_via(f"r{i}")], now) for i in range(8)))
    assert sum(len(r.committed) for r in results) == 1
    assert sum(len(r.conflicts) for r in results) == 7
    events = await store.load_events(event.message_id)
    assert [e.seq for e in events] == [1, 2]
    head_now = await store.head(event.message_id)
    assert head_now is not None and head_now["version"] == 2
    assert head_now["route_id"] == events[1].route_id
    assert fold(events) == evolve(state, events[1])


async def test_conflict_drops_only_the_stale_message_of_a_batch(store: EventStore) -> None:
    now = utcnow()
    items = [accepted("acme", now) for _ in range(5)]
    await store.accept(items)
    states = [evolve(None, e) for e, _ in items]

    def route(s, r="r1"):
        e = next_event(s, EventType.ROUTED, now, {"route_id": r, "price_per_part": 1, "currency": "EUR",
                                                  "strategy": "failover"}, route_id=r)
        return Transition(s.version, [e], evolve(s, e))

    first = await store.commit([route(states[2], "other")], now)
    assert first.committed == [states[2].message_id]
    result = await store.commit([route(s) for s in states], now)
    assert result.conflicts == [states[2].message_id]
    assert sorted(result.committed) == sorted(s.message_id for i, s in enumerate(states) if i != 2)
    assert await store.events.count_documents({}) == 5 + 5


async def test_expired_lease_is_reclaimed_and_the_old_holder_cannot_commit(store: EventStore) -> None:
    now = utcnow()
    event, _ = accepted("acme", now)
    state = evolve(None, event)
    routed = next_event(state, EventType.ROUTED, now, {"route_id": "sim", "price_per_part": 1, "currency": "EUR",
                                                       "strategy": "failover"}, route_id="sim")
    await store.accept([(event, accepted("acme", now)[1] | {"_id": event.message_id, "tenant_id": "acme"})])
    await store.commit([Transition(1, [routed], evolve(state, routed))], now)

    first = await store.claim("send:sim", now, 10, owner="c1", lease_s=30)
    assert [c.state.message_id for c in first] == [event.message_id]
    assert first[0].state.attempts == 1 and not first[0].prior_lease
    # Leased: nobody else gets it before the lease ends.
    assert await store.claim("send:sim", now + timedelta(seconds=10), 10, owner="c2", lease_s=30) == []
    later = now + timedelta(seconds=31)
    second = await store.claim("send:sim", later, 10, owner="c2", lease_s=30)
    assert [c.state.message_id for c in second] == [event.message_id]
    assert second[0].state.attempts == 2 and second[0].prior_lease

    def sent(claim, smsc_id):
        s = claim.state
        e = next_event(s, EventType.SENT, later, {"route_id": "sim", "smsc_message_ids": [smsc_id],
                                                  "attempt": s.attempts, "parts": 1})
        return Transition(s.version, [e], evolve(s, e), lease_token=claim.token)

    stale = await store.commit([sent(first[0], "old")], later)
    assert stale.conflicts == [event.message_id]
    fresh = await store.commit([sent(second[0], "new")], later)
    assert fresh.committed == [event.message_id]
    head = await store.head(event.message_id)
    assert head is not None
    assert head["smsc_ids"] == ["new"] and head["queue"] == "receipt" and head["lease_token"] is None


async def test_due_respects_send_at(store: EventStore) -> None:
    now = utcnow()
    later = now + timedelta(minutes=5)
    soon, scheduled = accepted("acme", now), accepted("acme", now, send_at=later)
    await store.accept([soon, scheduled])
    due_now = await store.due("route", now, 10)
    assert [c.state.message_id for c in due_now] == [soon[0].message_id]
    due_later = await store.due("route", later, 10)
    assert {c.state.message_id for c in due_later} == {soon[0].message_id, scheduled[0].message_id}
