"""The batch writer: one PostgreSQL transaction per batch, holding the rows AND the checkpoint.

Exactly-once effect: every batch is ONE transaction holding the audit rows, the `messages`,
`daily_stats`, `billing_ledger` and `inbound` changes and the checkpoint (resume token, cluster time,
`scan_from`). Events are inserted into `message_events` with ON CONFLICT DO NOTHING, and only the
rows actually inserted (`fresh`) move the other tables; so a replayed or duplicated event changes
nothing, and after any crash the tables equal a fresh replay of the log. The order in which events
reach the writer does not matter for `state` (see `state_seq`) nor for the stage timestamps.

Rows come from `projections.rows.event_row`; who feeds the writer is `projections.replay` (a scan
of the whole log) and `projections.runner` (the change stream and its catch-up scans).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from core import metrics
from core.store.change_feed import ClusterTime, int_to_ts, token_from_json, token_to_json, ts_to_int
from projections.rows import ROW_COLUMNS, dedupe_rows, event_row


@dataclass
class ProjectorStats:
    """Counters of one Projector (or replay) instance, since it was created."""

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


# The checkpoint's cluster_time column is a bigint: `ts_to_int` / `int_to_ts` (re-exported here).
__all__ = ["ENTRY_TYPES", "FACTLESS_TYPES", "STATELESS_TYPES", "STATE_OF_TYPE", "BatchWriter", "Checkpoint",
           "ProjectorStats", "apply_events", "int_to_ts", "ts_to_int"]  # fmt: skip


# --- SQL -------------------------------------------------------------------------------------------

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

_FRESH_COUNT = sql.SQL("SELECT count(*) FROM pg_temp.batch_events WHERE fresh")
_BEGIN, _COMMIT = sql.SQL("BEGIN"), sql.SQL("COMMIT")


async def _rollback(conn: psycopg.AsyncConnection) -> None:
    """End a failed batch's transaction (nothing of it is kept; the temp table is emptied with it)."""
    if conn.closed or conn.info.transaction_status == TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):
        await conn.execute("ROLLBACK")

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

_INSERT_SUPPRESSION_CHANGES = """
INSERT INTO {s}.suppression_changes (message_id, seq, tenant_id, channel, address, scope, change, source, actor,
                                     reason, keyword, changed_at)
SELECT message_id, seq, tenant_id, channel, data->>'address', data->>'scope', type, data->>'source',
       data->>'actor', data->>'reason', data->>'keyword', at
FROM pg_temp.batch_events WHERE fresh AND type IN ('opted_out', 'opted_in')
"""

_INSERT_INBOUND = """
INSERT INTO {s}.inbound (message_id, seq, tenant_id, route_id, channel, from_number, to_number, text,
                         received_at, reply_to, smsc_message_id)
SELECT message_id, seq, tenant_id, route_id, channel, data->>'from', data->>'to', data->>'text', at,
       data->>'reply_to', data->>'smsc_message_id'
FROM pg_temp.batch_events WHERE fresh AND type = 'inbound'
"""

# messages.state is the fold's state name (core.domain.message.evolve), which is the event type
# except for these: event types whose `messages.state` name differs (the fold's state after them).
STATE_OF_TYPE = {"requeued": "retry"}
# Event types that never move `messages.state` (nor `state_seq`): `billed` sets billed/amount
# instead; `released` (a timer handed a waiting message back to a stage) changes nothing about the
# message. Both still count in `message_events`, `daily_stats`, `last_seq` and `updated_at`.
STATELESS_TYPES = frozenset({"billed", "released"})
# Event types that state no fact about the message: they fill no column of `messages` either (no
# stage timestamp by construction of `_STAGES`, no latest-wins value such as route_id).
FACTLESS_TYPES = frozenset({"released"})
# The event types of a suppression entry's stream (core/domain/consent.py): not a message, so no
# `messages` row (its changes are in `suppression_changes`).
ENTRY_TYPES = frozenset({"opted_out", "opted_in"})
_STATE_EXPR = (
    "CASE f.type " + " ".join(f"WHEN '{t}' THEN '{st}'" for t, st in STATE_OF_TYPE.items()) + " ELSE f.type END"
)


def _sql_list(values: Iterable[str]) -> str:
    """`('a', 'b')` for a SQL IN list of our own constants (never user input)."""
    return "(" + ", ".join(f"'{v}'" for v in sorted(values)) + ")"


# A message's row exists before the merge below, so the merge is a single UPDATE that can compare
# each event's seq with the row's last_seq.
_INSERT_MESSAGES = """
INSERT INTO {s}.messages (message_id, tenant_id, channel)
SELECT DISTINCT ON (message_id) message_id, tenant_id, channel
FROM pg_temp.batch_events WHERE fresh AND type NOT IN {entry_types} ORDER BY message_id, seq
ON CONFLICT (message_id) DO NOTHING
""".replace("{entry_types}", _sql_list(ENTRY_TYPES))

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
    carries = f"f.type NOT IN {_sql_list(FACTLESS_TYPES)}"
    for col, src in _LATEST_WINS:
        aggs.append(
            f"(array_agg(f.{src} ORDER BY f.seq DESC) "
            f"FILTER (WHERE f.{src} IS NOT NULL AND {carries} AND f.seq > m.last_seq))[1] AS fwd_{col}, "
            f"(array_agg(f.{src} ORDER BY f.seq DESC) FILTER (WHERE f.{src} IS NOT NULL AND {carries}))[1]"
            f" AS any_{col}"
        )
        sets.append(f"{col} = coalesce(a.fwd_{col}, m.{col}, a.any_{col})")
    for col, types in _STAGES:
        aggs.append(f"min(f.at) FILTER (WHERE f.type IN {types}) AS {col}")
        sets.append(f"{col} = least(m.{col}, a.{col})")
    stateless = _sql_list(STATELESS_TYPES)
    return f"""
WITH a AS (
    SELECT f.message_id, max(f.seq) AS max_seq, max(f.at) AS max_at,
        (array_agg({_STATE_EXPR} ORDER BY f.seq DESC)
            FILTER (WHERE f.type NOT IN {stateless} AND f.seq > m.state_seq))[1] AS state,
        max(f.seq) FILTER (WHERE f.type NOT IN {stateless}) AS state_seq,
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
VALUES (%(name)s, %(token)s::jsonb, %(ct)s, {n}, %(last_at)s, %(scan_from)s, now())
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

    `scan_from` bounds the catch-up scan that follows every (re)open (see `projections.catchup`);
    `last_event_at` is the greatest `at` applied so far (for lag reports).
    """

    resume_token: Mapping[str, Any] | None
    cluster_time: ClusterTime | None
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
        suppression_changes = sql.SQL(_INSERT_SUPPRESSION_CHANGES).format(s=s)
        # Statements run only when the batch holds an event of that type.
        self._by_kind = (
            ({"billed"}, self._insert_ledger), ({"accepted"}, self._ledger_campaign),
            ({"inbound"}, self._insert_inbound), (ENTRY_TYPES, suppression_changes),
        )  # fmt: skip
        self._save_counted = sql.SQL(_SAVE_CHECKPOINT).format(s=s, n=sql.SQL("({})").format(_FRESH_COUNT))
        self._save_position = sql.SQL(_SAVE_CHECKPOINT).format(s=s, n=sql.Literal(0))
        self._load_checkpoint = sql.SQL(
            "SELECT resume_token::text, cluster_time, events_applied, scan_from, last_event_at"
            " FROM {s}.checkpoints WHERE projection = %s"
        ).format(s=s)
        self._copy = sql.SQL("COPY pg_temp.batch_events ({}) FROM STDIN").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in ROW_COLUMNS)
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
        cluster_time: ClusterTime | None = None,
        scan_from: datetime | None = None,
    ) -> int:
        """Apply `rows` (from `event_row`) in one transaction; return how many were new.

        With `checkpoint`, the same transaction records the position (resume token and/or cluster
        time and/or scan_from; None keeps the stored value), moves `last_event_at` to the newest
        `at` in `rows`, and adds the new events to `events_applied`.
        """
        rows = dedupe_rows(rows)
        if not rows:
            if checkpoint:
                await self.save_checkpoint(conn, resume_token, cluster_time, scan_from)
            return 0
        if not conn.autocommit or conn.info.transaction_status != TransactionStatus.IDLE:
            raise ValueError("BatchWriter.write needs an autocommit connection outside a transaction")
        kinds = {row[2] for row in rows}
        async with conn.cursor() as cur:
            try:
                # One transaction, begun and committed by hand so that COMMIT travels with the
                # statements: after the COPY they are pipelined (sent together, no wait for each
                # result; psycopg prepares them once they repeat). The commit empties the temp table.
                await cur.execute(_BEGIN)
                async with cur.copy(self._copy) as copy:
                    for row in rows:
                        await copy.write_row(row)
                async with conn.pipeline():
                    for stmt in (self._insert_events, self._upsert_daily, self._insert_messages, self._merge_messages):
                        await cur.execute(stmt)
                    for wanted, stmt in self._by_kind:
                        if kinds & wanted:
                            await cur.execute(stmt)
                    if checkpoint:
                        last_at = max(r[3] for r in rows)
                        await self._write_checkpoint(cur, resume_token, cluster_time, last_at, scan_from)
                    count = await conn.execute(_FRESH_COUNT)
                    await cur.execute(_COMMIT)
                fresh = await count.fetchone()
            except BaseException:
                await _rollback(conn)
                raise
        applied = int(fresh[0]) if fresh is not None else 0
        metrics.PROJECTOR_EVENTS.inc(applied)
        return applied

    async def save_checkpoint(
        self,
        conn: psycopg.AsyncConnection,
        resume_token: Mapping[str, Any] | None,
        cluster_time: ClusterTime | None = None,
        scan_from: datetime | None = None,
    ) -> None:
        """Record the position alone (an empty batch moved the resume token, a scan finished)."""
        async with conn.cursor() as cur:
            await self._write_checkpoint(cur, resume_token, cluster_time, None, scan_from, counted=False)

    async def _write_checkpoint(
        self,
        cur: psycopg.AsyncCursor[Any],
        resume_token: Mapping[str, Any] | None,
        cluster_time: ClusterTime | None,
        last_event_at: datetime | None,
        scan_from: datetime | None,
        *,
        counted: bool = True,
    ) -> None:
        """Upsert the checkpoint; `counted` adds the batch's fresh events to `events_applied`."""
        params = {
            "name": self.name,
            "token": None if resume_token is None else token_to_json(resume_token),
            "ct": None if cluster_time is None else ts_to_int(cluster_time),
            "last_at": last_event_at,
            "scan_from": scan_from,
        }
        await cur.execute(self._save_counted if counted else self._save_position, params)

    async def load_checkpoint(self, conn: psycopg.AsyncConnection) -> Checkpoint | None:
        """The stored position, or None when there is none (or only an unfinished replay's)."""
        cur = await conn.execute(self._load_checkpoint, (self.name,))
        row = await cur.fetchone()
        if row is None or (row[0] is None and row[1] is None):
            return None
        token = None if row[0] is None else token_from_json(row[0])
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
