"""The reporting projector: follows the `events` change stream and writes PostgreSQL tables.

Exactly-once effect: every batch is ONE PostgreSQL transaction holding the audit rows, the
`messages`, `daily_stats`, `billing_ledger` and `inbound` changes and the checkpoint (resume token).
Events are inserted into `message_events` with ON CONFLICT DO NOTHING, and only the rows actually
inserted move the other tables; so a replayed or duplicated event changes nothing, and after any crash the tables
equal a fresh replay of the log.

One active projector per (schema, projection name): it holds a session-level advisory lock on the
same connection it writes with, so losing that connection loses the lock and the ability to write
at the same instant (no window in which two projectors write). Others wait as hot standbys.

Catch-up scan (why a resumed change stream is not trusted alone)
-----------------------------------------------------------------
SecantusDB 0.7.0b3 was seen to drop events when a change stream is opened with `resume_after` or
`start_at_operation_time` while inserts commit: it searches its oplog, then answers with an empty
first batch whose postBatchResumeToken is already past inserts that committed during the search;
those are never delivered. So every (re)open of the stream -- restart, crash, reconnect, standby
takeover, even the driver's own automatic resume -- is followed by a catch-up scan of the log
itself, applied through the same idempotent writer (duplicates change nothing).

The scan window is keyed on `_id`, not on `at`: event documents get their `_id` from the driver
(an ObjectId stamped with the writer's wall clock when `insert_many` runs, i.e. inside the very
transaction attempt that commits it), and `_id` has an index on every collection, so the scan
costs no extra index on the hot insert path. `at` is unsuitable: it comes from an injectable clock
and is decided before a `commit` that may go through several rounds of driver retries.

The checkpoint keeps `scan_from` with this invariant: every event not yet applied has an `_id`
time >= scan_from - margin, where the margin (`catchup_margin_s`, 5 minutes by default) covers
the time between `_id` generation and commit (the driver retries a commit for up to ~2 minutes)
plus clock skew between hosts. It is maintained as follows:
- a fresh replay sets it to the wall-clock time noted before the log scan started;
- on (re)open, the scan reads `_id` in [scan_from - margin, time after the open + margin] in
  `_id` order, one page per PostgreSQL transaction, interleaved with the stream's batches so the
  stream is never held up for more than one page. Anything committed before the stream was open
  is in that window and visible to the scan; anything committed afterwards the stream delivers;
- while the scan is unfinished `scan_from` does not move (a crash mid-scan rescans the same
  window); when it finishes, `scan_from` becomes the time noted just before the stream was opened;
- afterwards each stream batch moves it to the newest `_id` time it applied (events committed
  after that batch have later `_id`s, up to the margin).
Events whose `_id` is not a driver-generated ObjectId are outside this scheme (none are written
today: `Event.to_doc` leaves `_id` to the driver).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pydantic
from bson import ObjectId, Timestamp, json_util
from psycopg import sql
from pymongo.asynchronous.change_stream import AsyncCollectionChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, OperationFailure

from core.aio import sleep_or_stop
from core.domain.events import Event
from projections.schema import lock_key, migrate

log = logging.getLogger(__name__)

REBUILD_HINT = "run `msgcore projections rebuild` to replay the log into a new schema and swap it in"
# ChangeStreamHistoryLost, ChangeStreamFatalError, CappedPositionLost.
_HISTORY_LOST_CODES = frozenset({286, 280, 136})
# Errors worth a reconnect: the stores went away or a transaction lost a race. Everything else
# (bad data, lost resume token, a bug) stops the projector.
_MIN_BACKOFF_S = 0.5
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (ConnectionFailure, psycopg.OperationalError)


class ResumeTokenLost(RuntimeError):
    """The checkpoint's position is no longer in the oplog: following on would skip events."""

    def __init__(self, schema: str, projection: str, detail: str) -> None:
        super().__init__(
            f"projection {projection!r} in schema {schema!r}: its resume point is no longer in the "
            f"MongoDB oplog ({detail}); refusing to skip events: {REBUILD_HINT}"
        )
        self.schema = schema
        self.projection = projection


class UnprojectableEvent(ValueError):
    """An event document that cannot be projected; the projector stops rather than skip it."""

    def __init__(self, message_id: object, seq: object, reason: str) -> None:
        super().__init__(f"event message_id={message_id!r} seq={seq!r} cannot be projected: {reason}")
        self.message_id = message_id
        self.seq = seq
        self.reason = reason


class ChangeStreamInvalidated(RuntimeError):
    """The change stream ended (e.g. the `events` collection was dropped or renamed)."""


@dataclass
class ProjectorStats:
    """Counters of one Projector instance (since it was created)."""

    applied: int = 0  # events newly inserted (duplicates excluded)
    received: int = 0  # events read, duplicates included
    batches: int = 0  # transactions written that carried events
    last_event_at: datetime | None = None  # greatest `at` among the events received
    active: bool = False  # holds the lock and projects
    standby: bool = False  # waiting for another projector to release the lock
    streams_opened: int = 0  # change streams opened (1 + reconnects/takeovers)
    catchup_pending: bool = False  # a catch-up scan after a (re)open is unfinished
    catchup_scanned: int = 0  # events read by catch-up scans, duplicates included
    catchup_applied: int = 0  # of which new: events the change stream had not delivered (yet)
    catchups_done: int = 0  # catch-up scans finished

    def saw(self, newest_at: datetime) -> None:
        if self.last_event_at is None or newest_at > self.last_event_at:
            self.last_event_at = newest_at


# --- event document -> row ------------------------------------------------------------------------

# Columns of the per-connection temp table, in the order `event_row` produces them.
_ROW_COLUMNS = (
    "message_id", "seq", "type", "at", "tenant_id", "route_id", "channel", "data",
    "campaign_id", "to_number", "sender", "encoding", "parts", "price_per_part", "currency",
    "amount", "smsc_message_id", "error_code", "attempt",
)  # fmt: skip
_PARTS_TYPES = frozenset({"accepted", "sent", "billed"})
_BILLED_KEYS = ("parts", "price_per_part", "amount", "currency")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return str(value)  # ObjectId and friends: keep the audit copy readable rather than fail


def _int_or_none(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"data.{key} must be an integer, got {value!r}")
    return value


def _str_or_none(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else str(value)


def event_row(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    """The temp-table row (columns `_ROW_COLUMNS`) for one event document.

    Raises UnprojectableEvent (naming message_id and seq) when the document does not match the
    shape documented in `core.domain.events`.
    """
    try:
        ev = Event.from_doc(dict(doc))
        data = ev.data
        kind = ev.type.value
        route_id = ev.route_id if ev.route_id is not None else _str_or_none(data, "route_id")
        smsc_ids = data.get("smsc_message_ids") or []
        smsc_id = str(smsc_ids[0]) if kind == "sent" and smsc_ids else _str_or_none(data, "smsc_message_id")
        if kind == "billed":
            missing = [k for k in _BILLED_KEYS if data.get(k) is None]
            if missing:
                raise ValueError(f"billed event lacks data.{', data.'.join(missing)} (needed by billing_ledger)")
        data_json = json.dumps(data, default=_json_default, separators=(",", ":"))
        if "\\u0000" in data_json:
            raise ValueError("data contains a NUL character, which PostgreSQL jsonb rejects")
        return (
            ev.message_id, ev.seq, kind, ev.at, ev.tenant_id, route_id, ev.channel, data_json,
            _str_or_none(data, "campaign_id") if kind == "accepted" else None,
            _str_or_none(data, "to") if kind == "accepted" else None,
            _str_or_none(data, "sender") if kind == "accepted" else None,
            _str_or_none(data, "encoding") if kind == "accepted" else None,
            _int_or_none(data, "parts") if kind in _PARTS_TYPES else None,
            _int_or_none(data, "price_per_part") if kind in ("routed", "billed") else None,
            _str_or_none(data, "currency") if kind in ("routed", "billed") else None,
            _int_or_none(data, "amount") if kind == "billed" else None,
            smsc_id,
            _int_or_none(data, "error_code") if kind in ("retry", "failed") else None,
            _int_or_none(data, "attempt") if kind in ("sent", "retry", "failed") else None,
        )  # fmt: skip
    except (pydantic.ValidationError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UnprojectableEvent(doc.get("message_id"), doc.get("seq"), str(e)) from e


def dedupe_rows(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with one entry per (message_id, seq), first one kept.

    Needed because a duplicate inside one batch would be inserted once but marked fresh twice.
    """
    seen: dict[tuple[str, int], tuple[Any, ...]] = {}
    for row in rows:
        seen.setdefault((row[0], row[1]), row)
    return list(seen.values())


# --- BSON Timestamp <-> bigint ---------------------------------------------------------------------


def ts_to_int(ts: Timestamp) -> int:
    return (ts.time << 32) | ts.inc


def int_to_ts(value: int) -> Timestamp:
    return Timestamp(value >> 32, value & 0xFFFFFFFF)


def wall_now() -> datetime:
    return datetime.now(UTC)


def id_time(doc: Mapping[str, Any]) -> datetime | None:
    """When the writer's driver generated the document's `_id`; None if it is not an ObjectId."""
    oid = doc.get("_id")
    return oid.generation_time if isinstance(oid, ObjectId) else None


def newest_id_time(docs: Iterable[Mapping[str, Any]]) -> datetime | None:
    times = [t for t in (id_time(d) for d in docs) if t is not None]
    return max(times) if times else None


# --- the batch writer ------------------------------------------------------------------------------

_CREATE_TEMP = """
CREATE TEMP TABLE IF NOT EXISTS batch_events (
    message_id text NOT NULL, seq integer NOT NULL, type text NOT NULL, at timestamptz NOT NULL,
    tenant_id text NOT NULL, route_id text, channel text NOT NULL, data jsonb NOT NULL,
    campaign_id text, to_number text, sender text, encoding text, parts integer,
    price_per_part bigint, currency text, amount bigint, smsc_message_id text, error_code integer,
    attempt integer, fresh boolean NOT NULL DEFAULT false
) ON COMMIT DELETE ROWS
"""

_INSERT_EVENTS = """
WITH ins AS (
    INSERT INTO {s}.message_events (message_id, seq, type, at, tenant_id, route_id, channel, data)
    SELECT message_id, seq, type, at, tenant_id, route_id, channel, data FROM pg_temp.batch_events
    ON CONFLICT (message_id, seq) DO NOTHING
    RETURNING message_id, seq
)
UPDATE pg_temp.batch_events b SET fresh = true FROM ins
WHERE b.message_id = ins.message_id AND b.seq = ins.seq
"""

_UPSERT_DAILY = """
INSERT INTO {s}.daily_stats AS d (day, tenant_id, route_id, channel, state, events, parts, amount_minor)
SELECT (at AT TIME ZONE 'UTC')::date, tenant_id, coalesce(route_id, ''), channel, type, count(*),
       coalesce(sum(parts) FILTER (WHERE type IN ('accepted', 'sent', 'billed')), 0),
       coalesce(sum(amount) FILTER (WHERE type = 'billed'), 0)
FROM pg_temp.batch_events WHERE fresh
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (day, tenant_id, route_id, channel, state) DO UPDATE SET
    events = d.events + EXCLUDED.events,
    parts = d.parts + EXCLUDED.parts,
    amount_minor = d.amount_minor + EXCLUDED.amount_minor
"""

# billing_ledger and inbound: one row per newly inserted `billed` / `inbound` event (never from a
# duplicate: `fresh` is set only for rows message_events took). Run after the messages merge, so the
# ledger row gets the campaign of an `accepted` event in the same batch.
_INSERT_LEDGER = """
INSERT INTO {s}.billing_ledger (message_id, seq, tenant_id, route_id, campaign_id, billed_at, parts,
                               price_per_part_minor, amount_minor, currency)
SELECT b.message_id, b.seq, b.tenant_id, b.route_id, m.campaign_id, b.at, b.parts, b.price_per_part, b.amount,
       b.currency
FROM pg_temp.batch_events b LEFT JOIN {s}.messages m ON m.message_id = b.message_id
WHERE b.fresh AND b.type = 'billed'
"""

# A bill projected before its message's `accepted` event (out of order) gets the campaign when the
# `accepted` event arrives, so the ledger does not depend on the order events are applied in.
_LEDGER_CAMPAIGN = """
UPDATE {s}.billing_ledger l SET campaign_id = b.campaign_id
FROM pg_temp.batch_events b
WHERE b.fresh AND b.type = 'accepted' AND b.campaign_id IS NOT NULL
  AND l.message_id = b.message_id AND l.campaign_id IS NULL
"""

_INSERT_INBOUND = """
INSERT INTO {s}.inbound (message_id, seq, tenant_id, route_id, channel, from_number, to_number, text,
                         received_at, reply_to, smsc_message_id)
SELECT message_id, seq, tenant_id, route_id, channel, data->>'from', data->>'to', data->>'text', at,
       data->>'reply_to', data->>'smsc_message_id'
FROM pg_temp.batch_events WHERE fresh AND type = 'inbound'
"""

# messages.state is the fold's state name (core.domain.message.evolve), which is the event type
# except for these.
# Event types whose `messages.state` name differs (the fold's state after them).
STATE_OF_TYPE = {"requeued": "retry"}
_STATE_EXPR = (
    "CASE f.type " + " ".join(f"WHEN '{t}' THEN '{st}'" for t, st in STATE_OF_TYPE.items()) + " ELSE f.type END"
)

# A message's row exists before the merge below, so the merge is a single UPDATE that can compare
# each event's seq with the row's last_seq.
_INSERT_MESSAGES = """
INSERT INTO {s}.messages (message_id, tenant_id, channel)
SELECT DISTINCT ON (message_id) message_id, tenant_id, channel
FROM pg_temp.batch_events WHERE fresh ORDER BY message_id, seq
ON CONFLICT (message_id) DO NOTHING
"""

# (messages column, temp column) whose newest value wins: taken from the newest fresh event above
# last_seq that carries it; failing that the row keeps its value; failing that (a NULL column and
# only older events) the newest older value fills it.
_LATEST_WINS = (
    ("tenant_id", "tenant_id"), ("channel", "channel"), ("route_id", "route_id"),
    ("campaign_id", "campaign_id"), ("to_number", "to_number"), ("sender", "sender"),
    ("encoding", "encoding"), ("parts", "parts"), ("price_per_part_minor", "price_per_part"),
    ("currency", "currency"), ("smsc_message_id", "smsc_message_id"), ("error_code", "error_code"),
)  # fmt: skip
# Stage timestamps: the earliest event of the stage (LEAST ignores NULLs, so this also fills a NULL
# column, and the result does not depend on the order events arrive in).
_STAGES = (
    ("accepted_at", "('accepted')"), ("routed_at", "('routed')"), ("sent_at", "('sent')"),
    ("delivered_at", "('delivered', 'undelivered', 'expired')"), ("failed_at", "('failed')"),
    ("billed_at", "('billed')"),
)  # fmt: skip


def _merge_messages_sql() -> str:
    aggs = []
    sets = []
    for col, src in _LATEST_WINS:
        aggs.append(
            f"(array_agg(f.{src} ORDER BY f.seq DESC) "
            f"FILTER (WHERE f.{src} IS NOT NULL AND f.seq > m.last_seq))[1] AS fwd_{col}, "
            f"(array_agg(f.{src} ORDER BY f.seq DESC) FILTER (WHERE f.{src} IS NOT NULL))[1] AS any_{col}"
        )
        sets.append(f"{col} = coalesce(a.fwd_{col}, m.{col}, a.any_{col})")
    for col, types in _STAGES:
        aggs.append(f"min(f.at) FILTER (WHERE f.type IN {types}) AS {col}")
        sets.append(f"{col} = least(m.{col}, a.{col})")
    return f"""
WITH a AS (
    SELECT f.message_id, max(f.seq) AS max_seq, max(f.at) AS max_at,
        (array_agg({_STATE_EXPR} ORDER BY f.seq DESC)
            FILTER (WHERE f.type <> 'billed' AND f.seq > m.state_seq))[1] AS state,
        max(f.seq) FILTER (WHERE f.type <> 'billed') AS state_seq,
        bool_or(f.type = 'billed') AS billed,
        sum(f.amount) FILTER (WHERE f.type = 'billed') AS amount,
        max(f.attempt) AS attempts,
        {", ".join(aggs)}
    FROM pg_temp.batch_events f JOIN {{s}}.messages m ON m.message_id = f.message_id
    WHERE f.fresh
    GROUP BY f.message_id, m.last_seq, m.state_seq
)
UPDATE {{s}}.messages m SET
    state = coalesce(a.state, m.state),
    state_seq = greatest(m.state_seq, a.state_seq),
    last_seq = greatest(m.last_seq, a.max_seq),
    billed = m.billed OR a.billed,
    amount_minor = CASE WHEN a.billed THEN coalesce(m.amount_minor, 0) + coalesce(a.amount, 0)
                        ELSE m.amount_minor END,
    attempts = greatest(m.attempts, a.attempts),
    updated_at = greatest(m.updated_at, a.max_at),
    {", ".join(sets)}
FROM a WHERE m.message_id = a.message_id
"""


# A row with neither token nor cluster time means "replay in progress": it only counts events.
# last_event_at and scan_from only move forward (greatest() ignores NULL: NULL keeps the value).
_SAVE_CHECKPOINT = """
INSERT INTO {s}.checkpoints AS c
    (projection, resume_token, cluster_time, events_applied, last_event_at, scan_from, updated_at)
VALUES (%(name)s, %(token)s::jsonb, %(ct)s, %(n)s, %(last_at)s, %(scan_from)s, now())
ON CONFLICT (projection) DO UPDATE SET
    resume_token = coalesce(EXCLUDED.resume_token, c.resume_token),
    cluster_time = coalesce(EXCLUDED.cluster_time, c.cluster_time),
    events_applied = c.events_applied + EXCLUDED.events_applied,
    last_event_at = greatest(c.last_event_at, EXCLUDED.last_event_at),
    scan_from = greatest(c.scan_from, EXCLUDED.scan_from),
    updated_at = now()
"""


@dataclass(frozen=True)
class Checkpoint:
    """Where a projection resumes: after `resume_token`, else at `cluster_time`.

    `scan_from` bounds the catch-up scan that follows every (re)open (see the module docstring);
    `last_event_at` is the greatest `at` applied so far (for lag reports).
    """

    resume_token: Mapping[str, Any] | None
    cluster_time: Timestamp | None
    events_applied: int
    scan_from: datetime | None = None
    last_event_at: datetime | None = None


class BatchWriter:
    """Writes batches of event rows into one reporting schema; owns the SQL.

    The connection passed to each method must be in autocommit mode (each write opens its own
    transaction) and must have been through `prepare()` (it creates the temp table there).
    """

    def __init__(self, schema: str, name: str = "reporting") -> None:
        self.schema = schema
        self.name = name
        s = sql.Identifier(schema)
        self._insert_events = sql.SQL(_INSERT_EVENTS).format(s=s)
        self._upsert_daily = sql.SQL(_UPSERT_DAILY).format(s=s)
        self._insert_messages = sql.SQL(_INSERT_MESSAGES).format(s=s)
        self._merge_messages = sql.SQL(_merge_messages_sql()).format(s=s)
        self._insert_ledger = sql.SQL(_INSERT_LEDGER).format(s=s)
        self._ledger_campaign = sql.SQL(_LEDGER_CAMPAIGN).format(s=s)
        self._insert_inbound = sql.SQL(_INSERT_INBOUND).format(s=s)
        self._save_checkpoint = sql.SQL(_SAVE_CHECKPOINT).format(s=s)
        self._load_checkpoint = sql.SQL(
            "SELECT resume_token::text, cluster_time, events_applied, scan_from, last_event_at"
            " FROM {s}.checkpoints WHERE projection = %s"
        ).format(s=s)
        self._copy = sql.SQL("COPY pg_temp.batch_events ({}) FROM STDIN").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in _ROW_COLUMNS)
        )

    async def prepare(self, conn: psycopg.AsyncConnection) -> None:
        await conn.execute(_CREATE_TEMP)

    async def write(
        self,
        conn: psycopg.AsyncConnection,
        rows: Sequence[tuple[Any, ...]],
        *,
        checkpoint: bool = True,
        resume_token: Mapping[str, Any] | None = None,
        cluster_time: Timestamp | None = None,
        scan_from: datetime | None = None,
    ) -> int:
        """Apply `rows` (from `event_row`) in one transaction; return how many were new.

        With `checkpoint`, the same transaction records the position (resume token and/or cluster
        time and/or scan_from; None keeps the stored value), moves `last_event_at` to the newest
        `at` in `rows`, and adds the new events to `events_applied`.
        """
        rows = dedupe_rows(rows)
        async with conn.transaction():
            applied = 0
            if rows:
                async with conn.cursor() as cur:
                    async with cur.copy(self._copy) as copy:
                        for row in rows:
                            await copy.write_row(row)
                    await cur.execute(self._insert_events)
                    applied = max(cur.rowcount, 0)
                    if applied:
                        await cur.execute(self._upsert_daily)
                        await cur.execute(self._insert_messages)
                        await cur.execute(self._merge_messages)
                        kinds = {row[2] for row in rows}
                        if "billed" in kinds:
                            await cur.execute(self._insert_ledger)
                        if "accepted" in kinds:
                            await cur.execute(self._ledger_campaign)
                        if "inbound" in kinds:
                            await cur.execute(self._insert_inbound)
                    # ON COMMIT DELETE ROWS would do it too, but an explicit empty keeps the next
                    # batch correct should this ever run inside a caller's longer transaction.
                    await cur.execute("DELETE FROM pg_temp.batch_events")
            if checkpoint:
                last_at = max((r[3] for r in rows), default=None)
                await self._write_checkpoint(conn, resume_token, cluster_time, applied, last_at, scan_from)
        return applied

    async def save_checkpoint(
        self,
        conn: psycopg.AsyncConnection,
        resume_token: Mapping[str, Any] | None,
        cluster_time: Timestamp | None = None,
        scan_from: datetime | None = None,
    ) -> None:
        """Record the position alone (an empty batch moved the resume token, a scan finished)."""
        async with conn.transaction():
            await self._write_checkpoint(conn, resume_token, cluster_time, 0, None, scan_from)

    async def _write_checkpoint(
        self,
        conn: psycopg.AsyncConnection,
        resume_token: Mapping[str, Any] | None,
        cluster_time: Timestamp | None,
        applied: int,
        last_event_at: datetime | None,
        scan_from: datetime | None,
    ) -> None:
        params = {
            "name": self.name,
            "token": None if resume_token is None else json_util.dumps(resume_token),
            "ct": None if cluster_time is None else ts_to_int(cluster_time),
            "n": applied,
            "last_at": last_event_at,
            "scan_from": scan_from,
        }
        await conn.execute(self._save_checkpoint, params)

    async def load_checkpoint(self, conn: psycopg.AsyncConnection) -> Checkpoint | None:
        """The stored position, or None when there is none (or only an unfinished replay's)."""
        cur = await conn.execute(self._load_checkpoint, (self.name,))
        row = await cur.fetchone()
        if row is None or (row[0] is None and row[1] is None):
            return None
        token = None if row[0] is None else json_util.loads(row[0])
        cluster_time = None if row[1] is None else int_to_ts(row[1])
        return Checkpoint(token, cluster_time, row[2], scan_from=row[3], last_event_at=row[4])


async def apply_events(
    conn_or_url: psycopg.AsyncConnection | str, schema: str, docs: Iterable[Mapping[str, Any]]
) -> int:
    """Apply event documents to `schema` in one transaction, no checkpoint; return how many were new.

    A test and repair hook: the same code path as the projector's batches. The schema must exist
    (see `projections.schema.migrate`).
    """
    writer = BatchWriter(schema)
    rows = [event_row(d) for d in docs]
    if isinstance(conn_or_url, str):
        async with await psycopg.AsyncConnection.connect(conn_or_url, autocommit=True) as conn:
            await writer.prepare(conn)
            return await writer.write(conn, rows, checkpoint=False)
    await writer.prepare(conn_or_url)
    return await writer.write(conn_or_url, rows, checkpoint=False)


# --- replay of the existing log --------------------------------------------------------------------


async def cluster_time_now(events: AsyncCollection) -> Timestamp:
    """The server's current cluster time (a change stream started here misses nothing after it)."""
    reply = await events.database.command("hello")
    ts = reply.get("operationTime") or reply.get("$clusterTime", {}).get("clusterTime")
    if not isinstance(ts, Timestamp):
        raise RuntimeError("MongoDB did not report a cluster time: is it a replica set?")
    return ts


async def replay_log(
    events: AsyncCollection,
    conn: psycopg.AsyncConnection,
    writer: BatchWriter,
    *,
    batch_size: int = 1000,
    stats: ProjectorStats | None = None,
    start: Timestamp | None = None,
    started_at: datetime | None = None,
) -> Timestamp:
    """Scan the whole log into the writer's schema; return the cluster time noted before the scan.

    `start`, if given, is a cluster time the caller noted before anything else it did (e.g.
    before opening its change stream); otherwise it is noted here. The checkpoint then holds that
    cluster time (and no token), so a change stream opened at it sees everything inserted during
    or after the scan; the overlap is absorbed by the idempotent inserts. Until the last batch
    commits the checkpoint says "replay in progress", so a crash in the middle restarts the replay
    (harmlessly) instead of following from a half-built state. `started_at` is the wall-clock
    time noted together with `start` (by the caller, or here): it becomes the checkpoint's
    `scan_from`, since every event the scan may have missed was committed after it.
    """
    if start is None:
        started_at = wall_now()
        start = await cluster_time_now(events)
    elif started_at is None:
        raise ValueError("replay_log: `started_at` must come with `start`")
    log.info("projection %s schema %s: replaying the log (cluster time %s)", writer.name, writer.schema, start)
    stats = stats if stats is not None else ProjectorStats()
    rows: list[tuple[Any, ...]] = []
    cursor = events.find({}, sort=[("message_id", 1), ("seq", 1)], batch_size=batch_size)
    async for doc in cursor:
        rows.append(event_row(doc))
        if len(rows) >= batch_size:
            await _write_replay_batch(conn, writer, rows, stats)
            rows = []
    await _write_replay_batch(conn, writer, rows, stats)
    await writer.save_checkpoint(conn, None, start, scan_from=started_at)
    log.info("projection %s schema %s: replay done, %d events applied", writer.name, writer.schema, stats.applied)
    return start


async def _write_replay_batch(
    conn: psycopg.AsyncConnection, writer: BatchWriter, rows: list[tuple[Any, ...]], stats: ProjectorStats
) -> None:
    applied = await writer.write(conn, rows)
    stats.received += len(rows)
    stats.applied += applied
    if rows:
        stats.batches += 1
        stats.saw(max(r[3] for r in rows))


# --- the projector ---------------------------------------------------------------------------------


@dataclass
class CatchUp:
    """An unfinished catch-up scan: events with `_id` in [lo, hi], read in `_id` order.

    `opened_at` is the wall-clock time noted just before the change stream was (re)opened; once
    the scan is done it becomes the checkpoint's `scan_from`.
    """

    lo: ObjectId | None  # None: from the start of the log (a checkpoint that predates scan_from)
    hi: ObjectId
    opened_at: datetime
    after: ObjectId | None = None  # the last `_id` applied by this scan

    def query(self) -> dict[str, Any]:
        bounds: dict[str, Any] = {"$lte": self.hi}
        if self.after is not None:
            bounds["$gt"] = self.after
        elif self.lo is not None:
            bounds["$gte"] = self.lo
        return {"_id": bounds}


class Projector:
    """Follows `events` into the reporting tables of `schema` until stopped.

    `run()` retries transient MongoDB/PostgreSQL errors with back-off, resuming from the stored
    checkpoint; it raises ResumeTokenLost, UnprojectableEvent or ChangeStreamInvalidated, which
    need an operator.
    """

    def __init__(
        self,
        events: AsyncCollection,
        pg_url: str,
        schema: str,
        *,
        name: str = "reporting",
        batch_size: int = 1000,
        batch_wait_s: float = 0.2,
        checkpoint_interval_s: float = 5.0,
        standby_poll_s: float = 1.0,
        max_backoff_s: float = 30.0,
        catchup_margin_s: float = 300.0,
    ) -> None:
        self.events = events
        self.pg_url = pg_url
        self.schema = schema
        self.name = name
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.standby_poll_s = standby_poll_s
        self.max_backoff_s = max_backoff_s
        self.catchup_margin = timedelta(seconds=catchup_margin_s)
        self.stats = ProjectorStats()
        self._writer = BatchWriter(schema, name)
        self._lock_key = lock_key("projection", schema, name)
        self._backoff_s = _MIN_BACKOFF_S
        # The checkpoint's scan_from as this session knows it (it alone writes the checkpoint).
        self._scan_from: datetime | None = None
        self._catchup: CatchUp | None = None

    @property
    def applied(self) -> int:
        return self.stats.applied

    @property
    def batches(self) -> int:
        return self.stats.batches

    @property
    def last_event_at(self) -> datetime | None:
        return self.stats.last_event_at

    async def run(self, stop: asyncio.Event) -> None:
        """Project until `stop` is set. Transient errors are retried; fatal ones are raised."""
        while not stop.is_set():
            try:
                await self._session(stop)
                return
            except TRANSIENT_ERRORS as e:
                backoff = self._backoff_s
                # Doubling until a session gets as far as the lock again (which resets it).
                self._backoff_s = min(backoff * 2, self.max_backoff_s)
                self.stats.active = False
                log.warning(
                    "projection %s schema %s: %s: %s; reconnecting in %.1fs",
                    self.name, self.schema, type(e).__name__, e, backoff,
                )  # fmt: skip
                await sleep_or_stop(stop, backoff)
            except asyncio.CancelledError:
                self.stats.active = self.stats.standby = False
                raise
            except Exception:
                self.stats.active = self.stats.standby = False
                log.exception("projection %s schema %s: stopped", self.name, self.schema)
                raise
        self.stats.active = self.stats.standby = False

    async def _session(self, stop: asyncio.Event) -> None:
        # application_name lets an operator (or a test) find this session in pg_stat_activity.
        app_name = f"msgcore-projector {self.name} {self.schema}"[:63]
        async with await psycopg.AsyncConnection.connect(
            self.pg_url, autocommit=True, application_name=app_name
        ) as conn:
            await migrate(conn, self.schema)
            if not await self._acquire_lock(conn, stop):
                return
            try:
                await self._writer.prepare(conn)
                self._catchup = None
                checkpoint = await self._writer.load_checkpoint(conn)
                if checkpoint is None:
                    stream = await self._replay_then_stream(conn)
                else:
                    self._scan_from = self._initial_scan_from(checkpoint)
                    opened_at = wall_now()
                    stream = await self._open_stream(checkpoint)
                    self._start_catchup(opened_at)
                async with stream:
                    await self._follow(conn, stream, stop)
            finally:
                self.stats.active = False
                self.stats.catchup_pending = False
                self._catchup = None
        # Closing the connection released the advisory lock; a standby takes over.

    async def _acquire_lock(self, conn: psycopg.AsyncConnection, stop: asyncio.Event) -> bool:
        """Wait (as hot standby) until this projector holds the lock; False if stopped first."""
        announced = False
        while not stop.is_set():
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (self._lock_key,))
            row = await cur.fetchone()
            if row is not None and row[0]:
                self.stats.active, self.stats.standby = True, False
                self._backoff_s = _MIN_BACKOFF_S
                log.info("projection %s schema %s: active (lock %d held)", self.name, self.schema, self._lock_key)
                return True
            self.stats.standby = True
            if not announced:
                log.info(
                    "projection %s schema %s: another projector holds lock %d; standing by",
                    self.name, self.schema, self._lock_key,
                )  # fmt: skip
                announced = True
            await sleep_or_stop(stop, self.standby_poll_s)
        return False

    async def _replay_then_stream(self, conn: psycopg.AsyncConnection) -> AsyncCollectionChangeStream:
        """Replay the existing log, returning a change stream that continues without a gap.

        The stream is opened (at "now") BEFORE the scan rather than afterwards at the noted
        cluster time: everything committed before the open is seen by the scan, everything after
        by the stream, and the overlap is absorbed by the idempotent inserts. Opening at a past
        cluster time makes the server search its oplog, and SecantusDB 0.7.0b3 was seen to return
        an empty first batch whose postBatchResumeToken had moved past inserts that committed
        during that search; a stream opened at "now" has no such window.
        """
        started_at = wall_now()
        start = await cluster_time_now(self.events)
        stream = await self._open_stream(Checkpoint(None, None, 0))
        try:
            await replay_log(
                self.events, conn, self._writer,
                batch_size=self.batch_size, stats=self.stats, start=start, started_at=started_at,
            )  # fmt: skip
        except BaseException:
            await stream.close()
            raise
        self._scan_from = started_at
        return stream

    def _initial_scan_from(self, checkpoint: Checkpoint) -> datetime | None:
        """The catch-up scan's lower bound (before the margin); None scans the whole log."""
        if checkpoint.scan_from is not None:
            return checkpoint.scan_from
        if checkpoint.cluster_time is not None:
            # A checkpoint written before scan_from existed: the cluster time of the newest applied
            # change (or of a replay's start) is a commit time on the server's clock.
            return datetime.fromtimestamp(checkpoint.cluster_time.time, UTC)
        log.warning(
            "projection %s schema %s: checkpoint has no scan_from nor cluster time; the catch-up scan "
            "reads the whole log once", self.name, self.schema,
        )  # fmt: skip
        return None

    def _start_catchup(self, opened_at: datetime) -> None:
        """Schedule a scan of everything that may have committed since the checkpoint.

        Called once the change stream is open (again): what commits from now on, the stream
        delivers; what committed before, the scan finds (it runs after this point).
        """
        lo = None if self._scan_from is None else ObjectId.from_datetime(self._scan_from - self.catchup_margin)
        if self._catchup is not None:
            # A reopen during an unfinished scan: keep its lower bound and progress, widen its end.
            lo, opened_at = self._catchup.lo, self._catchup.opened_at
        hi = ObjectId.from_datetime(wall_now() + self.catchup_margin)
        after = self._catchup.after if self._catchup is not None else None
        self._catchup = CatchUp(lo=lo, hi=hi, opened_at=opened_at, after=after)
        self.stats.catchup_pending = True
        log.info(
            "projection %s schema %s: catch-up scan of events with _id time in [%s, %s]", self.name, self.schema,
            "start of log" if lo is None else lo.generation_time.isoformat(), hi.generation_time.isoformat(),
        )  # fmt: skip

    async def _open_stream(self, checkpoint: Checkpoint) -> AsyncCollectionChangeStream:
        kwargs: dict[str, Any] = {
            "pipeline": [{"$match": {"operationType": "insert"}}],
            "batch_size": self.batch_size,
            "max_await_time_ms": max(10, int(self.batch_wait_s * 1000)),
        }
        if checkpoint.resume_token is not None:
            kwargs["resume_after"] = checkpoint.resume_token
        elif checkpoint.cluster_time is not None:
            kwargs["start_at_operation_time"] = checkpoint.cluster_time
        try:
            stream = await self.events.watch(**kwargs)
        except OperationFailure as e:
            raise self._translate(e) from e
        self.stats.streams_opened += 1
        log.info(
            "projection %s schema %s: following events from %s",
            self.name, self.schema, "resume token" if checkpoint.resume_token else (checkpoint.cluster_time or "now"),
        )  # fmt: skip
        return stream

    def _translate(self, e: OperationFailure) -> Exception:
        if e.code in _HISTORY_LOST_CODES or "resume" in str(e).lower():
            return ResumeTokenLost(self.schema, self.name, f"code {e.code}: {e}")
        return e

    async def _follow(
        self, conn: psycopg.AsyncConnection, stream: AsyncCollectionChangeStream, stop: asyncio.Event
    ) -> None:
        loop = asyncio.get_running_loop()
        saved_token: Mapping[str, Any] | None = None
        saved_at = loop.time()
        while not stop.is_set():
            changes = await self._collect(stream, stop)
            token = stream.resume_token
            if changes:
                await self._apply_changes(conn, changes, token)
                saved_token, saved_at = token, loop.time()
            elif token is not None and token != saved_token and loop.time() - saved_at >= self.checkpoint_interval_s:
                # Keep the position moving on a quiet log, so that it stays inside the oplog window.
                await self._writer.save_checkpoint(conn, token)
                saved_token, saved_at = token, loop.time()
            if self._catchup is not None and not stop.is_set():
                await self._catchup_step(conn, self._catchup)

    async def _catchup_step(self, conn: psycopg.AsyncConnection, catchup: CatchUp) -> None:
        """Apply the next page of the catch-up scan (one transaction); finish it on the last page."""
        cursor = self.events.find(catchup.query(), sort=[("_id", 1)], limit=self.batch_size)
        docs = await cursor.to_list(None)
        done = len(docs) < self.batch_size
        rows = [event_row(d) for d in docs]
        # The last page also moves scan_from, in the same transaction: the scan is then complete.
        scan_from = catchup.opened_at if done else None
        applied = await self._writer.write(conn, rows, scan_from=scan_from)
        if docs:
            catchup.after = docs[-1]["_id"]
            self.stats.received += len(rows)
            self.stats.applied += applied
            self.stats.batches += 1
            self.stats.catchup_scanned += len(rows)
            self.stats.catchup_applied += applied
            self.stats.saw(max(r[3] for r in rows))
            if applied:
                log.info(
                    "projection %s schema %s: catch-up scan applied %d events the change stream had not "
                    "delivered (yet)", self.name, self.schema, applied,
                )  # fmt: skip
        if done:
            self._scan_from = max(self._scan_from or catchup.opened_at, catchup.opened_at)
            self._catchup = None
            self.stats.catchup_pending = False
            self.stats.catchups_done += 1
            log.info(
                "projection %s schema %s: catch-up scan done (%d events read since the stream opened)",
                self.name, self.schema, self.stats.catchup_scanned,
            )  # fmt: skip

    async def _collect(self, stream: AsyncCollectionChangeStream, stop: asyncio.Event) -> list[Mapping[str, Any]]:
        """Changes until batch_size of them, or batch_wait_s has passed, or stop is set."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        batch: list[Mapping[str, Any]] = []
        while len(batch) < self.batch_size:
            # The driver resumes a change stream by itself after some errors (a new server cursor
            # opened with resumeAfter): that reopen gets the same catch-up scan as ours.
            cursor_before, opened_at = getattr(stream, "_cursor", None), wall_now()
            try:
                change = await stream.try_next()
            except OperationFailure as e:
                raise self._translate(e) from e
            if getattr(stream, "_cursor", None) is not cursor_before:
                self.stats.streams_opened += 1
                log.info("projection %s schema %s: the driver resumed the change stream", self.name, self.schema)
                self._start_catchup(opened_at)
            if change is not None:
                batch.append(change)
                continue
            if not stream.alive:
                raise ChangeStreamInvalidated(
                    f"projection {self.name} schema {self.schema}: the change stream on "
                    f"{self.events.full_name} ended (collection dropped or renamed?)"
                )
            if stop.is_set() or loop.time() >= deadline:
                break
        return batch

    async def _apply_changes(
        self, conn: psycopg.AsyncConnection, changes: list[Mapping[str, Any]], token: Mapping[str, Any] | None
    ) -> None:
        rows = []
        for change in changes:
            doc = change.get("fullDocument")
            if doc is None:
                key = change.get("documentKey")
                raise UnprojectableEvent(None, None, f"insert change without fullDocument (documentKey {key})")
            rows.append(event_row(doc))
        cluster_time = changes[-1].get("clusterTime")
        # Everything committed after this batch has a later `_id` time, up to the margin; but
        # while a catch-up scan is unfinished, events it has yet to find may be older still.
        scan_from = None
        if self._catchup is None:
            newest = newest_id_time(change["fullDocument"] for change in changes)
            if newest is not None and (self._scan_from is None or newest > self._scan_from):
                self._scan_from = scan_from = newest
        applied = await self._writer.write(
            conn, rows, resume_token=token, cluster_time=cluster_time, scan_from=scan_from
        )
        self.stats.received += len(rows)
        self.stats.applied += applied
        self.stats.batches += 1
        self.stats.saw(max(r[3] for r in rows))
        log.debug(
            "projection %s schema %s: batch of %d events, %d new, up to message_id=%s seq=%s",
            self.name, self.schema, len(rows), applied, rows[-1][0], rows[-1][1],
        )  # fmt: skip
