"""The run: read the snapshot, check the topics, merge the sorted streams message by message (with a
second look at a message that seems wrong), then the attempts and the spend."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from core.store.topics import EventLog
from ops.verify.attempts import check_attempts
from ops.verify.billing import check_spend
from ops.verify.messages import Judgement, fold_docs, judge
from ops.verify.report import ASCENDING, BATCH, DEFAULT_LAG_GRACE_S, DEFAULT_STALE_AFTER_S, VerifyReport
from ops.verify.reporting import byte_order, check_daily_stats, check_messages_row, check_projected, projector_position
from ops.verify.snapshot import LogSnapshot, read_snapshot, read_spend
from ops.verify.streams import ReadAhead, Sorted, fetch_server_side, grouped, keyed
from ops.verify.topics import check_topics

if TYPE_CHECKING:  # the driver's types only: the driver itself is core/store's business
        from core.store.database import Database, Session

log = logging.getLogger(__name__)


@dataclass
class Context:
    """One run's inputs and running totals, shared by the checks of each message."""

    report: VerifyReport
    db: Database
    snap: LogSnapshot
    now: datetime
    stale_after_s: float
    pending_after: datetime | None  # None: no reporting check
    billed_by_tenant: Counter[str] = field(default_factory=Counter)
    rechecks: int = 0


async def verify(db: Database, pg_url: str | None, schema: str, now: datetime, *,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, lag_grace_s: float = DEFAULT_LAG_GRACE_S,
                 projection: str = "reporting", keep_per_kind: int = 1000) -> VerifyReport:
    """Check the log of `db` (topics, checkpoints, attempts, every message, the tenants' spend) and,
    with `pg_url`, the reporting schema `schema` against it; see ops/verify/__init__.py. `now` must be
    timezone-aware.

    With `pg_url` None only the MongoDB checks run (`report.reporting_checked` is False). Raises
    VerifyError when the reporting schema does not exist or a stream is not sorted as required.
    Events missing from `message_events` whose `at` is after `report.pending_after` are counted as
    `not_yet_projected`: that is the projector's checkpoint (cluster time of the newest change it
    applied) or, without one, `now`, minus `lag_grace_s` (clock skew and commit latency).
    """
    if now.tzinfo is None:
        raise ValueError("verify: `now` must be timezone-aware (UTC)")
    report = VerifyReport(keep_per_kind=keep_per_kind)
    if pg_url is None:
        await _check_log(report, db, now, stale_after_s, None, None, None)
    else:
        async with await psycopg.AsyncConnection.connect(pg_url, application_name="msgcore-verify") as conn:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await conn.set_read_only(True)
            async with conn.transaction():
                # The snapshot starts with this first query, before MongoDB is read.
                position = await projector_position(conn, schema, projection)
                report.reporting_checked = True
                report.projector_position = position
                report.pending_after = min(now, position or now) - timedelta(seconds=lag_grace_s)
                await _check_log(report, db, now, stale_after_s, report.pending_after, conn, schema)
                await check_daily_stats(report, conn, schema)
    log.info("verify: %s; %d discrepancies %s", report.counts, sum(report.discrepancy_counts.values()),
             dict(report.discrepancy_counts))
    return report


async def _check_log(report: VerifyReport, db: Database, now: datetime, stale_after_s: float,
                     pending_after: datetime | None, conn: psycopg.AsyncConnection | None, schema: str | None) -> None:
    snap = await read_snapshot(db)
    await check_topics(report, db, snap)
    ctx = Context(report, db, snap, now, stale_after_s, pending_after)
    await _merge(ctx, conn, schema)
    await check_attempts(report, db, now, stale_after_s)
    check_spend(report, snap.spend_before, await read_spend(db), ctx.billed_by_tenant)


async def _merge(ctx: Context, conn: psycopg.AsyncConnection | None, schema: str | None) -> None:
    """Walk the (two or four) sorted streams message by message."""
    events_cur = ctx.db["events"].find({}, {"_id": 0}, batch_size=BATCH).sort(
        [("message_id", ASCENDING), ("seq", ASCENDING)])
    timers_cur = ctx.db["timers"].find({}, batch_size=BATCH).sort("_id", ASCENDING)
    events_in, timers_in = ReadAhead(aiter(events_cur)), ReadAhead(aiter(timers_cur))
    sources: list[AsyncGenerator[tuple[str, Any], None]] = [
        grouped(aiter(events_in), lambda d: d["message_id"]),
        keyed(aiter(timers_in), lambda d: d["_id"]),
    ]
    names = ["events", "timers"]
    if conn is not None and schema is not None:
        order = await byte_order(conn)
        ident = sql.Identifier(schema)
        sources += [
            grouped(fetch_server_side(conn, "verify_events", sql.SQL(
                "SELECT message_id, seq, type FROM {}.message_events ORDER BY message_id {}, seq"
            ).format(ident, order)), lambda r: r[0]),
            keyed(fetch_server_side(conn, "verify_messages", sql.SQL(
                "SELECT message_id, state, last_seq, billed, amount_minor FROM {}.messages ORDER BY message_id {}"
            ).format(ident, order)), lambda r: r[0]),
        ]
        names += ["message_events", "messages"]
    streams = [Sorted(name, source) for name, source in zip(names, sources, strict=True)]
    try:
        for stream in streams:
            await stream.advance()
        while True:
            keys = [stream.key for stream in streams if stream.key is not None]
            if not keys:
                break
            mid = min(keys)
            items = [await stream.take(mid) for stream in streams]
            await _check_message(ctx, mid, *items, *([None] * (4 - len(items))))
    finally:
        for reader in (events_in, timers_in):
            await reader.aclose()
        for source in sources:
            await source.aclose()
        await events_cur.close()
        await timers_cur.close()


async def _check_message(ctx: Context, mid: str, docs: list[dict[str, Any]] | None, timer: dict[str, Any] | None,
                         pg_events: list[tuple[str, int, str]] | None, pg_row: tuple[Any, ...] | None) -> None:
    report = ctx.report
    if docs:
        report.counts["messages"] += 1
        report.counts["events"] += len(docs)
        j = judge(ctx.snap, docs, timer, ctx.now, ctx.stale_after_s)
        # The spend bracket is about what the scan saw: count these docs' bills, whatever a re-read says.
        tenant = str(docs[0].get("tenant_id"))
        ctx.billed_by_tenant[tenant] += j.billed_amounts
        if j.problems:
            j = await _second_look(ctx, mid, j)
        _record(report, mid, j)
    elif timer is not None:
        report.add("orphan_timer", mid, f"a {timer.get('reason')} timer into {timer.get('topic')} for a message "
                   "without events")
    if ctx.pending_after is not None:
        folded = fold_docs(docs) if docs else None
        parsed = folded.events if folded else []
        projected = check_projected(report, ctx.pending_after, mid, docs or [], parsed, pg_events or [])
        check_messages_row(report, mid, projected, pg_row)


async def _second_look(ctx: Context, mid: str, first: Judgement) -> Judgement:
    """Judge again on the message's events and timer read in one snapshot: the scan read them at
    different moments, and the message may have moved on meanwhile."""
    docs, timer = await _reread(ctx.db, mid)
    ctx.rechecks += 1
    fresh = judge(ctx.snap, docs, timer, ctx.now, ctx.stale_after_s) if docs else first
    if not fresh.problems:
        ctx.report.counts["in_motion"] += 1
        log.debug("verify: message=%s moved during the scan; consistent on a second look", mid)
    return fresh


def _record(report: VerifyReport, mid: str, j: Judgement) -> None:
    c = report.counts
    if j.place:
        c[j.place] += 1
        if j.place in ("in_backlog", "on_timer", "awaiting_receipt", "paused"):
            c["in_flight"] += 1
    c["billed"] += j.billed_events
    c["multi_sent"] += int(j.multi_sent)
    for kind, detail in j.notes:
        if kind == "possible_duplicate":
            c["possible_duplicates"] += 1
        report.note(kind, mid, detail)
    for kind, detail in j.problems:
        report.add(kind, mid, detail)


async def _reread(db: Database, mid: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One message's events and timer, read in one snapshot transaction."""

    async def body(session: Session) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        docs = [d async for d in db["events"].find({"message_id": mid}, {"_id": 0}, session=session)
                .sort("seq", ASCENDING)]
        return docs, await db["timers"].find_one({"_id": mid}, session=session)

    # A transaction reads one snapshot (EventLog.transaction: majority read concern).
    result: tuple[list[dict[str, Any]], dict[str, Any] | None] = await EventLog(db).transaction(body)
    return result
