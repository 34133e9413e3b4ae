"""Timers and receipt expiry on the log (real MongoDB-wire server).

- Timers (retry back-off, `send_at`, a suspended tenant's hold) are released exactly once, even by
  two releasers racing, never before they are due, and a suspended tenant's are postponed until the
  tenant is active again.
- The expirer reads `await:<route>` in order while entries are due, writes `expired` + `billed` only
  for messages still waiting on that `sent`, moves its checkpoint in the same commit, and a receipt
  racing it is never billed twice: one wins on the unique (message_id, seq) index, the other records
  what still fits.

The receipt side is written here as the connector writes it (docs/DESIGN.md, "Receipt"): delivered
and billed in one commit with the tenant's spend, refolded on a conflict.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import EventType, utcnow
from core.domain.message import (
    MessageState,
    await_topic,
    event_doc,
    routed_message,
    state_of_accepted,
    state_of_routed,
)
from core.domain.pricing import price_message
from core.domain.routing import Route
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from core.store.timers import HOLD_S, Timers
from core.store.topics import Write, checkpoint_id, spend_updates
from core.workers.expiry import CONSUMER, Expirer
from core.workers.timers import TimerReleaser
from tests.support.factories import accepted

ROUTE = "r1"
PARTS, PRICE = 2, 3
AMOUNT = price_message(PARTS, PRICE)


class Clock:
    """A clock the test moves."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest_asyncio.fixture(loop_scope="session")
async def store(mongo_db: AsyncDatabase) -> EventStore:
    s = EventStore(mongo_db)
    await s.ensure_indexes()
    await RouteStore(mongo_db).upsert(Route(id=ROUTE, port=1), actor="test", now=utcnow())
    await mongo_db["tenants"].insert_one({"_id": "acme", "name": "Acme", "status": "active", "spent_minor": 0})
    return s


async def event_types(store: EventStore, message_id: str) -> list[str]:
    return [e.type.value for e in await store.load_events(message_id)]


async def spent(db: AsyncDatabase, tenant: str = "acme") -> int:
    return int((await db["tenants"].find_one({"_id": tenant}) or {}).get("spent_minor", 0))


# ---- receipt expiry --------------------------------------------------------------------------------

async def sent_message(store: EventStore, now: datetime, expires_at: datetime) -> str:
    """A message accepted, routed and sent on ROUTE, its `sent` event in `await:r1`."""
    event, write = accepted("acme", now, parts=PARTS)
    await store.accept([write])
    state = state_of_accepted(event.to_doc())
    routed = event_doc(state, EventType.ROUTED, now, {"route_id": ROUTE, "price_per_part": PRICE, "currency": "EUR",
                                                      "strategy": "failover", "message": routed_message(state)},
                       route_id=ROUTE)
    sent = event_doc(state_of_routed(routed), EventType.SENT, now, {
        "route_id": ROUTE, "smsc_message_ids": [f"s-{event.message_id}-{i}" for i in range(PARTS)], "attempt": 1,
        "parts": PARTS, "price_per_part": PRICE, "currency": "EUR", "expires_at": expires_at}, route_id=ROUTE)
    result = await store.log.commit([Write(event.message_id, [routed, sent], [None, await_topic(ROUTE)])])
    assert result.committed == [event.message_id]
    return event.message_id


def _receipt_events(state: MessageState, now: datetime) -> list[dict[str, Any]]:
    """What a DELIVRD receipt records: delivered + billed for a sent message; delivered alone after
    `expired` (already billed); nothing once a final receipt is in."""
    data = {"route_id": ROUTE, "smsc_message_id": state.smsc_message_ids[0] if state.smsc_message_ids else None,
            "stat": "DELIVRD", "err": "000", "done_at": now}
    if state.state == "expired":
        return [event_doc(state, EventType.DELIVERED, now, data)]
    if state.state != "sent":
        return []
    delivered = event_doc(state, EventType.DELIVERED, now, data)
    after = replace(state, state="delivered", version=state.version + 1)
    billed = event_doc(after, EventType.BILLED, now, {"route_id": ROUTE, "parts": PARTS, "price_per_part": PRICE,
                                                      "amount": AMOUNT, "currency": "EUR"})
    return [delivered, billed]


async def receipt(store: EventStore, message_id: str, now: datetime,
                  decided_on: MessageState | None = None) -> list[str]:
    """The receipt's commit, decided on `decided_on` (default: the current fold) and refolded on a
    seq conflict; the ids committed."""

    async def refold(ids: list[str]) -> list[Write]:
        states = await store.states(ids)
        return [Write(m, docs) for m in ids if (docs := _receipt_events(states[m], now))]

    def spend(batch: Any) -> list[tuple[str, list[Any]]]:
        total: Counter[str] = Counter()
        for w in batch:
            for e in w.events:
                if e["type"] == "billed":
                    total[e["tenant_id"]] += e["data"]["amount"]
        return [("tenants", spend_updates(dict(total), now))]

    state = decided_on or await store.state(message_id)
    assert state is not None
    result = await store.log.commit([Write(message_id, _receipt_events(state, now))], extra=spend, redecide=refold)
    return result.committed


async def test_expirer_bills_only_messages_still_waiting_and_moves_its_checkpoint(
        store: EventStore, mongo_db: AsyncDatabase) -> None:
    t0 = utcnow()
    due = [await sent_message(store, t0, t0 - timedelta(seconds=1)) for _ in range(3)]
    later = await sent_message(store, t0, t0 + timedelta(hours=1))
    behind = await sent_message(store, t0, t0 - timedelta(seconds=1))  # due, but behind `later`
    assert await receipt(store, due[1], t0) == [due[1]]  # its receipt came in time
    clock = Clock(t0)
    expirer = Expirer(store, RouteStore(mongo_db), clock, batch_size=100)

    assert await expirer.step() == 3  # the three due entries, up to the first one still waiting
    cid = checkpoint_id(CONSUMER, await_topic(ROUTE))
    assert (await mongo_db["checkpoints"].find_one({"_id": cid}))["pos"] == 3
    for mid in (due[0], due[2]):
        assert await event_types(store, mid) == ["accepted", "routed", "sent", "expired", "billed"]
        billed = (await store.load_events(mid))[-1]
        assert (billed.seq, billed.data["amount"], billed.data["parts"]) == (5, AMOUNT, PARTS)
    assert await event_types(store, due[1]) == ["accepted", "routed", "sent", "delivered", "billed"]
    assert await event_types(store, behind) == ["accepted", "routed", "sent"]
    assert await spent(mongo_db) == 3 * AMOUNT  # two expiries and one receipt, each billed once
    assert expirer.expired == 2

    assert await expirer.step() == 0  # `later` holds the topic: nothing read, nothing written
    clock.now = t0 + timedelta(hours=1, seconds=1)
    assert await expirer.step() == 2
    assert (await mongo_db["checkpoints"].find_one({"_id": cid}))["pos"] == 5
    for mid in (later, behind):
        assert await event_types(store, mid) == ["accepted", "routed", "sent", "expired", "billed"]
    assert await spent(mongo_db) == 5 * AMOUNT
    assert await expirer.step() == 0


async def test_a_receipt_after_the_expiry_is_recorded_and_not_billed_again(
        store: EventStore, mongo_db: AsyncDatabase) -> None:
    t0 = utcnow()
    mid = await sent_message(store, t0, t0 - timedelta(seconds=1))
    stale = await store.state(mid)
    assert stale is not None and stale.state == "sent"
    assert await Expirer(store, RouteStore(mongo_db), Clock(t0)).step() == 1
    # The receipt was decided on the state before the expiry: it loses on seq 4, is refolded, and
    # records the delivery without a second bill.
    assert await receipt(store, mid, t0 + timedelta(seconds=1), decided_on=stale) == [mid]
    assert await event_types(store, mid) == ["accepted", "routed", "sent", "expired", "billed", "delivered"]
    assert await spent(mongo_db) == AMOUNT


async def test_a_receipt_racing_the_expiry_wins_and_the_expirer_writes_nothing_for_it(
        store: EventStore, mongo_db: AsyncDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    t0 = utcnow()
    raced, quiet = [await sent_message(store, t0, t0 - timedelta(seconds=1)) for _ in range(2)]
    expirer = Expirer(store, RouteStore(mongo_db), Clock(t0))
    fold = store.states

    async def states_then_receipt(ids: Any) -> dict[str, MessageState]:
        # The expirer has read the message as `sent`; the receipt commits before the expirer does.
        got = await fold(ids)
        assert await receipt(store, raced, t0) == [raced]
        return got

    monkeypatch.setattr(store, "states", states_then_receipt)
    assert await expirer.step() == 2
    monkeypatch.undo()
    assert await event_types(store, raced) == ["accepted", "routed", "sent", "delivered", "billed"]
    assert await event_types(store, quiet) == ["accepted", "routed", "sent", "expired", "billed"]
    cid = checkpoint_id(CONSUMER, await_topic(ROUTE))
    assert (await mongo_db["checkpoints"].find_one({"_id": cid}))["pos"] == 2  # moved past both
    assert await mongo_db["events"].count_documents({"type": "billed"}) == 2
    assert await spent(mongo_db) == 2 * AMOUNT
    assert expirer.expired == 1


# ---- timers ----------------------------------------------------------------------------------------

async def scheduled(store: EventStore, now: datetime, send_at: datetime, n: int = 1,
                    tenant: str = "acme") -> list[str]:
    """`n` messages accepted at `now` to be sent at `send_at`: each waits on a timer."""
    items = [accepted(tenant, now, to=f"+49151{i:07d}", send_at=send_at) for i in range(n)]
    await store.accept([w for _, w in items])
    return [e.message_id for e, _ in items]


async def released_events(db: AsyncDatabase, ids: list[str]) -> list[dict[str, Any]]:
    return [d async for d in db["events"].find({"message_id": {"$in": ids}, "type": "released"})]


async def test_two_releasers_racing_release_each_timer_exactly_once(store: EventStore, mongo_db: AsyncDatabase) -> None:
    t0 = utcnow()
    ids = await scheduled(store, t0, t0 + timedelta(seconds=30), n=60)
    assert await Timers(mongo_db).count() == 60
    clock = Clock(t0 + timedelta(seconds=31))
    releasers = [TimerReleaser(Timers(mongo_db), LaneBook(mongo_db), clock, batch_size=7) for _ in range(2)]

    await asyncio.gather(*(r.run_due() for r in releasers))

    events = await released_events(mongo_db, ids)
    assert sorted(e["message_id"] for e in events) == sorted(ids)  # each exactly once
    assert {(e["seq"], e["topic"], e["data"]["reason"]) for e in events} == {(2, "route", "send_at")}
    assert sorted(e["pos"] for e in events) == list(range(60))  # gapless in the router's topic
    assert sum(r.released for r in releasers) == 60
    assert await Timers(mongo_db).count() == 0
    assert await releasers[0].run_due() == 0


async def test_a_send_at_timer_is_released_when_due_and_not_before(store: EventStore, mongo_db: AsyncDatabase) -> None:
    t0 = utcnow()
    [mid] = await scheduled(store, t0, t0 + timedelta(seconds=60))
    assert await mongo_db["events"].count_documents({"topic": "route"}) == 0  # not handed to the router yet
    clock = Clock(t0 + timedelta(seconds=59))
    releaser = TimerReleaser(Timers(mongo_db), LaneBook(mongo_db), clock)
    assert await releaser.run_due() == 0
    assert await event_types(store, mid) == ["accepted"] and await Timers(mongo_db).count() == 1

    clock.now = t0 + timedelta(seconds=60)
    assert await releaser.run_due() == 1
    assert await event_types(store, mid) == ["accepted", "released"]
    [entry] = await store.log.read("route", 0, 1)
    assert (entry["message_id"], entry["seq"], entry["at"]) == (mid, 2, clock.now)
    assert await Timers(mongo_db).count() == 0
    state = await store.state(mid)
    assert state is not None and (state.state, state.version) == ("accepted", 2)


async def test_a_suspended_tenants_timer_is_postponed_then_released_after_resume(
        store: EventStore, mongo_db: AsyncDatabase) -> None:
    tenants = TenantStore(mongo_db)
    t0 = utcnow()
    await tenants.create("bravo", "Bravo", t0)
    await tenants.suspend("bravo", "unpaid invoice", t0)
    [mid] = await scheduled(store, t0, t0 + timedelta(seconds=1), tenant="bravo")
    clock = Clock(t0 + timedelta(seconds=2))
    releaser = TimerReleaser(Timers(mongo_db), LaneBook(mongo_db, TTL_S=0.0), clock)

    assert await releaser.run_due() == 1  # postponed, not released
    timer = await mongo_db["timers"].find_one({"_id": mid})
    assert timer is not None and timer["due_at"] == clock.now + timedelta(seconds=HOLD_S)
    assert await event_types(store, mid) == ["accepted"] and releaser.postponed == 1
    clock.now += timedelta(seconds=HOLD_S)
    assert await releaser.run_due() == 1 and releaser.postponed == 2  # still suspended: held again
    assert await event_types(store, mid) == ["accepted"]

    await tenants.resume("bravo", clock.now)
    assert await releaser.run_due() == 0  # not due yet: postponed until HOLD_S after the last look
    clock.now += timedelta(seconds=HOLD_S)
    assert await releaser.run_due() == 1
    assert await event_types(store, mid) == ["accepted", "released"] and releaser.released == 1
    assert await Timers(mongo_db).count() == 0
