"""The reporting projector against real MongoDB-wire and PostgreSQL servers (never mocked)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from projections.projector import Projector, ResumeTokenLost, UnprojectableEvent, apply_events
from projections.queries import (
    checkpoint_row,
    daily_stats_rows,
    fetch_message_events_rows,
    fetch_messages_rows,
    recount_daily_stats,
)
from projections.replay import replay_into
from projections.schema import migrate

DEADLINE_S = 30.0
# Starts just before a UTC midnight, so messages straddle two days in daily_stats.
BASE = datetime(2026, 3, 1, 23, 58, tzinfo=UTC)


# --- building a log ---------------------------------------------------------------------------------


def lifecycle(i: int, tenant: str = "t1") -> list[dict[str, Any]]:
    """Event documents of message number `i`: mostly delivered and billed, some failing."""
    mid = f"m{i:05d}-{uuid.uuid4().hex[:6]}"
    route = f"r{i % 3}"
    t = BASE + timedelta(seconds=i)
    parts = 1 + i % 3
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("accepted", {"to": f"+49151{i:07d}", "sender": "acme", "text": "hi", "encoding": "gsm7",
                      "parts": parts, "priority": 10, "validity_s": 3600, "send_at": None,
                      "campaign_id": "c1" if i % 2 else None, "client_ref": None}),
        ("routed", {"route_id": route, "price_per_part": 7, "currency": "EUR", "strategy": "smart"}),
    ]  # fmt: skip
    if i % 10 == 0:
        kinds += [
            ("retry", {"route_id": route, "attempt": 1, "error_code": 88, "error_name": "ESME_RTHROTTLED",
                       "next_at": t + timedelta(seconds=30)}),
            ("failed", {"route_id": route, "attempt": 2, "error_code": 69, "error_name": "ESME_RSUBMITFAIL",
                        "reason": "submit failed"}),
        ]  # fmt: skip
    else:
        smsc_ids = [f"s{i}-{p}" for p in range(parts)]
        receipt = "undelivered" if i % 10 == 5 else "delivered"
        kinds += [
            ("sent", {"route_id": route, "smsc_message_ids": smsc_ids, "attempt": 1, "parts": parts}),
            (receipt, {"route_id": route, "smsc_message_id": smsc_ids[0], "stat": "DELIVRD", "err": "000",
                       "done_at": t + timedelta(seconds=90)}),
            ("billed", {"route_id": route, "parts": parts, "price_per_part": 7, "amount": 7 * parts,
                        "currency": "EUR"}),
        ]  # fmt: skip
    return [
        {"message_id": mid, "seq": seq, "type": kind, "at": t + timedelta(seconds=40 * seq), "tenant_id": tenant,
         "route_id": None if kind == "accepted" else route, "channel": "sms", "v": 1, "data": data}
        for seq, (kind, data) in enumerate(kinds, start=1)
    ]  # fmt: skip


def build_log(n: int) -> list[list[dict[str, Any]]]:
    return [lifecycle(i, tenant=f"t{i % 2}") for i in range(n)]


def by_seq(streams: list[list[dict[str, Any]]], seqs: range) -> list[dict[str, Any]]:
    """Events with seq in `seqs`, interleaved across messages the way the live system writes them."""
    return [ev for seq in seqs for stream in streams for ev in stream if ev["seq"] == seq]


async def insert(events: AsyncCollection, docs: list[dict[str, Any]]) -> None:
    if docs:
        # insert_many adds `_id` to the dicts: copies keep the builders' documents clean.
        await events.insert_many([dict(d) for d in docs])


async def events_collection(db: AsyncDatabase) -> AsyncCollection:
    events = db["events"]
    await events.create_index([("message_id", ASCENDING), ("seq", ASCENDING)], unique=True)
    return events


# --- expectations computed from the log, independently of the SQL ------------------------------------


def expected_message(stream: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"billed": False, "amount_minor": None, "attempts": 0}
    first = {"accepted": "accepted_at", "routed": "routed_at", "sent": "sent_at", "delivered": "delivered_at",
             "undelivered": "delivered_at", "failed": "failed_at", "billed": "billed_at"}  # fmt: skip
    for ev in sorted(stream, key=lambda e: e["seq"]):
        row["last_seq"] = ev["seq"]
        if ev["type"] == "billed":
            row["billed"] = True
            row["amount_minor"] = ev["data"]["amount"]
        else:
            row["state"] = ev["type"]
        if ev["route_id"]:
            row["route_id"] = ev["route_id"]
        row["attempts"] = max(row["attempts"], ev["data"].get("attempt", 0))
        if ev["type"] in first:
            row.setdefault(first[ev["type"]], ev["at"])
        if ev["type"] in ("retry", "failed"):
            row["error_code"] = ev["data"]["error_code"]
    acc = stream[0]["data"]
    row.update(tenant_id=stream[0]["tenant_id"], to_number=acc["to"], campaign_id=acc["campaign_id"],
               parts=acc["parts"])  # fmt: skip
    return row


def expected_daily(docs: list[dict[str, Any]]) -> dict[tuple[Any, ...], tuple[int, int, int]]:
    counts: Counter[tuple[Any, ...]] = Counter()
    parts: Counter[tuple[Any, ...]] = Counter()
    amount: Counter[tuple[Any, ...]] = Counter()
    for ev in docs:
        key = (ev["at"].date(), ev["tenant_id"], ev["route_id"] or "", ev["channel"], ev["type"])
        counts[key] += 1
        if ev["type"] in ("accepted", "sent", "billed"):
            parts[key] += ev["data"]["parts"]
        if ev["type"] == "billed":
            amount[key] += ev["data"]["amount"]
    return {k: (counts[k], parts[k], amount[k]) for k in counts}


# --- running and waiting ------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `predicate` until true; fail after DEADLINE_S (a bound, not a performance assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def count_events(pg_url: str, schema: str) -> int:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        try:
            cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}.message_events").format(sql.Identifier(schema)))
        except psycopg.errors.UndefinedTable:
            return 0
        row = await cur.fetchone()
        return row[0] if row else 0


async def wait_following(projector: Projector, streams: int = 1) -> None:
    """Wait until `projector` has opened its `streams`-th change stream.

    Tests that count who applied what wait for this first. (Inserts that commit while a stream
    (re)opens are safe either way: the catch-up scan after each open applies what SecantusDB
    0.7.0b3 may skip then; tests/integration/test_projector_gaps.py covers that.)
    """

    async def opened() -> bool:
        return projector.stats.streams_opened >= streams

    await wait_until(opened, f"change stream #{streams} of the projector")


async def wait_projected(pg_url: str, schema: str, n: int) -> None:
    async def done() -> bool:
        return await count_events(pg_url, schema) >= n

    await wait_until(done, f"{n} events in {schema}.message_events")


@contextlib.asynccontextmanager
async def running(projector: Projector):  # type: ignore[no-untyped-def]
    """Run `projector` in a task; stop it cleanly on exit (and surface any error it raised)."""
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE_S)


def make_projector(events: AsyncCollection, pg_url: str, schema: str, **kw: Any) -> Projector:
    return Projector(events, pg_url, schema, batch_size=kw.pop("batch_size", 100), batch_wait_s=0.05, **kw)


@pytest.fixture
def second_schema(pg_schema: str, pg_url: str) -> Iterator[str]:
    """Another schema for the reference replay, dropped after the test."""
    name = f"{pg_schema}_ref"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


async def assert_same_tables(pg_url: str, schema_a: str, schema_b: str) -> None:
    assert await fetch_message_events_rows(pg_url, schema_a) == await fetch_message_events_rows(pg_url, schema_b)
    assert await fetch_messages_rows(pg_url, schema_a) == await fetch_messages_rows(pg_url, schema_b)
    assert await daily_stats_rows(pg_url, schema_a) == await daily_stats_rows(pg_url, schema_b)


# --- tests --------------------------------------------------------------------------------------------


async def test_projects_full_lifecycles(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> None:
    events = await events_collection(mongo_db)
    streams = build_log(300)
    docs = [ev for s in streams for ev in s]
    # Half the log exists before the projector starts (replayed), half arrives on the stream.
    await insert(events, by_seq(streams, range(1, 3)))
    projector = make_projector(events, pg_url, pg_schema)
    async with running(projector):
        await insert(events, by_seq(streams, range(3, 10)))
        await wait_projected(pg_url, pg_schema, len(docs))

        # The replay's scan may take in events inserted while it runs before the stream's batches
        # (duplicates by then) carry the first resume token: wait for that token, not just the rows.
        async def token_saved() -> bool:
            row = await checkpoint_row(pg_url, pg_schema)
            return row is not None and row["resume_token"] is not None

        await wait_until(token_saved, "a resume token in the checkpoint")

    audit = await fetch_message_events_rows(pg_url, pg_schema)
    assert set(audit) == {(d["message_id"], d["seq"]) for d in docs}
    sample = audit[(streams[1][0]["message_id"], 1)]
    assert sample["type"] == "accepted" and sample["data"]["to"] == streams[1][0]["data"]["to"]

    messages = await fetch_messages_rows(pg_url, pg_schema)
    assert len(messages) == len(streams)
    for stream in streams:
        want = expected_message(stream)
        got = messages[stream[0]["message_id"]]
        assert {k: got[k] for k in want} == want, stream[0]["message_id"]
    assert Counter(m["state"] for m in messages.values()) == {"delivered": 240, "undelivered": 30, "failed": 30}

    daily = await daily_stats_rows(pg_url, pg_schema)
    assert daily == expected_daily(docs)
    assert daily == await recount_daily_stats(pg_url, pg_schema)
    assert len({k[0] for k in daily}) == 2  # the log straddles midnight

    assert projector.applied == len(docs) and projector.batches >= 2
    assert projector.last_event_at == max(d["at"] for d in docs)
    checkpoint = await checkpoint_row(pg_url, pg_schema)
    assert checkpoint is not None and checkpoint["resume_token"] is not None
    assert checkpoint["events_applied"] == len(docs)


async def test_restart_mid_stream_equals_fresh_replay(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, second_schema: str
) -> None:
    events = await events_collection(mongo_db)
    streams = build_log(200)
    total = sum(len(s) for s in streams)

    first = make_projector(events, pg_url, pg_schema, batch_size=50)
    task = asyncio.create_task(first.run(asyncio.Event()))
    try:
        await insert(events, by_seq(streams, range(1, 3)))
        await wait_projected(pg_url, pg_schema, 400)
        await insert(events, by_seq(streams, range(3, 4)))
        await wait_projected(pg_url, pg_schema, 450)
    finally:
        # A crash while the stream still holds unapplied events: no stop, no goodbye; whatever
        # batch was being collected is lost.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await insert(events, by_seq(streams, range(4, 10)))

    second = make_projector(events, pg_url, pg_schema, batch_size=50)
    async with running(second):
        await wait_projected(pg_url, pg_schema, total)
        # Give it a moment to (wrongly) apply anything twice before comparing.
        await asyncio.sleep(0.3)

    await replay_into(events, pg_url, second_schema)
    assert await count_events(pg_url, second_schema) == total
    await assert_same_tables(pg_url, pg_schema, second_schema)
    assert await daily_stats_rows(pg_url, pg_schema) == await recount_daily_stats(pg_url, pg_schema)
    # In-process counters can miss a batch whose COMMIT went through just as the task was
    # cancelled; the checkpoint's counter is written in the same transaction as the rows.
    checkpoint = await checkpoint_row(pg_url, pg_schema)
    assert checkpoint is not None and checkpoint["events_applied"] == total


async def test_duplicates_and_out_of_order_change_nothing(pg_url: str, pg_schema: str) -> None:
    await migrate(pg_url, pg_schema)
    streams = build_log(20)
    head = by_seq(streams, range(1, 3))
    assert await apply_events(pg_url, pg_schema, head) == len(head)
    before = (await fetch_messages_rows(pg_url, pg_schema), await daily_stats_rows(pg_url, pg_schema))
    assert await apply_events(pg_url, pg_schema, head) == 0
    assert await apply_events(pg_url, pg_schema, head[:5] + head[:5]) == 0
    assert (await fetch_messages_rows(pg_url, pg_schema), await daily_stats_rows(pg_url, pg_schema)) == before

    # Message 1 is delivered (seq 4) before its `sent` (seq 3) arrives.
    stream = streams[1]
    mid = stream[0]["message_id"]
    assert await apply_events(pg_url, pg_schema, [stream[3]]) == 1
    assert await apply_events(pg_url, pg_schema, [stream[2], stream[2]]) == 1
    row = (await fetch_messages_rows(pg_url, pg_schema))[mid]
    assert (row["state"], row["last_seq"]) == ("delivered", 4)
    assert row["sent_at"] == stream[2]["at"]  # a late event still fills its own stage
    assert row["smsc_message_id"] == stream[3]["data"]["smsc_message_id"]

    # Billing after delivery records the bill and keeps the delivery state.
    assert await apply_events(pg_url, pg_schema, [stream[4]]) == 1
    row = (await fetch_messages_rows(pg_url, pg_schema))[mid]
    assert (row["state"], row["last_seq"], row["billed"]) == ("delivered", 5, True)
    assert row["amount_minor"] == stream[4]["data"]["amount"] and row["currency"] == "EUR"

    applied = [*head, stream[3], stream[2], stream[4]]
    assert await daily_stats_rows(pg_url, pg_schema) == expected_daily(applied)
    assert await daily_stats_rows(pg_url, pg_schema) == await recount_daily_stats(pg_url, pg_schema)


async def test_projector_ignores_events_already_applied(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> None:
    events = await events_collection(mongo_db)
    streams = build_log(30)
    docs = [ev for s in streams for ev in s]
    await migrate(pg_url, pg_schema)
    await apply_events(pg_url, pg_schema, docs[:40])  # as if an earlier run had applied them
    projector = make_projector(events, pg_url, pg_schema)
    async with running(projector):
        await insert(events, docs)
        await wait_projected(pg_url, pg_schema, len(docs))
        await asyncio.sleep(0.3)
    assert projector.applied == len(docs) - 40
    assert await daily_stats_rows(pg_url, pg_schema) == expected_daily(docs)


async def test_second_projector_stands_by_until_the_first_stops(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str
) -> None:
    events = await events_collection(mongo_db)
    streams = build_log(40)
    active = make_projector(events, pg_url, pg_schema)
    standby = make_projector(events, pg_url, pg_schema, standby_poll_s=0.1)
    stop_active = asyncio.Event()
    active_task = asyncio.create_task(active.run(stop_active))

    async def is_active() -> bool:
        return active.stats.active

    try:
        await wait_until(is_active, "the first projector to take the lock")
        await _standby_then_take_over(events, pg_url, pg_schema, streams, active, standby, stop_active, active_task)
    finally:
        stop_active.set()
        await asyncio.wait_for(active_task, DEADLINE_S)


async def _standby_then_take_over(
    events: AsyncCollection,
    pg_url: str,
    pg_schema: str,
    streams: list[list[dict[str, Any]]],
    active: Projector,
    standby: Projector,
    stop_active: asyncio.Event,
    active_task: asyncio.Task[None],
) -> None:
    async with running(standby):

        async def is_standby() -> bool:
            return standby.stats.standby

        await wait_until(is_standby, "the second projector to stand by")
        await insert(events, by_seq(streams, range(1, 4)))
        await wait_projected(pg_url, pg_schema, 120)
        assert standby.stats.standby and not standby.stats.active and standby.applied == 0

        stop_active.set()
        await asyncio.wait_for(active_task, DEADLINE_S)

        async def took_over() -> bool:
            return standby.stats.active

        await wait_until(took_over, "the standby to take over")
        await wait_following(standby)
        await insert(events, by_seq(streams, range(4, 10)))
        total = sum(len(s) for s in streams)
        await wait_projected(pg_url, pg_schema, total)
    assert active.applied == 120 and standby.applied == total - 120


async def test_reconnects_after_postgres_connection_is_killed(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str
) -> None:
    events = await events_collection(mongo_db)
    streams = build_log(50)
    total = sum(len(s) for s in streams)
    projector = make_projector(events, pg_url, pg_schema)
    async with running(projector):
        await insert(events, by_seq(streams, range(1, 3)))
        await wait_projected(pg_url, pg_schema, 100)
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = %s",
                (f"msgcore-projector reporting {pg_schema}",),
            )
            assert await cur.fetchone() == (1,)
        await wait_following(projector, streams=2)
        await insert(events, by_seq(streams, range(3, 10)))
        await wait_projected(pg_url, pg_schema, total)
        await asyncio.sleep(0.3)
    assert projector.applied == total
    assert await daily_stats_rows(pg_url, pg_schema) == expected_daily([e for s in streams for e in s])


async def test_quiet_stream_keeps_the_checkpoint_moving(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> None:
    events = await events_collection(mongo_db)
    await migrate(pg_url, pg_schema)
    projector = make_projector(events, pg_url, pg_schema, checkpoint_interval_s=0.05)
    tokens: list[Any] = []

    async def token_moved() -> bool:
        # Writes elsewhere in the database move the stream's postBatchResumeToken, not its events.
        await mongo_db["other"].insert_one({"x": 1})
        row = await checkpoint_row(pg_url, pg_schema)
        token = row and row["resume_token"]
        if token and token not in tokens:
            tokens.append(token)
        return len(tokens) >= 2

    async with running(projector):
        await wait_until(token_moved, "the resume token to move on a quiet stream")
    assert projector.applied == 0


async def test_bad_event_stops_the_projector_loudly(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> None:
    events = await events_collection(mongo_db)
    good = lifecycle(1)
    bad = {**lifecycle(2)[0], "type": "teleported"}
    await insert(events, [good[0], bad])
    projector = make_projector(events, pg_url, pg_schema)
    with pytest.raises(UnprojectableEvent) as err:
        await asyncio.wait_for(projector.run(asyncio.Event()), DEADLINE_S)
    assert err.value.message_id == bad["message_id"] and err.value.seq == 1
    assert bad["message_id"] in str(err.value)


async def test_lost_resume_token_names_the_fix(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> None:
    events = await events_collection(mongo_db)
    await migrate(pg_url, pg_schema)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("INSERT INTO {}.checkpoints (projection, resume_token) VALUES ('reporting', %s)").format(
                sql.Identifier(pg_schema)
            ),
            ('{"_data": "8200000001000000012B0229296E04"}',),
        )
    projector = make_projector(events, pg_url, pg_schema)
    with pytest.raises(ResumeTokenLost, match="msgcore projections rebuild"):
        await asyncio.wait_for(projector.run(asyncio.Event()), DEADLINE_S)
