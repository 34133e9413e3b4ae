"""Where a projection stands against the event log: `msgcore projections status`.

Reads the projection's checkpoint row in PostgreSQL and compares it with the log in MongoDB:
- the checkpoint's position (decoded from its resume token, else its cluster time),
- the newest event of the log (by `_id`: the one sort the `_id` index answers cheaply on every server),
- how many events were written after the checkpoint's `scan_from` (a bounded count: an estimate of
  the events behind, see projections/catchup.py),
- whether that position is still inside the oplog (oldest entry of `local.oplog.rs`): if not, the
  change stream cannot resume there and only `msgcore projections rebuild` helps,
- which PostgreSQL session holds the projection's advisory lock (the active projector), if any.

Nothing here writes anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from core.store.change_feed import (
    ChangeFeed,
    ClusterTime,
    EventsCollection,
    as_feed,
    id_time,
    int_to_ts,
    token_cluster_time,
    token_from_json,
    ts_datetime,
)
from core.store.errors import StoreError
from projections.runner import REBUILD_HINT
from projections.schema import lock_key

log = logging.getLogger(__name__)

DEFAULT_COUNT_LIMIT = 100_000


@dataclass(frozen=True)
class LockHolder:
    pid: int
    application_name: str


@dataclass
class ProjectionStatus:
    schema: str
    name: str
    schema_exists: bool = False
    has_checkpoint: bool = False
    checkpoint_updated_at: datetime | None = None
    events_applied: int | None = None
    last_event_at: datetime | None = None  # greatest `at` applied
    scan_from: datetime | None = None
    position: ClusterTime | None = None  # where the change stream resumes (token, else cluster time)
    cluster_time: ClusterTime | None = None  # the server's, now
    newest_event_id_at: datetime | None = None  # `_id` time of the newest event in the log
    newest_event_at: datetime | None = None  # its `at`
    newest_event: str | None = None  # "message_id seq"
    events_in_log: int | None = None  # estimate
    events_behind: int | None = None
    events_behind_capped: bool = False
    oplog_oldest: ClusterTime | None = None
    oplog_error: str | None = None
    token_in_oplog: bool | None = None  # None: could not tell
    holder: LockHolder | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


__all__ = ["LockHolder", "ProjectionStatus", "format_status", "lock_holder", "projection_status",
           "token_cluster_time", "ts_time"]  # fmt: skip


def ts_time(ts: ClusterTime | None) -> datetime | None:
    return ts_datetime(ts)


def advisory_lock_parts(key: int) -> tuple[int, int]:
    """(classid, objid) under which pg_locks shows a bigint advisory lock on `key`."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return unsigned >> 32, unsigned & 0xFFFFFFFF


_HOLDER = """
SELECT l.pid, coalesce(a.application_name, '') FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid
"""


async def lock_holder(conn: psycopg.AsyncConnection, key: int) -> LockHolder | None:
    """The session holding the (session-level, bigint) advisory lock `key`, if any."""
    cur = await conn.execute(_HOLDER, advisory_lock_parts(key))
    row = await cur.fetchone()
    return None if row is None else LockHolder(int(row[0]), str(row[1]))


async def _read_pg(status: ProjectionStatus, pg_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        status.holder = await lock_holder(conn, lock_key("projection", status.schema, status.name))
        cur = await conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (sql.Identifier(status.schema, "checkpoints").as_string(conn),),
        )
        row = await cur.fetchone()
        status.schema_exists = bool(row and row[0])
        if not status.schema_exists:
            return
        cur = await conn.execute(
            sql.SQL(
                "SELECT resume_token::text, cluster_time, events_applied, updated_at, last_event_at, scan_from"
                " FROM {}.checkpoints WHERE projection = %s"
            ).format(sql.Identifier(status.schema)),
            (status.name,),
        )
        row = await cur.fetchone()
    if row is None:
        return
    token = None if row[0] is None else token_from_json(row[0])
    stored = None if row[1] is None else int_to_ts(row[1])
    status.has_checkpoint = token is not None or stored is not None
    status.events_applied, status.checkpoint_updated_at = row[2], row[3]
    status.last_event_at, status.scan_from = row[4], row[5]
    positions = [t for t in (token_cluster_time(token), stored) if t is not None]
    status.position = max(positions) if positions else None


async def _read_log(status: ProjectionStatus, feed: ChangeFeed, count_limit: int) -> None:
    status.cluster_time = await feed.cluster_time_now()
    status.events_in_log = await feed.estimated_count()
    doc = await feed.newest_event()
    if doc is not None:
        status.newest_event_id_at = id_time(doc)
        at = doc.get("at")
        if isinstance(at, datetime):
            status.newest_event_at = at if at.tzinfo else at.replace(tzinfo=UTC)
        status.newest_event = f"{doc.get('message_id')} seq {doc.get('seq')}"
    since = status.scan_from or ts_time(status.position)
    if since is None:
        status.events_behind = status.events_in_log
        return
    behind = await feed.count_since(since, count_limit)
    status.events_behind = behind
    status.events_behind_capped = behind >= count_limit


async def _read_oplog(status: ProjectionStatus, feed: ChangeFeed) -> None:
    try:
        status.oplog_oldest = await feed.oplog_oldest()
    except StoreError as e:
        status.oplog_error = f"cannot read local.oplog.rs: {e}"
        return
    if status.oplog_oldest is None:
        status.oplog_error = "local.oplog.rs is empty or has no `ts`"
        return
    if status.position is not None:
        status.token_in_oplog = status.position >= status.oplog_oldest


async def projection_status(
    events: EventsCollection | ChangeFeed,
    pg_url: str,
    schema: str,
    *,
    name: str = "reporting",
    count_limit: int = DEFAULT_COUNT_LIMIT,
) -> ProjectionStatus:
    """The projection's lag and health; `problems` names what needs an operator (empty if none)."""
    status = ProjectionStatus(schema=schema, name=name)
    await _read_pg(status, pg_url)
    feed = as_feed(events)
    await _read_log(status, feed, count_limit)
    await _read_oplog(status, feed)
    if not status.schema_exists:
        status.problems.append(
            f"schema {schema!r} has no reporting tables (fresh PostgreSQL?): start `msgcore projector` to "
            f"replay the log into it, or {REBUILD_HINT}"
        )
    elif not status.has_checkpoint:
        status.problems.append(
            f"projection {name!r} in schema {schema!r} has no checkpoint (never ran, or a replay is unfinished): "
            f"start `msgcore projector` to replay the log, or {REBUILD_HINT}"
        )
    elif status.token_in_oplog is False:
        status.problems.append(
            f"projection {name!r} in schema {schema!r}: its resume point ({_fmt_ts(status.position)}) is older "
            f"than the oldest MongoDB oplog entry ({_fmt_ts(status.oplog_oldest)}): the resume token is lost and "
            f"the projector cannot follow on without skipping events; {REBUILD_HINT}"
        )
    log.debug("projection %s schema %s: status %s", name, schema, status)
    return status


def _fmt_time(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).isoformat(timespec="milliseconds")


def _fmt_ts(ts: ClusterTime | None) -> str:
    return "-" if ts is None else f"{_fmt_time(ts_time(ts))} (Timestamp({ts.time}, {ts.inc}))"


def _lag(newer: datetime | None, older: datetime | None) -> str:
    if newer is None or older is None:
        return "-"
    return f"{max((newer - older).total_seconds(), 0.0):.1f}s"


def format_status(s: ProjectionStatus) -> list[str]:
    """Human-readable lines for `msgcore projections status`."""
    behind = "-" if s.events_behind is None else (
        f">= {s.events_behind} (count stopped there)" if s.events_behind_capped else f"~{s.events_behind}")
    holder = "none (no projector is running)" if s.holder is None else (
        f"pid {s.holder.pid} ({s.holder.application_name or 'no application_name'})")
    if s.token_in_oplog is None:
        in_oplog = f"unknown ({s.oplog_error})" if s.oplog_error else "unknown (no checkpoint position)"
    else:
        in_oplog = "yes" if s.token_in_oplog else "NO: lost"
    lines = [
        f"projection:            {s.name} (schema {s.schema})",
        f"active projector:      {holder}",
        f"checkpoint time:       {_fmt_ts(s.position)}",
        f"checkpoint written:    {_fmt_time(s.checkpoint_updated_at)}",
        f"newest event applied:  {_fmt_time(s.last_event_at)} (event time)",
        f"events applied:        {'-' if s.events_applied is None else s.events_applied}",
        f"cluster time:          {_fmt_ts(s.cluster_time)}",
        f"newest event in log:   {_fmt_time(s.newest_event_at)} (event time), _id time "
        f"{_fmt_time(s.newest_event_id_at)}, {s.newest_event or 'log is empty'}",
        f"events in log:         ~{'-' if s.events_in_log is None else s.events_in_log}",
        f"events behind:         {behind}",
        f"lag:                   {_lag(s.newest_event_at, s.last_event_at)} (event time), "
        f"{_lag(ts_time(s.cluster_time), ts_time(s.position))} (cluster time vs checkpoint)",
        f"oldest oplog entry:    {_fmt_ts(s.oplog_oldest)}",
        f"resume token in oplog: {in_oplog}",
    ]
    lines += [f"PROBLEM: {p}" for p in s.problems]
    if s.ok:
        lines.append("OK")
    return lines
