"""`projections rebuild` during live traffic, against real MongoDB-wire and PostgreSQL servers.

A live Projector follows the schema while a writer keeps appending events; the rebuild replays the
log into a shadow, catches up, stops the live projector (taking its lock), swaps the shadow in, and
lets the live projector resume on it. At the end the swapped-in schema must equal a fresh replay of
the log, row for row, and the previous schema must still be there.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from pymongo import ASCENDING
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from projections.projector import Projector
from projections.queries import (
    checkpoint_row,
    daily_stats_rows,
    fetch_message_events_rows,
    fetch_messages_rows,
    recount_daily_stats,
)
from projections.rebuild import rebuild
from projections.replay import replay_into
from projections.status import projection_status

DEADLINE_S = 60.0
BASE = datetime(2026, 4, 1, 23, 59, tzinfo=UTC)


def lifecycle(j: int) -> list[dict[str, Any]]:
    mid = f"rb{j:05d}-{uuid.uuid4().hex[:6]}"
    route, parts, t = f"r{j % 3}", 1 + j % 2, BASE + timedelta(seconds=j)
    final = "undelivered" if j % 7 == 0 else "delivered"
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("accepted", {"to": f"+49151{j:07d}", "sender": "acme", "text": "hi", "encoding": "gsm7", "parts": parts,
                      "priority": 10, "validity_s": 3600, "send_at": None, "campaign_id": None, "client_ref": None}),
        ("routed", {"route_id": route, "price_per_part": 6, "currency": "EUR", "strategy": "smart"}),
        ("sent", {"route_id": route, "smsc_message_ids": [f"x{j}"], "attempt": 1, "parts": parts}),
        (final, {"route_id": route, "smsc_message_id": f"x{j}", "stat": "DELIVRD", "err": "000"}),
        ("billed", {"route_id": route, "parts": parts, "price_per_part": 6, "amount": 6 * parts, "currency": "EUR"}),
    ]
    return [{"message_id": mid, "seq": seq, "type": kind, "at": t + timedelta(seconds=30 * seq),
             "tenant_id": f"t{j % 2}", "route_id": None if kind == "accepted" else route, "channel": "sms", "v": 1,
             "data": data} for seq, (kind, data) in enumerate(kinds, start=1)]


class Traffic:
    """Appends events the way the live system does: many messages in flight, each in seq order.

    At tick k, message k is accepted and every message j < k gets its event number k - j + 1."""

    def __init__(self, events: AsyncCollection, first: int) -> None:
        self.events = events
        self.tick = first
        self.streams: dict[int, list[dict[str, Any]]] = {}
        self.inserted = 0

    async def step(self) -> None:
        self.streams[self.tick] = lifecycle(self.tick)
        docs = [s[self.tick - j] for j, s in self.streams.items() if self.tick - j < len(s)]
        await self.events.insert_many([dict(d) for d in docs])
        self.inserted += len(docs)
        self.tick += 1

    async def run(self, stop: asyncio.Event, pause_s: float = 0.02) -> None:
        while not stop.is_set():
            await self.step()
            await asyncio.sleep(pause_s)


async def count_rows(pg_url: str, schema: str) -> int:
    """Rows in `schema`.message_events; -1 while the table does not exist yet."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT to_regclass(%s)", (f'"{schema}".message_events',))
        found = await cur.fetchone()
        if found is None or found[0] is None:
            return -1
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}.message_events").format(sql.Identifier(schema)))
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE_S
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def schema_exists(pg_url: str, name: str) -> bool:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,))
        return await cur.fetchone() is not None


async def drop_schemas(pg_url: str, names: list[str]) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        for name in names:
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


async def assert_equal_to_fresh_replay(events: AsyncCollection, pg_url: str, schema: str, fresh: str) -> None:
    await replay_into(events, pg_url, fresh)
    n = await events.count_documents({})
    assert await count_rows(pg_url, fresh) == n
    assert await fetch_message_events_rows(pg_url, schema) == await fetch_message_events_rows(pg_url, fresh)
    assert await fetch_messages_rows(pg_url, schema) == await fetch_messages_rows(pg_url, fresh)
    assert await daily_stats_rows(pg_url, schema) == await daily_stats_rows(pg_url, fresh)
    assert await daily_stats_rows(pg_url, schema) == await recount_daily_stats(pg_url, schema)


async def test_rebuild_during_live_traffic_ends_equal_to_the_log(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str
) -> None:
    events = mongo_db["events"]
    await events.create_index([("message_id", ASCENDING), ("seq", ASCENDING)], unique=True)
    traffic = Traffic(events, first=0)
    for _ in range(60):  # a log to replay: 56 messages done, some in flight
        await traffic.step()
    live = Projector(events, pg_url, pg_schema, batch_wait_s=0.05, checkpoint_interval_s=0.2, standby_poll_s=0.1)
    stop_live, stop_traffic = asyncio.Event(), asyncio.Event()
    live_task = asyncio.create_task(live.run(stop_live))
    traffic_task: asyncio.Task[None] | None = None
    progress: list[tuple[int, int]] = []
    phases: list[str] = []
    result = None
    try:
        await wait_until(lambda: _all_projected(events, pg_url, pg_schema), "the live projector to catch up")
        traffic_task = asyncio.create_task(traffic.run(stop_traffic))
        result = await asyncio.wait_for(
            rebuild(events, pg_url, pg_schema, batch_size=200, lock_timeout_s=30, catch_up_timeout_s=DEADLINE_S,
                    progress=lambda done, total: progress.append((done, total)), phase=phases.append),
            DEADLINE_S * 2)
        await asyncio.sleep(0.5)  # traffic continues after the swap, onto the new schema
        stop_traffic.set()
        await traffic_task
        await wait_until(lambda: _all_projected(events, pg_url, pg_schema), "the live projector to resume")

        assert result.old_schema == f"{pg_schema}_old_{result.shadow.rsplit('_', 1)[1]}"
        assert await schema_exists(pg_url, result.old_schema), "the previous schema is kept"
        assert await checkpoint_row(pg_url, result.old_schema) is not None
        assert not await schema_exists(pg_url, result.shadow), "the shadow was renamed into place"
        assert result.stopped_live, "the live projector's session was stopped for the swap"
        assert result.replayed >= 60 * 5 - 10 and len(progress) >= 1 and progress and progress[-1][0] == progress[-1][1]
        assert any("swapping" in p for p in phases)
        assert live.stats.active and live.stats.streams_opened >= 2  # it resumed, on the swapped-in schema
        assert traffic.inserted > 300  # events were written during the rebuild
        await assert_equal_to_fresh_replay(events, pg_url, pg_schema, f"{pg_schema}_fresh")
        status = await projection_status(events, pg_url, pg_schema)
        assert status.ok and status.holder is not None and status.token_in_oplog is not False, status
    finally:
        stop_traffic.set()
        stop_live.set()
        if traffic_task is not None:
            await traffic_task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(live_task, DEADLINE_S)
        extra = [f"{pg_schema}_fresh"] + ([result.old_schema] if result and result.old_schema else [])
        await drop_schemas(pg_url, extra + ([result.shadow] if result else []))


async def _all_projected(events: AsyncCollection, pg_url: str, schema: str) -> bool:
    return await count_rows(pg_url, schema) == await events.count_documents({})


async def test_second_rebuild_drops_the_previous_old_schema(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str
) -> None:
    events = mongo_db["events"]
    await events.create_index([("message_id", ASCENDING), ("seq", ASCENDING)], unique=True)
    traffic = Traffic(events, first=0)
    for _ in range(10):
        await traffic.step()
    await replay_into(events, pg_url, pg_schema)  # a live schema, with no projector running
    t0 = datetime.now(UTC)
    first = await rebuild(events, pg_url, pg_schema, now=t0)
    second = await rebuild(events, pg_url, pg_schema, now=t0 + timedelta(seconds=1))
    try:
        assert first.old_schema and second.old_schema and first.old_schema != second.old_schema
        assert second.dropped == [first.old_schema]
        assert not await schema_exists(pg_url, first.old_schema)
        assert await schema_exists(pg_url, second.old_schema)
        assert first.stopped_live == [] and second.stopped_live == []
        await assert_equal_to_fresh_replay(events, pg_url, pg_schema, f"{pg_schema}_fresh")
    finally:
        await drop_schemas(pg_url, [f"{pg_schema}_fresh", first.old_schema or "", second.old_schema or ""])
