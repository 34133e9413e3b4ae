"""The event log as a queue against a real MongoDB-wire server: dense positions, checkpoints,
conflicts on the unique (message_id, seq) index, owners fenced by epoch, attempts."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest
from pymongo.errors import DuplicateKeyError

from core.domain.events import EventType, utcnow
from core.domain.message import event_doc, route_topic, state_of_accepted
from core.store.errors import CheckpointMoved, Fenced
from core.store.eventstore import EventStore
from core.store.owners import Owners
from core.store.topics import EventLog, Write, checkpoint_id
from tests.support.factories import accepted


@pytest.fixture
async def store(mongo_db):
    s = EventStore(mongo_db)
    await s.ensure_indexes()
    return s


def _routed(event_doc_: dict, route: str, now) -> Write:
    state = state_of_accepted(event_doc_)
    doc = event_doc(state, EventType.ROUTED, now, {"route_id": route, "price_per_part": 1, "currency": "EUR",
                                                   "strategy": "failover"}, route_id=route)
    return Write(state.message_id, [doc], [f"send:{route}"])


async def test_unique_message_seq(store: EventStore) -> None:
    now = utcnow()
    event, write = accepted("acme", now)
    await store.accept([write])
    with pytest.raises(DuplicateKeyError):
        await store.events.insert_one(event.to_doc())


async def test_accept_hands_messages_to_the_route_topic_in_order(store: EventStore) -> None:
    now = utcnow()
    items = [accepted("acme", now) for _ in range(5)]
    await store.accept([w for _, w in items])
    assert (await store.log.counters(["route"]))["route"] == 5
    entries = await store.log.read("route", 0, 5)
    assert [e["message_id"] for e in entries] == [e.message_id for e, _ in items]
    assert [e["pos"] for e in entries] == list(range(5))


async def test_scheduled_message_waits_on_a_timer_not_in_the_topic(store: EventStore) -> None:
    now = utcnow()
    event, write = accepted("acme", now, send_at=now + timedelta(hours=1))
    await store.accept([write])
    assert (await store.log.counters(["route"]))["route"] == 0
    timer = await store.db["timers"].find_one({"_id": event.message_id})
    assert timer is not None and timer["topic"] == "route" and timer["seq"] == 1 and timer["reason"] == "send_at"


async def test_positions_stay_dense_under_concurrent_writers(store: EventStore) -> None:
    """Eight writers append batches to one topic at once while a reader follows it: every position
    0..n-1 exists once, each batch's positions follow its order, and the reader never sees a gap."""
    now = utcnow()
    rng = random.Random(7)
    sizes = [[rng.randint(1, 8) for _ in range(6)] for _ in range(8)]
    done = asyncio.Event()
    seen: list[int] = []

    async def writer(batches: list[int]) -> None:
        for n in batches:
            items = [accepted("acme", now) for _ in range(n)]
            await store.accept([w for _, w in items])
            got = [d["pos"] async for d in store.events.find(
                {"message_id": {"$in": [e.message_id for e, _ in items]}}).sort("pos", 1)]
            by_id = {d["message_id"]: d["pos"] async for d in store.events.find(
                {"message_id": {"$in": [e.message_id for e, _ in items]}})}
            assert [by_id[e.message_id] for e, _ in items] == sorted(got)

    async def reader() -> None:
        cp = 0
        while not done.is_set() or cp < (await store.log.counters(["route"]))["route"]:
            end = (await store.log.counters(["route"]))["route"]
            for d in await store.log.read("route", cp, end):  # raises GapInTopic on a hole
                seen.append(d["pos"])
            cp = end
            await asyncio.sleep(0)

    follow = asyncio.create_task(reader())
    await asyncio.gather(*(writer(b) for b in sizes))
    done.set()
    await follow
    total = sum(map(sum, sizes))
    assert (await store.log.counters(["route"]))["route"] == total
    positions = sorted([d["pos"] async for d in store.events.find({"topic": "route"}, {"pos": 1})])
    assert positions == list(range(total))
    assert seen == list(range(total))


async def test_a_crash_between_read_and_commit_leaves_nothing_and_the_range_is_read_again(store: EventStore) -> None:
    now = utcnow()
    items = [accepted("acme", now) for _ in range(4)]
    await store.accept([w for _, w in items])
    cid = checkpoint_id("router", "route")
    first = await store.log.read("route", 0, 4)
    # The first consumer decides, then dies before its commit: nothing of it is in the log.
    decided_by_dead = [_routed(d, "r1", now) for d in first]
    del decided_by_dead
    # Its successor reads the same range from the checkpoint (still 0) and commits once.
    assert (await store.log.load_checkpoints("router", ["route"]))["route"] == 0
    again = await store.log.read("route", 0, 4)
    assert [d["message_id"] for d in again] == [d["message_id"] for d in first]
    await store.log.commit([_routed(d, "r2", now) for d in again], moves={cid: (0, 4)})
    assert (await store.log.load_checkpoints("router", ["route"]))["route"] == 4
    # A late commit of the same range (a zombie) finds the checkpoint moved: nothing is written.
    with pytest.raises(CheckpointMoved):
        await store.log.commit([_routed(d, "r1", now) for d in first], moves={cid: (0, 4)})
    assert await store.events.count_documents({"type": "routed"}) == 4
    assert await store.events.count_documents({"type": "routed", "route_id": "r1"}) == 0
    assert (await store.log.counters(["send:r2", "send:r1"])) == {"send:r2": 4, "send:r1": 0}


async def test_a_seq_conflict_drops_only_that_message_and_the_checkpoint_moves(store: EventStore) -> None:
    now = utcnow()
    items = [accepted("acme", now) for _ in range(5)]
    await store.accept([w for _, w in items])
    entries = await store.log.read("route", 0, 5)
    racer = entries[2]
    # Somebody else appends seq 2 of one message first (e.g. a cancel).
    state = state_of_accepted(racer)
    await store.log.commit([Write(racer["message_id"], [event_doc(state, EventType.CANCELED, now, {"reason": "x"})])])
    result = await store.log.commit([_routed(d, "r1", now) for d in entries],
                                    moves={checkpoint_id("router", "route"): (0, 5)})
    assert result.conflicts == [racer["message_id"]]
    assert sorted(result.committed) == sorted(d["message_id"] for d in entries if d is not racer)
    assert (await store.log.load_checkpoints("router", ["route"]))["route"] == 5
    assert (await store.log.counters(["send:r1"]))["send:r1"] == 4
    assert [d["pos"] async for d in store.events.find({"topic": "send:r1"}).sort("pos", 1)] == [0, 1, 2, 3]


async def test_redecide_replaces_a_lost_message_in_the_same_commit(store: EventStore) -> None:
    now = utcnow()
    items = [accepted("acme", now) for _ in range(3)]
    await store.accept([w for _, w in items])
    entries = await store.log.read("route", 0, 3)
    state = state_of_accepted(entries[0])
    await store.log.commit([Write(state.message_id, [event_doc(state, EventType.CANCELED, now, {"reason": "x"})])])
    asked: list[list[str]] = []

    async def redecide(ids: list[str]) -> list[Write]:
        asked.append(ids)
        return []

    result = await store.log.commit([_routed(d, "r1", now) for d in entries],
                                    moves={checkpoint_id("router", "route"): (0, 3)}, redecide=redecide)
    assert asked == [[state.message_id]] and result.conflicts == []
    assert len(result.committed) == 2


async def test_a_stale_owner_can_never_commit_or_attempt(store: EventStore) -> None:
    owners = Owners(store.db)
    now = utcnow()
    old = await owners.acquire("connector|send:r1", "a", now, lease_s=1)
    assert old is not None and old.epoch == 1
    assert await owners.acquire("connector|send:r1", "b", now, lease_s=1) is None  # a's lease runs
    later = now + timedelta(seconds=2)  # a is paused past its lease; b takes over
    new = await owners.acquire("connector|send:r1", "b", later, lease_s=30)
    assert new is not None and new.epoch == 2
    items = [accepted("acme", now) for _ in range(2)]
    await store.accept([w for _, w in items])
    entries = await store.log.read("route", 0, 2)
    with pytest.raises(Fenced):
        await owners.record_attempt(old, {"route": (0, 2)}, [d["message_id"] for d in entries], later)
    with pytest.raises(Fenced):
        await store.log.commit([_routed(d, "r1", later) for d in entries],
                               moves={checkpoint_id("connector", "route"): (0, 2)}, fence=old.fence)
    with pytest.raises(Fenced):
        await owners.renew(old, later, 30)
    assert await store.events.count_documents({"type": "routed"}) == 0
    assert await store.db["attempts"].count_documents({}) == 0
    await owners.record_attempt(new, {"route": (0, 2)}, [d["message_id"] for d in entries], later)
    await store.log.commit([_routed(d, "r1", later) for d in entries],
                           moves={checkpoint_id("connector", "route"): (0, 2)}, fence=new.fence)
    assert await store.events.count_documents({"type": "routed"}) == 2


async def test_open_attempts_are_exactly_the_positions_past_the_checkpoint(store: EventStore) -> None:
    owners = Owners(store.db)
    now = utcnow()
    own = await owners.acquire("connector|send:r1", "a", now, lease_s=30)
    assert own is not None
    topic = route_topic("")
    items = [accepted("acme", now) for _ in range(6)]
    await store.accept([w for _, w in items])
    entries = await store.log.read(topic, 0, 6)
    await owners.record_attempt(own, {topic: (0, 3)}, [d["message_id"] for d in entries[:3]], now)
    await store.log.commit([], moves={checkpoint_id("connector", topic): (0, 3)}, fence=own.fence)
    await owners.record_attempt(own, {topic: (3, 6)}, [d["message_id"] for d in entries[3:]], now)
    # The owner dies here: the second attempt is past the checkpoint, the first is resolved.
    open_ = await owners.open_attempts("connector|send:r1", {})
    assert [(a.topic, a.start, a.end) for a in open_] == [(topic, 3, 6)]
    assert list(open_[0].message_ids) == [d["message_id"] for d in entries[3:]]


async def test_checkpoint_moves_are_atomic_with_the_events(store: EventStore) -> None:
    """A commit that fails on one checkpoint writes nothing at all, neither events nor the other
    checkpoint nor positions."""
    now = utcnow()
    items = [accepted("acme", now) for _ in range(2)]
    await store.accept([w for _, w in items])
    log: EventLog = store.log
    await log.commit([], moves={checkpoint_id("router", "other"): (0, 1)})
    entries = await log.read("route", 0, 2)
    with pytest.raises(CheckpointMoved):
        await log.commit([_routed(d, "r1", now) for d in entries],
                         moves={checkpoint_id("router", "route"): (0, 2), checkpoint_id("router", "other"): (0, 1)})
    assert await store.events.count_documents({"type": "routed"}) == 0
    assert (await log.counters(["send:r1"]))["send:r1"] == 0
    assert (await log.load_checkpoints("router", ["route", "other"])) == {"route": 0, "other": 1}
