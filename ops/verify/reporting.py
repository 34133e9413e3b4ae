"""Check 7, reporting: the PostgreSQL tables against the log: `message_events` holds every event once,
each `messages` row agrees with its projected events, `daily_stats` equals its recount."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from core.domain.events import Event, EventType
from ops.verify.messages import parse_event
from ops.verify.report import VerifyError, VerifyReport, aware
from projections.projector import STATE_OF_TYPE, STATELESS_TYPES, int_to_ts
from projections.queries import _RECOUNT as RECOUNT_DAILY_STATS  # the one definition daily_stats must equal
from projections.writer import ENTRY_TYPES


async def projector_position(conn: psycopg.AsyncConnection, schema: str, projection: str) -> datetime | None:
    """The cluster time of the newest change the projection applied (None if unknown)."""
    cur = await conn.execute("SELECT to_regclass(%s), to_regclass(%s)",
                             (f'"{schema}".message_events', f'"{schema}".checkpoints'))
    row = await cur.fetchone()
    if row is None or row[0] is None:
        raise VerifyError(f"reporting schema {schema!r} has no message_events table: wrong "
                          f"MSGCORE_REPORTING_SCHEMA, or the projector never ran")
    if row[1] is None:
        return None
    cur = await conn.execute(
        sql.SQL("SELECT cluster_time FROM {}.checkpoints WHERE projection = %s").format(sql.Identifier(schema)),
        (projection,))
    found = await cur.fetchone()
    if found is None or found[0] is None:
        return None
    return datetime.fromtimestamp(int_to_ts(found[0]).time, UTC)


async def byte_order(conn: psycopg.AsyncConnection) -> sql.Composable:
    """`COLLATE "C"` unless the database already sorts text by bytes (then the primary key index
    serves the ORDER BY). MongoDB and Python compare strings by UTF-8 bytes / code points."""
    cur = await conn.execute("SELECT datcollate FROM pg_database WHERE datname = current_database()")
    row = await cur.fetchone()
    return sql.SQL("") if row and row[0] in ("C", "POSIX") else sql.SQL('COLLATE "C"')


def check_projected(report: VerifyReport, pending_after: datetime, mid: str, docs: Sequence[Mapping[str, Any]],
                    parsed: Sequence[Event], pg_events: Sequence[tuple[str, int, str]]) -> list[Event]:
    """Compare one message's log events (`docs`, and those of them that parse, `parsed`) with its
    `message_events` rows; return the log events that are projected (the input of its `messages` row).
    A missing event newer than `pending_after` is not yet projected, not a fault."""
    report.counts["projected"] += len(pg_events)
    in_pg = {seq: kind for _, seq, kind in pg_events}
    by_seq = {e.seq: e for e in parsed}
    if len(in_pg) != len(pg_events):
        report.add("projected_twice", mid, f"message_events holds {len(pg_events)} rows for {len(in_pg)} seqs")
    projected: list[Event] = []
    for doc in docs:
        seq, kind = doc.get("seq"), doc.get("type")
        if seq in in_pg:
            pg_kind = in_pg.pop(seq)
            if pg_kind != kind:
                report.add("projected_event_mismatch", mid, f"seq {seq}: log says {kind!r}, message_events {pg_kind!r}")
            event = by_seq.get(seq) or parse_event(doc)
            if event is not None:  # an unreadable one is reported as fold_failed
                projected.append(event)
            continue
        at = aware(doc.get("at"))
        if isinstance(at, datetime) and at > pending_after:
            report.counts["not_yet_projected"] += 1
        else:
            report.add("event_not_projected", mid, f"seq {seq} {kind!r} at {at} is not in message_events")
    for seq, kind in sorted(in_pg.items()):
        report.add("extra_projected_event", mid, f"seq {seq} {kind!r} is in message_events but not in the log")
    return projected


def check_messages_row(report: VerifyReport, mid: str, projected: Sequence[Event], row: tuple[Any, ...] | None
                        ) -> None:
    if all(e.type.value in ENTRY_TYPES for e in projected):  # a suppression entry, not a message: no row
        projected = []
    if not projected:
        if row is not None:
            report.add("extra_messages_row", mid, "messages has a row but no event of it is projected")
        return
    want = expected_row(projected)
    if row is None:
        report.add("messages_row_missing", mid, f"{len(projected)} events projected but no messages row")
        return
    got = dict(zip(("state", "last_seq", "billed", "amount_minor"), row[1:], strict=True))
    diffs = [f"{k}: row={got[k]!r} events={v!r}" for k, v in want.items() if got[k] != v]
    if diffs:
        report.add("messages_row_mismatch", mid, "; ".join(diffs))


async def check_daily_stats(report: VerifyReport, conn: psycopg.AsyncConnection, schema: str) -> None:
    """daily_stats against its recount from message_events, in the same snapshot (the grouped result
    is small: days x tenants x routes x channels x types)."""
    s = sql.Identifier(schema)
    cur = await conn.execute(sql.SQL(
        "SELECT day, tenant_id, route_id, channel, state, events, parts, amount_minor FROM {}.daily_stats").format(s))
    stored = {tuple(r[:5]): tuple(r[5:]) for r in await cur.fetchall()}
    cur = await conn.execute(sql.SQL(RECOUNT_DAILY_STATS).format(s=s))
    recount = {tuple(r[:5]): tuple(r[5:]) for r in await cur.fetchall()}
    for key in sorted(stored.keys() | recount.keys(), key=str):
        have, want = stored.get(key), recount.get(key)
        if have != want:
            day, tenant, route, channel, state = key
            report.add("daily_stats_mismatch", None,
                       f"{day} tenant={tenant} route={route or '-'} channel={channel} state={state}: "
                       f"(events, parts, amount_minor) stored={have} recount={want}")


def expected_row(events: Sequence[Event]) -> dict[str, Any]:
    """What the projector's `messages` row must hold after exactly these events (any order): the
    newest event's state that moves the state (not `billed`, not `released`), the highest seq, billed,
    and the summed amount of the `billed` events (None if none)."""
    ordered = sorted(events, key=lambda e: e.seq)
    moving = [e for e in ordered if e.type.value not in STATELESS_TYPES]
    bills = [e for e in ordered if e.type == EventType.BILLED]
    return {
        "state": STATE_OF_TYPE.get(moving[-1].type.value, moving[-1].type.value) if moving else None,
        "last_seq": ordered[-1].seq if ordered else 0,
        "billed": bool(bills),
        "amount_minor": sum(int(e.data.get("amount") or 0) for e in bills) if bills else None,
    }
