"""Status webhooks against the real MongoDB-wire server and a real HTTP receiver on loopback: the
fan-out follows the change stream into jobs, the dispatcher POSTs them signed, in seq order per
message, with retries, gives up, refuses forbidden addresses at send time, and re-sends exactly an
open attempt's range after a crash between the POSTs and the commit."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import utcnow
from core.store.change_feed import ChangeFeed
from core.store.errors import CheckpointMoved
from core.store.eventstore import EventStore
from core.store.owners import Owners
from core.store.topics import EventLog, Write
from core.store.webhook_queue import NewJob, WebhookQueue, owner_key
from core.store.webhooks import Webhook, WebhookStore
from core.workers.webhooks import WebhookDispatcher
from core.workers.webhooks_dispatch import DispatchSettings, TopicDispatch
from core.workers.webhooks_fanout import FanOut
from core.workers.webhooks_send import HookSender
from tests.integration.test_webhooks_receiver import Receiver, running
from tests.support.factories import accepted
from tests.support.waiting import wait_for

FAST = DispatchSettings(backoff_base_s=0.02, backoff_cap_s=0.1, max_age_s=600, flush_s=0.5)
LATER = ["routed", "sent", "delivered"]


class Env:
    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.store, self.queue, self.owners = WebhookStore(db), WebhookQueue(db), Owners(db)
        self.events = EventStore(db)

    async def prepare(self) -> None:
        await self.events.ensure_indexes()
        await self.store.ensure_indexes()
        await self.queue.ensure_indexes()
        await self.owners.ensure_indexes()

    async def lifecycle(self, tenant: str, count: int) -> list[str]:
        """`count` messages of `tenant`, each: accepted (one transaction), then routed, sent, delivered."""
        now = utcnow()
        items = [accepted(tenant, now, to=f"+49151{i:07d}") for i in range(count)]
        await self.events.accept([w for _, w in items])
        ids = [e.message_id for e, _ in items]
        later = [Write(m, [_event(m, tenant, 2 + i, t, now) for i, t in enumerate(LATER)]) for m in ids]
        await EventLog(self.db).commit(later)
        return ids

    async def checkpoint_at_end(self, hook: Webhook) -> bool:
        start, end = (await self.queue.positions([hook.topic]))[hook.topic]
        return end > 0 and start == end

    async def jobs_hold(self, hook: Webhook) -> int:
        return sum([len(j["events"]) async for j in self.queue.jobs.find({"webhook_id": hook.id})])


def _event(message_id: str, tenant: str, seq: int, event_type: str, at: datetime) -> dict[str, Any]:
    return {"message_id": message_id, "seq": seq, "type": event_type, "at": at, "tenant_id": tenant,
            "channel": "sms", "v": 1, "data": {"route_id": "sim", "note": f"{event_type} of {message_id}"}}


@asynccontextmanager
async def fanout(env: Env) -> AsyncIterator[FanOut]:
    """The fan-out running, its start point committed (events after this are all seen)."""
    stop = asyncio.Event()
    fan = FanOut(ChangeFeed(env.db["events"]), env.store, env.queue, env.owners, utcnow, "test-fanout",
                 refresh_s=0.1, flush_s=0.05, lease_s=5)
    task = asyncio.create_task(fan.run(stop))

    async def started() -> bool:
        return (await env.queue.fanout_token())[0] is not None
    try:
        await wait_for(started, timeout_s=20)
        yield fan
    finally:
        stop.set()
        await task


@asynccontextmanager
async def dispatcher(env: Env, *, settings: DispatchSettings = FAST, allow_loopback: bool = True,
                     holder: str = "test-dispatcher", lease_s: float = 5) -> AsyncIterator[WebhookDispatcher]:
    stop = asyncio.Event()
    sender = HookSender(timeout_s=5, allow_loopback=allow_loopback)
    d = WebhookDispatcher(env.store, env.queue, env.owners, sender, utcnow, holder, settings, lease_s=lease_s,
                          refresh_s=0.1, poll_s=0.02, max_idle_s=0.1)
    task = asyncio.create_task(d.run(stop))
    try:
        yield d
    finally:
        stop.set()
        await task
        await sender.close()


@pytest.fixture
async def env(mongo_db: AsyncDatabase) -> Env:
    e = Env(mongo_db)
    await e.prepare()
    return e


def seqs_per_message(received: list[Any]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in received:
        out.setdefault(r.item["message_id"], []).append(r.item["seq"])
    return out


async def test_signed_events_of_the_tenant_arrive_once_in_seq_order(env: Env) -> None:
    with running(Receiver()) as every, running(Receiver()) as receipts:
        hook = await env.store.create("acme", every.url, ["*"], utcnow())
        only = await env.store.create("acme", receipts.url, ["delivered"], utcnow())
        every.secret, receipts.secret = hook.secret, only.secret
        async with fanout(env) as fan, dispatcher(env):
            ids = await env.lifecycle("acme", 30)
            await env.lifecycle("globex", 5)  # no webhooks: nothing for it
            await wait_for(lambda: env.checkpoint_at_end(hook))
            await wait_for(lambda: env.checkpoint_at_end(only))
        delivered, receipt_events = every.delivered(), receipts.delivered()
    assert all(r.signed for r in delivered + receipt_events)  # checked by the receiver's own HMAC code
    assert {r.item["message_id"] for r in delivered} == set(ids)
    assert all(seqs == [1, 2, 3, 4] for seqs in seqs_per_message(delivered).values())
    assert sorted(r.item["message_id"] for r in receipt_events) == sorted(ids)
    assert {r.item["type"] for r in receipt_events} == {"delivered"}
    assert all(r.header_event_id == r.event_id == f"{r.item['message_id']}:{r.item['seq']}" for r in delivered)
    assert set(delivered[0].item) == {"id", "message_id", "type", "seq", "at", "data"}
    assert delivered[0].item["data"]["to"].startswith("+49151")
    # Amortised by batches: a job holds a batch's events for one endpoint, not one per event.
    assert fan.stats["events"] == 30 * 5 and fan.stats["jobs"] < 30


async def test_a_failing_receiver_is_retried_with_order_kept_then_succeeds(env: Env) -> None:
    with running(Receiver(fail_first=2)) as receiver:
        hook = await env.store.create("acme", receiver.url, ["*"], utcnow())
        receiver.secret = hook.secret
        async with fanout(env), dispatcher(env):
            ids = await env.lifecycle("acme", 5)
            await wait_for(lambda: env.checkpoint_at_end(hook))
        received = list(receiver.received)
    # Every event: two 500s, then a 200; a message's later event never before its earlier one's success.
    assert len(received) == 5 * 4 * 3
    for seqs in seqs_per_message(received).values():
        assert seqs == sorted(seqs) and seqs == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    attempts = await env.queue.deliveries_of("acme", ids[0])
    by_seq = {s: [(a["attempt"], a["status"], a["outcome"]) for a in attempts if a["seq"] == s] for s in (1, 2, 3, 4)}
    assert all(v == [(1, 500, "failed"), (2, 500, "failed"), (3, 200, "delivered")] for v in by_seq.values())
    assert all(a["latency_ms"] >= 0 for a in attempts)
    assert await env.queue.deliveries_of("globex", ids[0]) == []  # another tenant sees nothing


async def test_a_dead_receiver_is_given_up_as_webhook_failed_and_the_topic_moves_on(env: Env) -> None:
    settings = DispatchSettings(backoff_base_s=0.05, backoff_cap_s=0.1, max_age_s=0.6, flush_s=0.2)
    with running(Receiver(always_fail=True)) as receiver:
        hook = await env.store.create("acme", receiver.url, ["accepted"], utcnow())
        async with fanout(env), dispatcher(env, settings=settings):
            ids = await env.lifecycle("acme", 3)
            await wait_for(lambda: env.checkpoint_at_end(hook))
    for m in ids:
        attempts = await env.queue.deliveries_of("acme", m)
        assert len(attempts) >= 2 and all(a["status"] == 500 for a in attempts)
        assert [a["outcome"] for a in attempts][-1] == "webhook_failed"
        assert [a["outcome"] for a in attempts][:-1] == ["failed"] * (len(attempts) - 1)


async def test_a_loopback_target_is_refused_at_send_time_when_not_allowed(env: Env) -> None:
    settings = DispatchSettings(backoff_base_s=0.05, backoff_cap_s=0.1, max_age_s=0.3)
    with running(Receiver()) as receiver:
        hook = await env.store.create("acme", receiver.url, ["accepted"], utcnow())
        async with fanout(env), dispatcher(env, settings=settings, allow_loopback=False):
            ids = await env.lifecycle("acme", 2)
            await wait_for(lambda: env.checkpoint_at_end(hook))
        assert receiver.received == []
    attempts = await env.queue.deliveries_of("acme", ids[0])
    assert attempts and all(a["status"] is None and a["error"].startswith("webhook_url_forbidden") for a in attempts)
    assert attempts[-1]["outcome"] == "webhook_failed"


async def test_a_crash_between_the_posts_and_the_commit_resends_exactly_the_open_attempt(env: Env) -> None:
    with running(Receiver()) as receiver:
        hook = await env.store.create("acme", receiver.url, ["*"], utcnow())
        receiver.secret = hook.secret
        async with fanout(env):
            ids = await env.lifecycle("acme", 10)
            await wait_for(lambda: _equals(env.jobs_hold(hook), 40))
        first = await env.owners.acquire(owner_key(hook.topic), "crashing", utcnow(), 0.3)
        assert first is not None

        async def crash() -> None:
            raise RuntimeError("killed between the POSTs and the commit")

        sender = HookSender(timeout_s=5, allow_loopback=True)
        doomed = TopicDispatch(hook, first, env.queue, sender, utcnow, FAST, asyncio.Event(),
                               asyncio.Semaphore(8), before_commit=crash)
        with pytest.raises(RuntimeError):
            await doomed.step()
        await sender.close()
        sent_before = len(receiver.delivered())
        start, counter = (await env.queue.positions([hook.topic]))[hook.topic]
        assert start == 0 < counter and sent_before == 40  # all sent, none committed
        await asyncio.sleep(0.4)  # the crashed holder's lease runs out
        async with dispatcher(env, holder="successor") as successor:
            await wait_for(lambda: env.checkpoint_at_end(hook))
        delivered = receiver.delivered()
    assert successor.stats["redelivered"] == 40  # what the open attempt covered, counted
    counts: dict[str, int] = {}
    for r in delivered:
        counts[r.event_id] = counts.get(r.event_id, 0) + 1
    assert len(counts) == 40 and set(counts.values()) == {2}  # at least once: each exactly twice here
    assert {r.item["message_id"] for r in delivered} == set(ids)
    records = await env.queue.deliveries.find({"webhook_id": hook.id}).to_list(None)
    # Only the successor committed (the crashed owner may have flushed attempts, never moved anything).
    assert {r["epoch"] for r in records if r["final"]} == {2}


async def test_fanout_commit_is_compare_and_set_on_its_token(env: Env) -> None:
    now = utcnow()
    jobs = [NewJob("wh_x", "acme", [{"id": "M:1", "message_id": "M", "seq": 1, "type": "accepted", "at": "t",
                                     "data": {}}])]
    assert await env.queue.commit_fanout(jobs, '{"_data": "a"}', 0, now) == 3  # token, counter, job
    with pytest.raises(CheckpointMoved):
        await env.queue.commit_fanout(jobs, '{"_data": "b"}', 0, now)  # a second copy that read the same
    with pytest.raises(CheckpointMoved):
        await env.queue.commit_fanout(jobs, '{"_data": "b"}', 5, now)
    await env.queue.commit_fanout(jobs, '{"_data": "b"}', 1, now)
    assert [j["pos"] async for j in env.queue.jobs.find({"topic": "hook:wh_x"}).sort("pos", 1)] == [0, 1]
    assert await env.queue.fanout_token() == ('{"_data": "b"}', 2)


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def test_a_hanging_endpoint_delays_only_its_own_topic(env: Env) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await asyncio.Event().wait()  # reads the POST and never answers

    hang = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = hang.sockets[0].getsockname()[1]
    try:
        with running(Receiver()) as receiver:
            stuck = await env.store.create("acme", f"http://127.0.0.1:{port}/h", ["*"], utcnow())
            healthy = await env.store.create("acme", receiver.url, ["*"], utcnow())
            async with fanout(env), dispatcher(env):
                ids = await env.lifecycle("acme", 20)
                await wait_for(lambda: env.checkpoint_at_end(healthy))
                stuck_start, stuck_end = (await env.queue.positions([stuck.topic]))[stuck.topic]
            assert {r.item["message_id"] for r in receiver.delivered()} == set(ids)
        assert stuck_start == 0 < stuck_end  # still on its first batch, waiting for answers
    finally:
        hang.close()


async def test_without_registrations_the_fanout_reads_no_stream_and_a_new_endpoint_gets_only_later_events(
        env: Env) -> None:
    stop = asyncio.Event()
    fan = FanOut(ChangeFeed(env.db["events"]), env.store, env.queue, env.owners, utcnow, "test-fanout",
                 refresh_s=0.1, flush_s=0.05, lease_s=5)
    task = asyncio.create_task(fan.run(stop))
    try:
        before = await env.lifecycle("acme", 3)  # nobody registered: no stream, no jobs
        await asyncio.sleep(0.3)
        assert fan.following is False and fan.stats["events"] == 0
        with running(Receiver()) as receiver:
            hook = await env.store.create("acme", receiver.url, ["*"], utcnow())
            receiver.secret = hook.secret
            async with dispatcher(env):
                await wait_for(lambda: _is(fan.following))
                after = await env.lifecycle("acme", 3)
                await wait_for(lambda: _equals(env.jobs_hold(hook), 3 * 4))
                await wait_for(lambda: env.checkpoint_at_end(hook))
            got = {r.item["message_id"] for r in receiver.delivered()}
        assert got == set(after) and not got & set(before)
    finally:
        stop.set()
        await task


async def _is(value: bool) -> bool:
    return value


async def test_retention_removes_delivered_jobs_and_old_records_but_never_what_is_still_to_send(env: Env) -> None:
    with running(Receiver()) as receiver:
        hook = await env.store.create("acme", receiver.url, ["*"], utcnow())
        receiver.secret = hook.secret
        async with fanout(env), dispatcher(env):
            await env.lifecycle("acme", 5)
            await wait_for(lambda: env.checkpoint_at_end(hook))
    start, end = (await env.queue.positions([hook.topic]))[hook.topic]
    assert start == end > 0
    # One more job, not yet delivered (at the checkpoint): old, but never removed.
    await env.queue.commit_fanout([NewJob(hook.id, "acme", [{"message_id": "m", "seq": 1}])], '{"_data": "x"}',
                                  (await env.queue.fanout_token())[1], utcnow())
    long_ago = utcnow() - timedelta(days=40)
    await env.db["webhook_jobs"].update_many({}, {"$set": {"created_at": long_ago}})
    await env.db["webhook_deliveries"].update_many({}, {"$set": {"at": long_ago}})
    records = await env.db["webhook_deliveries"].count_documents({"webhook_id": hook.id})
    jobs, removed = await env.queue.purge(hook.id, start, utcnow() - timedelta(days=7), utcnow() - timedelta(days=30))
    assert (jobs, removed) == (end, records) and records > 0
    left = [d["pos"] async for d in env.db["webhook_jobs"].find({"webhook_id": hook.id})]
    assert left == [end]  # the job still to send
