"""`msgcore verify`: nothing lost, nothing sent twice unknowingly.

Checks the two stores against the log, which is the truth:

1. heads: every head in `streams` equals the fold of its events (state, version, tenant, route,
   SMSC ids, billed, parts, queue); a head without events, events without a head, and a stream that
   does not fold (unreadable event, gap in seq, invalid transition) are discrepancies.
2. audit copy: every event is in `{schema}.message_events` exactly once (same message_id, seq,
   type) and nothing else is there. Events the projector may not have reached yet are counted as
   `not_yet_projected`, not reported (see `VerifyReport.pending_after`).
3. progress: every message is terminal (state in TERMINAL_STATES and no stage left, i.e. billed if
   billable), or in flight: its head sits in a queue whose `due_at` is less than `stale_after_s`
   old. A head overdue by more than that is `stuck` (no worker is processing its stage).
4. reporting: `{schema}.daily_stats` equals its recount from `message_events`, and every
   `{schema}.messages` row agrees with the events projected for it (state, last_seq, billed, amount).
5. duplicates: `sent` events marked `possible_duplicate` are listed as notes (explained); a second
   `sent` of a message with neither that mark nor a `retry` since the previous `sent` is a
   discrepancy (`duplicate_sent`).

Memory stays flat whatever the size of the log: the events (sorted by message_id, seq), the heads
(sorted by _id), `message_events` and `messages` (server-side cursors, sorted by message_id in byte
order) are four sorted streams merged message by message. PostgreSQL is read in one REPEATABLE READ
snapshot taken before MongoDB is read, so every projected event is already in the log when the log
is read. A head that disagrees with its events is re-read with its events in one snapshot
transaction before it is reported, so a message that moved on during the scan is not a false alarm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pydantic
from psycopg import sql
from pymongo import ASCENDING
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.read_concern import ReadConcern

from core.domain.errors import InvalidTransition
from core.domain.events import Event, EventType
from core.domain.message import TERMINAL_STATES, MessageState, fold, queue_for
from projections.projector import STATE_OF_TYPE, int_to_ts
from projections.queries import _RECOUNT as RECOUNT_DAILY_STATS  # the one definition daily_stats must equal

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER_S = 3600.0
DEFAULT_LAG_GRACE_S = 60.0
BATCH = 2000
# Events after which a new `sent` is a deliberate resend: the connector's retry, an operator's requeue.
RETRY_TYPES = frozenset({"retry", "requeued"})
COUNT_KEYS = (
    "messages", "events", "heads", "projected", "in_flight", "terminal", "stuck", "possible_duplicates",
    "multi_sent", "not_yet_projected", "in_motion",
)  # fmt: skip


class VerifyError(RuntimeError):
    """Verification cannot run as configured (e.g. the reporting schema does not exist)."""


class _OutOfOrder(VerifyError):
    """A stream that must be sorted was not: a merge would report nonsense, so stop."""


@dataclass(frozen=True)
class Discrepancy:
    """One finding: `kind` (stable, e.g. `head_mismatch`), the message concerned (None for table-level
    findings such as `daily_stats_mismatch`) and a human-readable detail."""

    kind: str
    message_id: str | None
    detail: str


@dataclass
class VerifyReport:
    """The result of `verify`.

    `discrepancies` keeps at most `keep_per_kind` findings per kind; `discrepancy_counts` counts all
    of them. `notes` are information, not faults (a `possible_duplicate` send that the log explains).
    `counts` has the keys of COUNT_KEYS. `reporting_checked` is False when no PostgreSQL was given.
    `pending_after`: events newer than this may be missing from `message_events` without fault.
    """

    discrepancies: list[Discrepancy] = field(default_factory=list)
    discrepancy_counts: Counter[str] = field(default_factory=Counter)
    notes: list[Discrepancy] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    reporting_checked: bool = False
    projector_position: datetime | None = None
    pending_after: datetime | None = None
    keep_per_kind: int = 1000

    @property
    def ok(self) -> bool:
        return not self.discrepancy_counts

    def add(self, kind: str, message_id: str | None, detail: str) -> None:
        self.discrepancy_counts[kind] += 1
        if self.discrepancy_counts[kind] <= self.keep_per_kind:
            self.discrepancies.append(Discrepancy(kind, message_id, detail))
        log.debug("verify: %s message_id=%s %s", kind, message_id, detail)

    def note(self, kind: str, message_id: str | None, detail: str) -> None:
        if len(self.notes) < self.keep_per_kind:
            self.notes.append(Discrepancy(kind, message_id, detail))


# --- sorted streams ----------------------------------------------------------------------------------


class _Sorted:
    """An async iterator of (key, item) with strictly increasing keys, with one item of look-ahead.

    Raises _OutOfOrder if the source breaks the order (the merge relies on it)."""

    def __init__(self, name: str, source: AsyncIterator[tuple[str, Any]]) -> None:
        self.name = name
        self._source = source
        self.key: str | None = None
        self.item: Any = None

    async def advance(self) -> None:
        previous = self.key
        try:
            self.key, self.item = await anext(self._source)
        except StopAsyncIteration:
            self.key, self.item = None, None
            return
        if previous is not None and self.key is not None and self.key <= previous:
            raise _OutOfOrder(f"{self.name}: key {self.key!r} after {previous!r}; the stream is not sorted by "
                              f"message_id in byte order")

    async def take(self, key: str) -> Any:
        """The item for `key` (advancing past it), or None if this stream has none."""
        if self.key != key:
            return None
        item = self.item
        await self.advance()
        return item


class _ReadAhead:
    """Iterates `source` while a background task fetches the next batches (at most `depth` of them
    ahead), so waiting for MongoDB overlaps with checking. `aclose()` stops the task."""

    def __init__(self, source: AsyncIterator[Any], depth: int = 3) -> None:
        self._queue: asyncio.Queue[list[Any] | BaseException | None] = asyncio.Queue(maxsize=depth)
        self._task = asyncio.create_task(self._pump(source))

    async def _pump(self, source: AsyncIterator[Any]) -> None:
        try:
            chunk: list[Any] = []
            async for item in source:
                chunk.append(item)
                if len(chunk) >= BATCH:
                    await self._queue.put(chunk)
                    chunk = []
            await self._queue.put(chunk)
            await self._queue.put(None)
        except Exception as e:  # handed to the reader, which raises it
            await self._queue.put(e)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (chunk := await self._queue.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            for item in chunk:
                yield item

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _grouped(rows: AsyncIterator[Any], key_of: Any) -> AsyncGenerator[tuple[str, Any], None]:
    """Consecutive rows with the same key, as (key, [rows])."""
    key: str | None = None
    group: list[Any] = []
    async for row in rows:
        k = key_of(row)
        if k != key and group:
            yield key, group  # type: ignore[misc]
            group = []
        key = k
        group.append(row)
    if group:
        yield key, group  # type: ignore[misc]


async def _keyed(rows: AsyncIterator[Any], key_of: Any) -> AsyncGenerator[tuple[str, Any], None]:
    async for row in rows:
        yield key_of(row), row


async def _fetch_server_side(conn: psycopg.AsyncConnection, name: str, query: sql.Composed
                             ) -> AsyncGenerator[Any, None]:
    """Rows of `query` through a server-side cursor (needs the open transaction of `conn`)."""
    cur = conn.cursor(name=name)
    cur.itersize = BATCH
    async with cur:
        await cur.execute(query)
        async for row in cur:
            yield row


# --- the per-message checks ------------------------------------------------------------------------


@dataclass
class _Folded:
    events: list[Event]
    state: MessageState | None
    error: str | None


def _fold_docs(docs: Sequence[Mapping[str, Any]]) -> _Folded:
    """Parse and fold one message's event documents (sorted by seq); never raises."""
    events: list[Event] = []
    for expected_seq, doc in enumerate(docs, start=1):
        try:
            event = Event.from_doc(dict(doc))
        except (pydantic.ValidationError, KeyError, TypeError, ValueError, AttributeError) as e:
            return _Folded(events, None, f"seq {doc.get('seq')!r} unreadable: {e}".splitlines()[0])
        if event.seq != expected_seq:
            return _Folded(events, None, f"gap in seq: expected {expected_seq}, found {event.seq}")
        events.append(event)
    try:
        return _Folded(events, fold(events), None)
    except InvalidTransition as e:
        return _Folded(events, None, f"does not fold: {e}")


def _parse(doc: Mapping[str, Any]) -> Event | None:
    try:
        return Event.from_doc(dict(doc))
    except (pydantic.ValidationError, KeyError, TypeError, ValueError, AttributeError):
        return None


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


HEAD_FIELDS = {"_id": 1, "tenant_id": 1, "state": 1, "version": 1, "queue": 1, "due_at": 1, "route_id": 1,
               "smsc_ids": 1, "billed": 1, "msg.parts": 1, "lease_owner": 1}  # fmt: skip


def head_differences(head: Mapping[str, Any], state: MessageState) -> list[str]:
    """The head fields that disagree with the fold `state`, as `field: head=... fold=...` strings.

    `attempts` is not compared: a lease counts an attempt before its outcome is an event."""
    expected: dict[str, Any] = {
        "state": state.state, "version": state.version, "tenant_id": state.tenant_id, "route_id": state.route_id,
        "smsc_ids": list(state.smsc_message_ids), "billed": state.billed, "parts": state.parts,
        "queue": queue_for(state),
    }  # fmt: skip
    actual: dict[str, Any] = {k: head.get(k) for k in expected}
    actual["parts"] = (head.get("msg") or {}).get("parts")
    actual["smsc_ids"] = list(head.get("smsc_ids") or [])
    return [f"{k}: head={actual[k]!r} fold={v!r}" for k, v in expected.items() if actual[k] != v]


def _check_sends(report: VerifyReport, mid: str, events: Sequence[Event]) -> None:
    """Possible duplicates (notes) and second sends the log does not explain (discrepancies)."""
    sends = 0
    retry_since_send = False
    for e in events:
        if e.type.value in RETRY_TYPES:
            retry_since_send = True
        if e.type != EventType.SENT:
            continue
        marked = bool(e.data.get("possible_duplicate"))
        if marked:
            report.counts["possible_duplicates"] += 1
            report.note("possible_duplicate", mid, f"seq {e.seq} sent on route {e.route_id} attempt "
                        f"{e.data.get('attempt')} after an attempt whose outcome was unknown")
        if sends and not marked and not retry_since_send:
            report.add("duplicate_sent", mid, f"seq {e.seq}: sent again (send #{sends + 1}) with neither "
                       f"possible_duplicate nor a retry since the previous send")
        sends += 1
        retry_since_send = False
    if sends > 1:
        report.counts["multi_sent"] += 1


def _check_progress(report: VerifyReport, mid: str, head: Mapping[str, Any], now: datetime, stale_after_s: float
                    ) -> None:
    """Terminal, in flight, or stuck, judged by the head (the queue the workers claim from)."""
    queue = head.get("queue")
    state = head.get("state")
    if queue is None:
        if state in TERMINAL_STATES:
            report.counts["terminal"] += 1
        else:
            report.counts["stuck"] += 1
            report.add("stuck", mid, f"state {state!r} is not terminal but no stage owns it (queue is empty)")
        return
    due_at = _aware(head.get("due_at"))
    if isinstance(due_at, datetime) and due_at >= now - timedelta(seconds=stale_after_s):
        report.counts["in_flight"] += 1
        return
    report.counts["stuck"] += 1
    overdue = f"{(now - due_at).total_seconds():.0f}s overdue (due_at {due_at.isoformat()})" if isinstance(
        due_at, datetime) else "no due_at"
    report.add("stuck", mid, f"state {state!r} in queue {queue!r} {overdue}; is a worker for that stage running?")


def _expected_row(events: Sequence[Event]) -> dict[str, Any]:
    """What the projector's `messages` row must hold after exactly these events (any order): the
    newest non-billing event's type as state (which is what the fold yields), the highest seq,
    billed, and the summed amount of the `billed` events (None if none)."""
    ordered = sorted(events, key=lambda e: e.seq)
    non_billing = [e for e in ordered if e.type != EventType.BILLED]
    bills = [e for e in ordered if e.type == EventType.BILLED]
    return {
        "state": STATE_OF_TYPE.get(non_billing[-1].type.value, non_billing[-1].type.value) if non_billing else None,
        "last_seq": ordered[-1].seq if ordered else 0,
        "billed": bool(bills),
        "amount_minor": sum(int(e.data.get("amount") or 0) for e in bills) if bills else None,
    }


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class _Context:
    report: VerifyReport
    db: AsyncDatabase
    now: datetime
    stale_after_s: float
    pending_after: datetime | None  # None: no reporting check
    rechecks: int = 0


async def verify(db: AsyncDatabase, pg_url: str | None, schema: str, now: datetime, *,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, lag_grace_s: float = DEFAULT_LAG_GRACE_S,
                 projection: str = "reporting", keep_per_kind: int = 1000) -> VerifyReport:
    """Check the heads, the reporting schema `schema` and the progress of every message against the
    event log of `db`; see the module docstring for the checks. `now` must be timezone-aware.

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
        ctx = _Context(report, db, now, stale_after_s, None)
        await _merge(ctx, None, None)
    else:
        async with await psycopg.AsyncConnection.connect(pg_url, application_name="msgcore-verify") as conn:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await conn.set_read_only(True)
            async with conn.transaction():
                # The snapshot starts with this first query, before MongoDB is read.
                position = await _projector_position(conn, schema, projection)
                report.reporting_checked = True
                report.projector_position = position
                report.pending_after = min(now, position or now) - timedelta(seconds=lag_grace_s)
                ctx = _Context(report, db, now, stale_after_s, report.pending_after)
                await _merge(ctx, conn, schema)
                await _check_daily_stats(report, conn, schema)
    log.info("verify: %s; %d discrepancies %s", report.counts, sum(report.discrepancy_counts.values()),
             dict(report.discrepancy_counts))
    return report


async def _projector_position(conn: psycopg.AsyncConnection, schema: str, projection: str) -> datetime | None:
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


async def _merge(ctx: _Context, conn: psycopg.AsyncConnection | None, schema: str | None) -> None:
    """Walk the (two or four) sorted streams message by message."""
    pg_queries: list[tuple[str, sql.Composed]] = []
    if conn is not None and schema is not None:
        order = await _byte_order(conn)
        ident = sql.Identifier(schema)
        pg_queries = [
            ("message_events", sql.SQL("SELECT message_id, seq, type FROM {}.message_events "
                                       "ORDER BY message_id {}, seq").format(ident, order)),
            ("messages", sql.SQL("SELECT message_id, state, last_seq, billed, amount_minor FROM {}.messages "
                                 "ORDER BY message_id {}").format(ident, order)),
        ]
    events_cur = ctx.db["events"].find({}, {"_id": 0}, batch_size=BATCH).sort(
        [("message_id", ASCENDING), ("seq", ASCENDING)])
    heads_cur = ctx.db["streams"].find({}, HEAD_FIELDS, batch_size=BATCH).sort("_id", ASCENDING)
    events_in, heads_in = _ReadAhead(aiter(events_cur)), _ReadAhead(aiter(heads_cur))
    sources: list[AsyncGenerator[tuple[str, Any], None]] = [
        _grouped(aiter(events_in), lambda d: d["message_id"]),
        _keyed(aiter(heads_in), lambda d: d["_id"]),
    ]
    if conn is not None:
        (_, events_q), (_, messages_q) = pg_queries
        sources += [
            _grouped(_fetch_server_side(conn, "verify_events", events_q), lambda r: r[0]),
            _keyed(_fetch_server_side(conn, "verify_messages", messages_q), lambda r: r[0]),
        ]
    names = ["events", "streams", *(name for name, _ in pg_queries)]
    streams = [_Sorted(name, source) for name, source in zip(names, sources, strict=True)]
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
        for reader in (events_in, heads_in):
            await reader.aclose()
        for source in sources:
            await source.aclose()
        await events_cur.close()
        await heads_cur.close()


async def _byte_order(conn: psycopg.AsyncConnection) -> sql.Composable:
    """`COLLATE "C"` unless the database already sorts text by bytes (then the primary key index
    serves the ORDER BY). MongoDB and Python compare strings by UTF-8 bytes / code points."""
    cur = await conn.execute("SELECT datcollate FROM pg_database WHERE datname = current_database()")
    row = await cur.fetchone()
    return sql.SQL("") if row and row[0] in ("C", "POSIX") else sql.SQL('COLLATE "C"')


async def _check_message(ctx: _Context, mid: str, docs: list[dict[str, Any]] | None, head: dict[str, Any] | None,
                         pg_events: list[tuple[str, int, str]] | None, pg_row: tuple[Any, ...] | None) -> None:
    report = ctx.report
    folded = _fold_docs(docs) if docs else None
    if docs:
        report.counts["messages"] += 1
        report.counts["events"] += len(docs)
    if head is not None:
        report.counts["heads"] += 1
    await _check_head(ctx, mid, folded, head)
    if folded is not None:
        _check_sends(report, mid, folded.events)
    if head is not None:
        _check_progress(report, mid, head, ctx.now, ctx.stale_after_s)
    if ctx.pending_after is not None:
        projected = _check_projected(ctx, mid, docs or [], folded.events if folded else [], pg_events or [])
        _check_messages_row(report, mid, projected, pg_row)


async def _check_head(ctx: _Context, mid: str, folded: _Folded | None, head: dict[str, Any] | None) -> None:
    report = ctx.report
    if _head_problem(folded, head) is None:
        return
    # The scan read events and heads at different moments: look again, both in one snapshot.
    fresh_docs, fresh_head = await _reread(ctx.db, mid)
    ctx.rechecks += 1
    problem = _head_problem(_fold_docs(fresh_docs) if fresh_docs else None, fresh_head)
    if problem is None:
        report.counts["in_motion"] += 1
        log.debug("verify: message_id=%s moved during the scan; consistent on a second look", mid)
        return
    report.add(problem[0], mid, problem[1])


def _head_problem(folded: _Folded | None, head: dict[str, Any] | None) -> tuple[str, str] | None:
    """(kind, detail) of what is wrong between a message's folded events and its head, or None."""
    if folded is not None and folded.error is not None:
        return "fold_failed", folded.error
    if folded is None or folded.state is None:
        if head is None:
            return None
        return "orphan_head", f"head in state {head.get('state')!r} version {head.get('version')!r} has no events"
    if head is None:
        return "head_missing", f"{len(folded.events)} events (state {folded.state.state!r}) but no head"
    diffs = head_differences(head, folded.state)
    return ("head_mismatch", "; ".join(diffs)) if diffs else None


async def _reread(db: AsyncDatabase, mid: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One message's events and head, read in one snapshot transaction."""

    async def body(session: AsyncClientSession) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        docs = [d async for d in db["events"].find({"message_id": mid}, {"_id": 0}, session=session)
                .sort("seq", ASCENDING)]
        return docs, await db["streams"].find_one({"_id": mid}, HEAD_FIELDS, session=session)

    async with db.client.start_session() as session:
        return await session.with_transaction(body, read_concern=ReadConcern("snapshot"))


def _check_projected(ctx: _Context, mid: str, docs: Sequence[Mapping[str, Any]], parsed: Sequence[Event],
                     pg_events: Sequence[tuple[str, int, str]]) -> list[Event]:
    """Compare one message's log events (`docs`, and those of them that parse, `parsed`) with its
    `message_events` rows; return the log events that are projected (the input of its `messages` row)."""
    report = ctx.report
    assert ctx.pending_after is not None
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
            event = by_seq.get(seq) or _parse(doc)
            if event is not None:  # an unreadable one is reported as fold_failed
                projected.append(event)
            continue
        at = _aware(doc.get("at"))
        if isinstance(at, datetime) and at > ctx.pending_after:
            report.counts["not_yet_projected"] += 1
        else:
            report.add("event_not_projected", mid, f"seq {seq} {kind!r} at {at} is not in message_events")
    for seq, kind in sorted(in_pg.items()):
        report.add("extra_projected_event", mid, f"seq {seq} {kind!r} is in message_events but not in the log")
    return projected


def _check_messages_row(report: VerifyReport, mid: str, projected: Sequence[Event], row: tuple[Any, ...] | None
                        ) -> None:
    if not projected:
        if row is not None:
            report.add("extra_messages_row", mid, "messages has a row but no event of it is projected")
        return
    want = _expected_row(projected)
    if row is None:
        report.add("messages_row_missing", mid, f"{len(projected)} events projected but no messages row")
        return
    got = dict(zip(("state", "last_seq", "billed", "amount_minor"), row[1:], strict=True))
    diffs = [f"{k}: row={got[k]!r} events={v!r}" for k, v in want.items() if got[k] != v]
    if diffs:
        report.add("messages_row_mismatch", mid, "; ".join(diffs))


async def _check_daily_stats(report: VerifyReport, conn: psycopg.AsyncConnection, schema: str) -> None:
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
