"""`msgcore verify` against real MongoDB-wire and PostgreSQL servers (never mocked).

A small log is written through the real EventStore (accept, then commit transition by transition),
projected by the real replay (or the live Projector), and verified clean; each other test corrupts
one thing and checks that verify names it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import Event, EventType, utcnow
from core.domain.message import MessageState, evolve, next_event
from core.store.eventstore import EventStore, Transition
from ops.verify import VerifyReport, verify
from projections.projector import Projector
from projections.replay import replay_into
from tests.support.factories import accepted

REPO = Path(__file__).resolve().parents[2]
ROUTE = "r1"
ROUTED = (EventType.ROUTED, {"route_id": ROUTE, "price_per_part": 5, "currency": "EUR", "strategy": "smart"})
RETRY = (EventType.RETRY, {"route_id": ROUTE, "attempt": 1, "error_code": 88, "error_name": "ESME_RTHROTTLED",
                           "next_at": None, "reason": "throttled"})  # fmt: skip
FAILED = (EventType.FAILED, {"route_id": ROUTE, "attempt": 1, "error_code": 69, "error_name": "ESME_RSUBMITFAIL",
                             "reason": "submit failed"})  # fmt: skip
BILLED = (EventType.BILLED, {"route_id": ROUTE, "parts": 1, "price_per_part": 5, "amount": 5, "currency": "EUR"})


def sent(n: int, **extra: Any) -> tuple[EventType, dict[str, Any]]:
    return EventType.SENT, {"route_id": ROUTE, "smsc_message_ids": [f"smsc-{n}"], "attempt": 1, "parts": 1, **extra}


def receipt(kind: EventType, n: int) -> tuple[EventType, dict[str, Any]]:
    return kind, {"route_id": ROUTE, "smsc_message_id": f"smsc-{n}", "stat": "DELIVRD", "err": "000", "done_at": None}


DELIVERED_BILLED = [ROUTED, sent(0), receipt(EventType.DELIVERED, 0), BILLED]


@dataclass
class Log:
    """The messages written, by role, and the time the log was written at (10 minutes ago)."""

    base: datetime
    ids: dict[str, str] = field(default_factory=dict)
    total_events: int = 0


async def write_message(store: EventStore, log: Log, role: str, steps: list[tuple[EventType, dict[str, Any]]],
                        tenant: str = "t1") -> MessageState:
    """Accept one message and commit its lifecycle one transition at a time, each a second apart."""
    at = log.base + timedelta(seconds=len(log.ids))
    event, head = accepted(tenant, at)
    await store.accept([(event, head)])
    state = evolve(None, event)
    for i, (kind, data) in enumerate(steps, start=1):
        when = at + timedelta(milliseconds=100 * i)
        nxt = next_event(state, kind, when, data)
        new = evolve(state, nxt)
        result = await store.commit([Transition(state.version, [nxt], new)], when)
        assert result.committed == [state.message_id]
        state = new
    log.ids[role] = state.message_id
    log.total_events += 1 + len(steps)
    return state


async def build_log(db: AsyncDatabase) -> Log:
    store = EventStore(db)
    await store.ensure_indexes()
    log = Log(base=utcnow() - timedelta(minutes=10))
    for i in range(4):
        await write_message(store, log, f"delivered{i}", DELIVERED_BILLED, tenant=f"t{i % 2}")
    await write_message(store, log, "undelivered", [ROUTED, sent(1), receipt(EventType.UNDELIVERED, 1), BILLED])
    await write_message(store, log, "failed", [ROUTED, FAILED])
    await write_message(store, log, "in_route", [])
    await write_message(store, log, "in_send", [ROUTED])
    await write_message(store, log, "in_receipt", [ROUTED, sent(2)])
    await write_message(store, log, "resent", [ROUTED, sent(3, possible_duplicate=True),
                                               receipt(EventType.DELIVERED, 3), BILLED])
    await write_message(store, log, "retried", [ROUTED, sent(4), RETRY, ROUTED, sent(5),
                                                receipt(EventType.DELIVERED, 5), BILLED])
    return log


@pytest.fixture
async def projected(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> Log:
    log = await build_log(mongo_db)
    stats = await replay_into(mongo_db["events"], pg_url, pg_schema)
    assert stats.applied == log.total_events
    return log


async def run_verify(db: AsyncDatabase, pg_url: str | None, schema: str, **kw: Any) -> VerifyReport:
    return await verify(db, pg_url, schema, utcnow(), **kw)


def kinds_for(report: VerifyReport, message_id: str | None) -> set[str]:
    return {d.kind for d in report.discrepancies if d.message_id == message_id}


async def pg_exec(pg_url: str, statement: str, schema: str, *params: Any) -> int:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL(statement).format(s=sql.Identifier(schema)), params)
        return cur.rowcount


# --- clean -------------------------------------------------------------------------------------------


async def test_clean_log_verifies(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert report.ok, report.discrepancies
    assert report.reporting_checked
    c = report.counts
    assert c["messages"] == c["heads"] == len(projected.ids) == 11
    assert c["events"] == c["projected"] == projected.total_events
    assert (c["terminal"], c["in_flight"], c["stuck"]) == (8, 3, 0)
    assert c["possible_duplicates"] == 1 and c["multi_sent"] == 1 and c["not_yet_projected"] == 0
    assert [(n.kind, n.message_id) for n in report.notes] == [("possible_duplicate", projected.ids["resent"])]
    assert report.projector_position is not None

    mongo_only = await run_verify(mongo_db, None, pg_schema)
    assert mongo_only.ok and not mongo_only.reporting_checked and mongo_only.counts["projected"] == 0


async def test_live_projector_and_events_not_yet_projected(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str
) -> None:
    log = await build_log(mongo_db)
    projector = Projector(mongo_db["events"], pg_url, pg_schema, batch_size=100, batch_wait_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while projector.applied < log.total_events:
            assert loop.time() < deadline, "projector did not catch up"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert (await run_verify(mongo_db, pg_url, pg_schema)).ok

    # With the projector stopped, a fresh message is not in the reporting tables yet: not a fault.
    store = EventStore(mongo_db)
    fresh = Log(base=utcnow())
    await write_message(store, fresh, "new", [ROUTED])
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert report.ok, report.discrepancies
    assert report.counts["not_yet_projected"] == 2


# --- corruptions -------------------------------------------------------------------------------------


async def test_head_differs_from_fold(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    mid = projected.ids["in_send"]
    await mongo_db["streams"].update_one({"_id": mid}, {"$set": {"state": "delivered"}})
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert not report.ok
    [d] = report.discrepancies
    assert (d.kind, d.message_id) == ("head_mismatch", mid)
    assert "state: head='delivered' fold='routed'" in d.detail


async def test_head_deleted(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    mid = projected.ids["delivered1"]
    await mongo_db["streams"].delete_one({"_id": mid})
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert [(d.kind, d.message_id) for d in report.discrepancies] == [("head_missing", mid)]
    assert report.counts["heads"] == 10


async def test_head_without_events(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    head = await mongo_db["streams"].find_one({"_id": projected.ids["delivered2"]})
    assert head is not None
    await mongo_db["streams"].insert_one({**head, "_id": "ZZZ-orphan"})
    report = await run_verify(mongo_db, None, pg_schema)
    assert [(d.kind, d.message_id) for d in report.discrepancies] == [("orphan_head", "ZZZ-orphan")]


async def test_event_missing_from_message_events(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log
) -> None:
    mid = projected.ids["delivered0"]
    n = await pg_exec(pg_url, "DELETE FROM {s}.message_events WHERE message_id = %s AND seq = 3", pg_schema, mid)
    assert n == 1
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert "event_not_projected" in kinds_for(report, mid)
    [d] = [d for d in report.discrepancies if d.kind == "event_not_projected"]
    assert "seq 3 'sent'" in d.detail
    # The stored daily_stats still count the deleted row: the recount no longer does.
    assert report.discrepancy_counts["daily_stats_mismatch"] == 1
    assert report.counts["not_yet_projected"] == 0


async def test_extra_row_in_message_events(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log
) -> None:
    mid = projected.ids["in_receipt"]
    await pg_exec(pg_url, "INSERT INTO {s}.message_events (message_id, seq, type, at, tenant_id, route_id) "
                  "VALUES (%s, 9, 'delivered', now(), 't1', 'r1'), ('ZZZ-ghost', 1, 'accepted', now(), 't1', NULL)",
                  pg_schema, mid)  # fmt: skip
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert kinds_for(report, mid) == {"extra_projected_event"}
    assert kinds_for(report, "ZZZ-ghost") == {"extra_projected_event"}
    assert report.discrepancy_counts["daily_stats_mismatch"] >= 1


async def test_daily_stats_off_by_one(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    n = await pg_exec(pg_url, "UPDATE {s}.daily_stats SET events = events + 1 WHERE state = 'billed' AND tenant_id = "
                      "'t1'", pg_schema)  # fmt: skip
    assert n >= 1
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert set(report.discrepancy_counts) == {"daily_stats_mismatch"}
    assert all(d.message_id is None and "state=billed" in d.detail for d in report.discrepancies)


async def test_messages_row_disagrees(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    mid = projected.ids["undelivered"]
    await pg_exec(pg_url, "UPDATE {s}.messages SET state = 'delivered', amount_minor = 0 WHERE message_id = %s",
                  pg_schema, mid)
    report = await run_verify(mongo_db, pg_url, pg_schema)
    [d] = report.discrepancies
    assert (d.kind, d.message_id) == ("messages_row_mismatch", mid)
    assert "state: row='delivered' events='undelivered'" in d.detail and "amount_minor" in d.detail


async def test_stuck_message(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    mid = projected.ids["in_route"]
    await mongo_db["streams"].update_one({"_id": mid}, {"$set": {"due_at": utcnow() - timedelta(hours=2)}})
    report = await run_verify(mongo_db, pg_url, pg_schema)
    [d] = report.discrepancies
    assert (d.kind, d.message_id) == ("stuck", mid)
    assert "queue 'route'" in d.detail
    assert report.counts["stuck"] == 1 and report.counts["in_flight"] == 2
    # A longer tolerance accepts it as in flight.
    assert (await run_verify(mongo_db, pg_url, pg_schema, stale_after_s=3 * 3600)).ok


async def test_second_send_without_possible_duplicate(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log
) -> None:
    mid = projected.ids["in_receipt"]
    events = [Event.from_doc(d) async for d in mongo_db["events"].find({"message_id": mid}).sort("seq", 1)]
    again = Event(message_id=mid, seq=len(events) + 1, type=EventType.SENT, at=utcnow() - timedelta(minutes=5),
                  tenant_id=events[0].tenant_id, route_id=ROUTE, data=sent(9)[1])
    await mongo_db["events"].insert_one(again.to_doc())  # a corrupt append, bypassing the store's checks
    report = await run_verify(mongo_db, None, pg_schema)
    assert "duplicate_sent" in kinds_for(report, mid)
    [d] = [d for d in report.discrepancies if d.kind == "duplicate_sent"]
    assert f"seq {again.seq}" in d.detail
    assert "fold_failed" in kinds_for(report, mid)  # sent after sent is no transition either
    assert report.counts["possible_duplicates"] == 1  # the explained one is still just a note


async def test_missing_reporting_schema_is_a_config_error(mongo_db: AsyncDatabase, pg_url: str) -> None:
    from ops.verify import VerifyError

    with pytest.raises(VerifyError, match="no_such_schema"):
        await run_verify(mongo_db, pg_url, "no_such_schema")


# --- the command -------------------------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", "verify", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


async def test_cli_exit_codes(
    mongo_db: AsyncDatabase, mongo_url: str, pg_url: str, pg_schema: str, projected: Log, tmp_path: Path
) -> None:
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": mongo_db.name, "MSGCORE_PG_URL": pg_url,
           "MSGCORE_REPORTING_SCHEMA": pg_schema, "MSGCORE_DATA_DIR": str(tmp_path)}  # fmt: skip
    clean = await asyncio.to_thread(run_cli, env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "OK: no discrepancies" in clean.stdout and "messages=11" in clean.stdout
    assert f"note:possible_duplicate\t{projected.ids['resent']}" in clean.stdout

    mid = projected.ids["delivered3"]
    await mongo_db["streams"].delete_one({"_id": mid})
    broken = await asyncio.to_thread(run_cli, env, "--stale-after", "600")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert f"head_missing\t{mid}\t" in broken.stdout
    assert "FAILED: 1 discrepancies (head_missing=1)" in broken.stdout

    wrong = await asyncio.to_thread(run_cli, {**env, "MSGCORE_REPORTING_SCHEMA": "no_such_schema"})
    assert wrong.returncode == 2 and "no_such_schema" in wrong.stderr
