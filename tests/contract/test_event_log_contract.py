"""The contract of the event log's ports (core/store/ports.py), run against every adapter (see
conftest.py). Only the ports are used: what a test proves holds for MongoDB and for memory alike."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest

from core.domain.events import utcnow
from core.store.errors import CheckpointMoved, Fenced, GapInTopic
from core.store.timers import HOLD_S, timer_doc
from core.store.topics import Write, checkpoint_id, spend_updates
from tests.contract.conftest import Adapter


def ev(mid: str, seq: int, type_: str = "accepted", at: datetime | None = None, tenant: str = "acme",
       **data: Any) -> dict[str, Any]:
    """An event document (the log does not check transitions: that is the domain's job)."""
    return {"message_id": mid, "seq": seq, "type": type_, "at": at or utcnow(), "tenant_id": tenant,
            "route_id": None, "channel": "sms", "v": 1, "data": data}


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def accepted(topic: str | None = "route", n: int = 1) -> list[Write]:
    """`n` new messages' first events handed to `topic`."""
    return [Write(mid, [ev(mid, 1)], [topic]) for mid in (new_id() for _ in range(n))]


def routed(entry: dict[str, Any], topic: str = "send:r1") -> Write:
    """The next event of a read entry, handed to `topic`."""
    mid = entry["message_id"]
    return Write(mid, [ev(mid, entry["seq"] + 1, "routed")], [topic])


async def ids_at(adapter: Adapter, topic: str) -> list[str]:
    end = (await adapter.log.counters([topic]))[topic]
    return [d["message_id"] for d in await adapter.log.read(topic, 0, end)]


# ---- positions ---------------------------------------------------------------------------------

async def test_positions_are_dense_in_write_order(adapter: Adapter) -> None:
    a, b = accepted("route", 3), accepted("other", 2)
    fid = new_id()
    fact = Write(fid, [ev(fid, 1)], [None])  # a fact only: no topic, no position
    res = await adapter.log.commit([a[0], b[0], fact, a[1], b[1], a[2]])
    assert res.positions == {"route": (0, 3), "other": (0, 2)} and res.conflicts == []
    assert res.committed == [a[0].message_id, b[0].message_id, fact.message_id, a[1].message_id,
                             b[1].message_id, a[2].message_id]
    res = await adapter.log.commit(accepted("route", 2))
    assert res.positions == {"route": (3, 5)}
    assert await adapter.log.counters(["route", "other", "never"]) == {"route": 5, "other": 2, "never": 0}
    entries = await adapter.log.read("route", 0, 5)
    assert [e["pos"] for e in entries] == [0, 1, 2, 3, 4] and {e["topic"] for e in entries} == {"route"}
    assert [e["message_id"] for e in entries[:3]] == [w.message_id for w in a]
    only_fact = (await adapter.log.load_events(fact.message_id))[0]
    assert "topic" not in only_fact and "pos" not in only_fact


async def test_a_write_of_several_events_takes_positions_in_event_order(adapter: Adapter) -> None:
    mid = new_id()
    res = await adapter.log.commit([Write(mid, [ev(mid, 1), ev(mid, 2, "routed"), ev(mid, 3, "sent")],
                                          ["route", None, "route"])])
    assert res.positions == {"route": (0, 2)}
    assert [e["seq"] for e in await adapter.log.read("route", 0, 2)] == [1, 3]


async def test_concurrent_writers_keep_positions_dense_in_commit_order(adapter: Adapter) -> None:
    """Eight writers commit batches to one topic at once while a reader follows the counter: every
    position exists once, each batch holds one contiguous range in its own order, and the reader
    never meets a gap."""
    rng = random.Random(7)
    sizes = [[rng.randint(1, 8) for _ in range(6)] for _ in range(8)]
    done = asyncio.Event()
    seen: list[int] = []
    batches: list[tuple[list[str], tuple[int, int]]] = []

    async def writer(plan: list[int]) -> None:
        for n in plan:
            writes = accepted("route", n)
            res = await adapter.log.commit(writes)
            batches.append(([w.message_id for w in writes], res.positions["route"]))

    async def reader() -> None:
        cp = 0
        while True:
            finished = done.is_set()
            end = (await adapter.log.counters(["route"]))["route"]
            seen.extend(d["pos"] for d in await adapter.log.read("route", cp, end))  # GapInTopic on a hole
            cp = end
            if finished:
                return
            await asyncio.sleep(0)

    follow = asyncio.create_task(reader())
    await asyncio.gather(*(writer(p) for p in sizes))
    done.set()
    await follow
    total = sum(map(sum, sizes))
    assert seen == list(range(total))
    order = await ids_at(adapter, "route")
    assert len(order) == total
    for ids, (first, end) in batches:
        assert order[first:end] == ids


# ---- reads ---------------------------------------------------------------------------------------

async def test_read_returns_an_exact_range_and_a_range_past_the_counter_is_a_gap(adapter: Adapter) -> None:
    writes = accepted("route", 4)
    await adapter.log.commit(writes)
    got = await adapter.log.read("route", 1, 3)
    assert [(d["message_id"], d["pos"]) for d in got] == [(writes[1].message_id, 1), (writes[2].message_id, 2)]
    assert await adapter.log.read("route", 3, 3) == [] and await adapter.log.read("route", 3, 1) == []
    with pytest.raises(GapInTopic):
        await adapter.log.read("route", 2, 5)
    with pytest.raises(GapInTopic):
        await adapter.log.read("never", 0, 1)


async def test_load_events_and_load_many_return_events_by_seq(adapter: Adapter) -> None:
    mid, other = new_id(), new_id()
    await adapter.log.commit([Write(mid, [ev(mid, 1)], ["route"]), Write(other, [ev(other, 1)])])
    await adapter.log.commit([Write(mid, [ev(mid, 3, "sent")])])
    await adapter.log.commit([Write(mid, [ev(mid, 2, "routed")], ["send:r1"])])
    assert [e["seq"] for e in await adapter.log.load_events(mid)] == [1, 2, 3]
    assert await adapter.log.load_events("missing") == []
    many = await adapter.log.load_many([other, mid, "missing", mid])
    assert set(many) == {mid, other, "missing"}
    assert [e["type"] for e in many[mid]] == ["accepted", "routed", "sent"]
    assert [e["seq"] for e in many[other]] == [1] and many["missing"] == []


async def test_sent_by_smsc_ids_finds_only_sent_events(adapter: Adapter) -> None:
    a, b, c = new_id(), new_id(), new_id()
    await adapter.log.commit([
        Write(a, [ev(a, 1), ev(a, 2, "sent", smsc_message_ids=["s1", "s2"])], [None, "await:r1"]),
        Write(b, [ev(b, 1), ev(b, 2, "sent", smsc_message_ids=["s3"])], [None, "await:r1"]),
        Write(c, [ev(c, 1, "inbound", smsc_message_ids=["s4"])]),
    ])
    found = await adapter.log.sent_by_smsc_ids(["s2", "s3", "s4", "nope"])
    assert sorted((d["message_id"], d["seq"]) for d in found) == sorted([(a, 2), (b, 2)])
    assert {d["type"] for d in found} == {"sent"}
    assert await adapter.log.sent_by_smsc_ids([]) == []
    assert [d["message_id"] for d in await adapter.log.sent_by_smsc_ids(["s1", "s2"])] == [a]


# ---- checkpoints ---------------------------------------------------------------------------------

async def test_a_failed_checkpoint_move_writes_nothing(adapter: Adapter) -> None:
    """A commit that fails on one checkpoint writes nothing: no event, no position, no other
    checkpoint, no timer, no extra write."""
    await adapter.add_tenant("acme")
    await adapter.log.commit(accepted("route", 2))
    await adapter.log.commit([], moves={checkpoint_id("router", "other"): (0, 1)})
    entries = await adapter.log.read("route", 0, 2)
    writes = [routed(d) for d in entries]
    writes[0].timer = timer_doc(message_id=writes[0].message_id, tenant_id="acme", topic="route", seq=2,
                                due_at=utcnow(), reason="retry")
    with pytest.raises(CheckpointMoved) as caught:
        await adapter.log.commit(writes, moves={checkpoint_id("router", "route"): (0, 2),
                                                checkpoint_id("router", "other"): (0, 1)},
                                 extra=lambda batch: [("tenants", spend_updates({"acme": 7}, utcnow()))])
    assert caught.value.checkpoints == [checkpoint_id("router", "other")]
    assert await adapter.log.counters(["send:r1"]) == {"send:r1": 0}
    assert await adapter.log.load_checkpoints("router", ["route", "other"]) == {"route": 0, "other": 1}
    assert all(len(evs) == 1 for evs in (await adapter.log.load_many([d["message_id"] for d in entries])).values())
    assert await adapter.timers.count() == 0 and await adapter.spent("acme") == 0


async def test_checkpoints_move_with_the_commit_and_a_stale_from_is_refused(adapter: Adapter) -> None:
    cid = checkpoint_id("router", "route")
    await adapter.log.commit(accepted("route", 6))
    assert await adapter.log.load_checkpoints("router", ["route"]) == {"route": 0}
    await adapter.log.commit([], moves={cid: (0, 2)})
    for stale in [(0, 3), (1, 3), (3, 4)]:  # 0: the checkpoint exists already; others: not where it is
        with pytest.raises(CheckpointMoved):
            await adapter.log.commit(accepted("route"), moves={cid: stale})
    assert (await adapter.log.counters(["route"]))["route"] == 6
    await adapter.log.commit([], moves={cid: (2, 2), checkpoint_id("router", "x"): (9, 9)})  # no moves: no checks
    res = await adapter.log.commit(accepted("route"), moves={cid: (2, 6)})
    assert res.positions == {"route": (6, 7)}
    assert await adapter.log.load_checkpoints("router", ["route", "x"]) == {"route": 6, "x": 0}
    assert await adapter.log.load_checkpoints("connector", ["route"]) == {"route": 0}


async def test_two_consumers_racing_on_one_checkpoint_commit_once(adapter: Adapter) -> None:
    cid = checkpoint_id("router", "route")
    await adapter.log.commit(accepted("route", 4))
    entries = await adapter.log.read("route", 0, 4)
    outcomes = await asyncio.gather(
        adapter.log.commit([routed(d, "send:a") for d in entries], moves={cid: (0, 4)}),
        adapter.log.commit([routed(d, "send:b") for d in entries], moves={cid: (0, 4)}),
        return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["CheckpointMoved", "CommitResult"]
    counts = await adapter.log.counters(["send:a", "send:b"])
    assert sorted(counts.values()) == [0, 4]
    assert all(len(evs) == 2 for evs in (await adapter.log.load_many([d["message_id"] for d in entries])).values())


# ---- conflicts on (message_id, seq) --------------------------------------------------------------

async def test_a_seq_conflict_drops_only_that_message_and_the_rest_commits(adapter: Adapter) -> None:
    await adapter.log.commit(accepted("route", 5))
    entries = await adapter.log.read("route", 0, 5)
    racer = entries[2]["message_id"]
    await adapter.log.commit([Write(racer, [ev(racer, 2, "canceled")])])
    res = await adapter.log.commit([routed(d) for d in entries], moves={checkpoint_id("router", "route"): (0, 5)})
    assert res.conflicts == [racer]
    assert res.committed == [d["message_id"] for d in entries if d["message_id"] != racer]
    assert res.positions == {"send:r1": (0, 4)}
    assert await adapter.log.load_checkpoints("router", ["route"]) == {"route": 5}
    assert await ids_at(adapter, "send:r1") == res.committed
    assert [e["type"] for e in await adapter.log.load_events(racer)] == ["accepted", "canceled"]


async def test_a_message_twice_in_one_batch_conflicts_with_itself(adapter: Adapter) -> None:
    await adapter.log.commit(accepted("route", 2))
    a, b = await adapter.log.read("route", 0, 2)
    res = await adapter.log.commit([routed(a), routed(b), routed(a, "send:r2")])
    assert res.conflicts == [a["message_id"]] and res.committed == [b["message_id"]]
    assert await adapter.log.counters(["send:r1", "send:r2"]) == {"send:r1": 1, "send:r2": 0}


async def test_redecide_replaces_a_lost_message_in_the_same_commit(adapter: Adapter) -> None:
    await adapter.add_tenant("acme")
    await adapter.log.commit(accepted("route", 3))
    entries = await adapter.log.read("route", 0, 3)
    lost = entries[0]["message_id"]
    await adapter.log.commit([Write(lost, [ev(lost, 2, "expired")])])
    asked: list[list[str]] = []

    async def redecide(ids: list[str]) -> list[Write]:
        asked.append(ids)
        events = await adapter.log.load_many(ids)  # may read the log
        return [Write(m, [ev(m, events[m][-1]["seq"] + 1, "billed")], ["billing"]) for m in ids]

    res = await adapter.log.commit(
        [routed(d) for d in entries], moves={checkpoint_id("router", "route"): (0, 3)}, redecide=redecide,
        extra=lambda batch: [("tenants", spend_updates({"acme": len(batch)}, utcnow()))])
    assert asked == [[lost]] and res.conflicts == []
    assert sorted(res.committed) == sorted(d["message_id"] for d in entries)
    assert res.positions == {"send:r1": (0, 2), "billing": (0, 1)}
    assert [e["type"] for e in await adapter.log.load_events(lost)] == ["accepted", "expired", "billed"]
    assert await adapter.spent("acme") == 3  # `extra` saw the final batch, written once
    assert await adapter.log.load_checkpoints("router", ["route"]) == {"route": 3}


async def test_extra_writes_commit_with_the_batch(adapter: Adapter) -> None:
    await adapter.add_tenant("acme")
    await adapter.add_tenant("bravo")
    await adapter.log.commit(accepted("route", 2),
                             extra=lambda batch: [("tenants", spend_updates({"acme": 5, "bravo": 0}, utcnow()))])
    await adapter.log.commit([], extra=lambda batch: [("tenants", spend_updates({"acme": 2, "bravo": 1}, utcnow()))])
    assert (await adapter.spent("acme"), await adapter.spent("bravo")) == (7, 1)


# ---- owners, fencing, attempts -------------------------------------------------------------------

async def test_acquire_renew_and_expiry(adapter: Adapter) -> None:
    owners, key, now = adapter.owners, "connector|send:r1", utcnow()
    a = await owners.acquire(key, "a", now, lease_s=10)
    assert a is not None and a.epoch == 1 and a.holder == "a" and a.lease_until == now + timedelta(seconds=10)
    assert await owners.acquire(key, "b", now + timedelta(seconds=5), lease_s=10) is None  # a's lease runs
    a = await owners.renew(a, now + timedelta(seconds=5), lease_s=10)
    assert await owners.acquire(key, "b", now + timedelta(seconds=12), lease_s=10) is None  # renewed to 15
    again = await owners.acquire(key, "a", now + timedelta(seconds=12), lease_s=10)  # its own: epoch bumps
    assert again is not None and again.epoch == 2
    with pytest.raises(Fenced):
        await owners.renew(a, now + timedelta(seconds=12), lease_s=10)
    lapsed = await owners.renew(again, now + timedelta(seconds=30), lease_s=10)  # lapsed, nobody took it
    assert lapsed.epoch == 2 and lapsed.lease_until == now + timedelta(seconds=40)
    b = await owners.acquire(key, "b", now + timedelta(seconds=40), lease_s=10)  # lease_until <= now: free
    assert b is not None and b.epoch == 3 and b.fence == (key, 3)
    other = await owners.acquire("connector|send:r2", "a", now, lease_s=10)
    assert other is not None and other.epoch == 1  # owners are independent


async def test_release_frees_the_owner_at_once_and_a_stale_release_changes_nothing(adapter: Adapter) -> None:
    owners, key, now = adapter.owners, "connector|send:r1", utcnow()
    a = await owners.acquire(key, "a", now, lease_s=30)
    assert a is not None
    await owners.release(a, now)
    b = await owners.acquire(key, "b", now, lease_s=30)
    assert b is not None and b.epoch == 2
    await owners.release(a, now)  # stale: b keeps it
    assert await owners.acquire(key, "c", now, lease_s=30) is None


async def test_a_stale_owner_can_never_commit_or_attempt(adapter: Adapter) -> None:
    owners, key, now = adapter.owners, "connector|send:r1", utcnow()
    old = await owners.acquire(key, "a", now, lease_s=1)
    assert old is not None
    later = now + timedelta(seconds=2)  # a is paused past its lease; b takes over
    new = await owners.acquire(key, "b", later, lease_s=30)
    assert new is not None and new.epoch == old.epoch + 1
    await adapter.log.commit(accepted("send:r1", 2))
    entries = await adapter.log.read("send:r1", 0, 2)
    ids = [d["message_id"] for d in entries]
    moves = {checkpoint_id("connector", "send:r1"): (0, 2)}
    with pytest.raises(Fenced):
        await owners.record_attempt(old, {"send:r1": (0, 2)}, ids, later)
    with pytest.raises(Fenced):
        await adapter.log.commit([routed(d, "await:r1") for d in entries], moves=moves, fence=old.fence)
    with pytest.raises(Fenced):
        await adapter.log.commit([], moves=moves, fence=("connector|never", 1))
    assert await owners.open_attempts(key, {}) == []
    assert await adapter.log.counters(["await:r1"]) == {"await:r1": 0}
    assert await adapter.log.load_checkpoints("connector", ["send:r1"]) == {"send:r1": 0}
    await owners.record_attempt(new, {"send:r1": (0, 2)}, ids, later)
    res = await adapter.log.commit([routed(d, "await:r1") for d in entries], moves=moves, fence=new.fence)
    assert res.committed == ids and await owners.open_attempts(key, {}) == []


async def test_open_attempts_are_exactly_the_positions_past_the_checkpoint(adapter: Adapter) -> None:
    owners, key, topic, now = adapter.owners, "connector|send:r1", "send:r1", utcnow()
    own = await owners.acquire(key, "a", now, lease_s=30)
    assert own is not None
    await adapter.log.commit(accepted(topic, 6))
    entries = await adapter.log.read(topic, 0, 6)
    ids = [d["message_id"] for d in entries]
    first = await owners.record_attempt(own, {topic: (0, 3)}, ids[:3], now)
    await adapter.log.commit([], moves={checkpoint_id("connector", topic): (0, 3)}, fence=own.fence)
    second = await owners.record_attempt(own, {topic: (3, 6)}, ids[3:], now + timedelta(seconds=1))
    third = await owners.record_attempt(own, {"send:r1~c:1": (0, 1)}, ["z"], now + timedelta(seconds=2))
    # The owner dies here: the first attempt is resolved by its checkpoint; the others are open.
    open_ = await owners.open_attempts(key, {})
    assert [(a.attempt_id, a.topic, a.start, a.end, a.epoch) for a in open_][:1] == [(second, topic, 3, 6, 1)]
    assert [(a.topic, a.start, a.end) for a in open_] == [(topic, 3, 6), ("send:r1~c:1", 0, 1)]
    assert list(open_[0].message_ids) == ids[3:] and first not in {a.attempt_id for a in open_}
    # Given checkpoints are used as they are (here: part of the second attempt committed meanwhile).
    partial = await owners.open_attempts(key, {topic: 5, "send:r1~c:1": 1})
    assert [(a.topic, a.start, a.end) for a in partial] == [(topic, 5, 6)]
    assert await owners.open_attempts("connector|send:other", {}) == []
    # Housekeeping forgets only attempts resolved below the given checkpoints (a topic not given keeps
    # its attempt), sparing the newest `keep`: here the first, then the second; the third stays.
    assert await owners.forget_resolved(key, {topic: 3}, keep=0) == 1
    assert await owners.forget_resolved(key, {topic: 6, "send:r1~c:1": 1}, keep=1) == 1
    assert [a.attempt_id for a in await owners.open_attempts(key, {topic: 0})] == [third]


# ---- timers ----------------------------------------------------------------------------------------

def waiting(mid: str, due_at: datetime, *, tenant: str = "acme", lane: str = "", topic: str = "route",
            reason: str = "retry") -> Write:
    """A new message that waits on a timer (its seq 1 handed to no topic)."""
    return Write(mid, [ev(mid, 1, tenant=tenant)], [None], timer=timer_doc(
        message_id=mid, tenant_id=tenant, topic=topic, seq=1, due_at=due_at, reason=reason, lane=lane))


async def test_timers_are_released_once_into_their_topic(adapter: Adapter) -> None:
    now = utcnow()
    ids = [new_id() for _ in range(12)]
    await adapter.log.commit([waiting(m, now - timedelta(seconds=i)) for i, m in enumerate(ids)])
    await adapter.log.commit([waiting("later" + new_id(), now + timedelta(hours=1))])
    assert [t["_id"] for t in await adapter.timers.due(now, 3)] == ids[::-1][:3]  # earliest first
    results = await asyncio.gather(*(adapter.timers.release_due(now, 5, lambda t: False) for _ in range(2)),
                                   adapter.timers.release_due(now, 100, lambda t: False))
    while await adapter.timers.due(now, 100):
        results.append(await adapter.timers.release_due(now, 100, lambda t: False))
    released = [m for r in results for m in r.released]
    assert sorted(released) == sorted(ids)
    assert sorted(await ids_at(adapter, "route")) == sorted(ids)
    for m, events in (await adapter.log.load_many(ids)).items():
        assert [(e["seq"], e["type"]) for e in events] == [(1, "accepted"), (2, "released")], m
        assert events[1]["data"] == {"reason": "retry", "topic": "route"}
    assert await adapter.timers.count() == 1
    again = await adapter.timers.release_due(now, 100, lambda t: False)
    assert (again.released, again.postponed, again.obsolete) == ([], [], [])


async def test_a_suspended_tenants_timer_is_postponed_without_an_event(adapter: Adapter) -> None:
    now = utcnow()
    held, free = new_id(), new_id()
    await adapter.log.commit([waiting(held, now, tenant="bravo", reason="tenant_suspended"), waiting(free, now)])
    res = await adapter.timers.release_due(now, 10, lambda tenant: tenant == "bravo")
    assert res.postponed == [held] and res.released == [free]
    assert await adapter.timers.due(now, 10) == []
    due = await adapter.timers.due(now + timedelta(seconds=HOLD_S), 10)
    assert [(t["_id"], t["due_at"]) for t in due] == [(held, now + timedelta(seconds=HOLD_S))]
    assert [e["type"] for e in await adapter.log.load_events(held)] == ["accepted"]
    res = await adapter.timers.release_due(now + timedelta(seconds=HOLD_S), 10, lambda tenant: False)
    assert res.released == [held] and await adapter.timers.count() == 0


async def test_a_canceling_lanes_timer_is_released_even_for_a_suspended_tenant(adapter: Adapter) -> None:
    now = utcnow()
    canceled, held = new_id(), new_id()
    await adapter.log.commit([
        waiting(canceled, now, tenant="bravo", lane="c:9", topic="route~c:9", reason="tenant_suspended"),
        waiting(held, now, tenant="bravo", lane="c:10", topic="route~c:10", reason="tenant_suspended")])
    res = await adapter.timers.release_due(now, 10, lambda tenant: tenant == "bravo", canceling={"c:9"})
    assert res.released == [canceled] and res.postponed == [held]
    assert [e["type"] for e in await adapter.log.load_events(canceled)] == ["accepted", "released"]
    assert [d["message_id"] for d in await adapter.log.read("route~c:9", 0, 1)] == [canceled]


async def test_a_timer_of_a_message_that_moved_on_is_dropped(adapter: Adapter) -> None:
    now = utcnow()
    mid = new_id()
    await adapter.log.commit([waiting(mid, now)])
    await adapter.log.commit([Write(mid, [ev(mid, 2, "canceled")])])  # an operator, bypassing the timer
    res = await adapter.timers.release_due(now, 10, lambda t: False)
    assert res.obsolete == [mid] and res.released == []
    assert await adapter.timers.count() == 0
    assert [e["type"] for e in await adapter.log.load_events(mid)] == ["accepted", "canceled"]


async def test_timers_written_replaced_and_cleared_by_commits(adapter: Adapter) -> None:
    now = utcnow()
    a, b = new_id(), new_id()
    await adapter.log.commit([waiting(a, now, lane="c:1", reason="send_at"), waiting(b, now, lane="")])
    assert await adapter.timers.any_for_lane("c:1") and not await adapter.timers.any_for_lane("c:2")
    assert await adapter.timers.count({"reason": "send_at"}) == 1
    assert await adapter.timers.count({"tenant_id": "acme", "lane": ""}) == 1
    # A write's timer replaces the message's timer; clear_timer deletes it.
    moved = timer_doc(message_id=a, tenant_id="acme", topic="route~c:1", seq=2, due_at=now, reason="retry",
                      lane="c:2")
    await adapter.log.commit([Write(a, [ev(a, 2, "retry")], timer=moved), Write(b, [], clear_timer=True)])
    assert [(t["_id"], t["seq"], t["lane"]) for t in await adapter.timers.due(now, 10)] == [(a, 2, "c:2")]
    assert not await adapter.timers.any_for_lane("c:1") and await adapter.timers.count() == 1
