"""`msgcore verify`: nothing lost, nothing sent twice unknowingly, nothing billed twice.

The event log is the truth; every other document is checked against it. The checks:

1. topics: every topic is gapless: positions 0 .. counter-1 each held by exactly one event, none at
   or past the counter (`topic_gap`, `position_twice`, `position_beyond_counter`), and no checkpoint
   ahead of its topic's counter (`checkpoint_ahead`).
2. checkpoints: every position below a consumer's checkpoint has its outcome: the message has a later
   event than the entry's seq, or (the router holding a suspended tenant's message) a timer for that
   very seq (`no_outcome`).
3. attempts: every attempt document whose range reaches past its consumer's checkpoint is listed with
   its owner, epoch and age: as a note while younger than `stale_after_s` (in flight), else as
   `attempt_unresolved` (no owner resolved it: is a connector running?).
4. messages: each message's seqs are 1..n, each once, and its events fold without error
   (`core.domain.message.fold`; `fold_failed`); no message is billed twice (`billed_twice`) and none
   that was sent and ended is unbilled (`unbilled`). Each is finished (a terminal state) or waits
   legitimately: in a topic backlog (at or past the consumer's checkpoint), on a timer for its last
   seq, or sent and awaiting a receipt until its `expires_at`. Waiting longer than `stale_after_s`
   past its due time (a paused or suspended lane excepted) is `stuck`; in no topic backlog and on no
   timer is `stuck` too.
5. duplicates: `sent` events marked `possible_duplicate` are notes (explained); a second `sent` of a
   message with neither that mark nor a `retry` (e.g. OUTCOME_UNKNOWN) or `requeued` since the
   previous `sent` is a discrepancy (`duplicate_sent`).
6. money: each tenant's `spent_minor` equals the sum of its `billed` amounts (`spend_mismatch`).
7. reporting (with PostgreSQL): every event is in `{schema}.message_events` exactly once (same seq and
   type) and nothing else is there; every `{schema}.messages` row agrees with the events projected for
   it; `{schema}.daily_stats` equals its recount. Events newer than `VerifyReport.pending_after` may
   be missing without fault (`not_yet_projected`).

Consistency without a global snapshot, by read order: checkpoints are read before counters, counters
before the events (a checkpoint or counter only grows, and the events below it committed with it), the
tenants' spend before and after the scan (the billed sum the scan sees must lie between). A message that
looks wrong is read again, events and timer in one snapshot transaction, before it is reported (it may
have moved on during the scan: counted as `in_motion`). PostgreSQL is read in one REPEATABLE READ
snapshot taken before MongoDB is read.

Memory stays flat in the number of messages: the events (sorted by message_id, seq), the timers (by
_id), `message_events` and `messages` (server-side cursors, by message_id in byte order) are merged
message by message; topics are read one at a time by position. What is held whole is small: counters,
checkpoints, lanes, tenants, attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
import pydantic
from psycopg import sql

from core.domain.errors import InvalidTransition
from core.domain.events import Event, EventType
from core.domain.message import TERMINAL_STATES, MessageState, fold, lane_of_topic
from core.store.topics import EventLog
from projections.projector import STATE_OF_TYPE, STATELESS_TYPES, int_to_ts
from projections.queries import _RECOUNT as RECOUNT_DAILY_STATS  # the one definition daily_stats must equal

if TYPE_CHECKING:  # the driver's types only: the driver itself is core/store's business
    from pymongo.asynchronous.client_session import AsyncClientSession
    from pymongo.asynchronous.database import AsyncDatabase

log = logging.getLogger(__name__)

ASCENDING = 1

DEFAULT_STALE_AFTER_S = 3600.0
DEFAULT_LAG_GRACE_S = 60.0
BATCH = 2000
# Events after which a new `sent` is a deliberate resend: the connector's retry (OUTCOME_UNKNOWN among
# them), an operator's requeue.
RETRY_TYPES = frozenset({"retry", "requeued"})
# States after which a sent message must carry its `billed` (written in the same commit).
BILLABLE_STATES = frozenset({"delivered", "undelivered", "expired"})
READABLE_LANE_STATES = frozenset({"active", "canceling"})
COUNT_KEYS = (
    "messages", "events", "topics", "positions", "checkpoints", "terminal", "in_flight", "in_backlog",
    "on_timer", "awaiting_receipt", "paused", "stuck", "attempts_open", "billed", "possible_duplicates",
    "multi_sent", "projected", "not_yet_projected", "in_motion",
)  # fmt: skip


class VerifyError(RuntimeError):
    """Verification cannot run as configured (e.g. the reporting schema does not exist)."""


class _OutOfOrder(VerifyError):
    """A stream that must be sorted was not: a merge would report nonsense, so stop."""


@dataclass(frozen=True)
class Discrepancy:
    """One finding: `kind` (stable, e.g. `no_outcome`), the message concerned (None for log-level
    findings such as `topic_gap` or `daily_stats_mismatch`) and a human-readable detail."""

    kind: str
    message_id: str | None
    detail: str


@dataclass
class VerifyReport:
    """The result of `verify`.

    `discrepancies` keeps at most `keep_per_kind` findings per kind; `discrepancy_counts` counts all
    of them. `notes` are information, not faults (a `possible_duplicate` send that the log explains,
    an attempt in flight). `counts` has the keys of COUNT_KEYS. `reporting_checked` is False when no
    PostgreSQL was given. `pending_after`: events newer than this may be missing from
    `message_events` without fault.
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
        log.debug("verify: %s message=%s %s", kind, message_id, detail)

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


# --- what is read whole before the scan --------------------------------------------------------------


@dataclass
class LogSnapshot:
    """The small documents read before the events, in this order: spend, checkpoints, counters, lanes
    and tenants. `consumers[topic]` = {consumer: checkpoint position}."""

    spend_before: dict[str, int]
    checkpoints: dict[str, int]  # "<consumer>|<topic>" -> pos
    counters: dict[str, int]  # topic -> next free position
    lane_states: dict[str, str]  # lane key -> state
    lane_tenants: dict[str, str]  # lane key -> tenant
    suspended: frozenset[str]
    consumers: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for cid, pos in self.checkpoints.items():
            consumer, _, topic = cid.partition("|")
            self.consumers.setdefault(topic, {})[consumer] = pos

    def lane_readable(self, topic: str) -> bool:
        """Whether a consumer reads this topic now (a paused lane or a suspended tenant's is skipped)."""
        lane = lane_of_topic(topic)
        if not lane or topic.startswith("await:"):
            return True
        if self.lane_states.get(lane) not in READABLE_LANE_STATES:
            return False
        return self.lane_states.get(lane) == "canceling" or self.lane_tenants.get(lane) not in self.suspended


async def _spend(db: AsyncDatabase) -> dict[str, int]:
    return {d["_id"]: int(d.get("spent_minor") or 0) async for d in db["tenants"].find({}, {"spent_minor": 1})}


async def read_snapshot(db: AsyncDatabase) -> LogSnapshot:
    spend = await _spend(db)
    checkpoints = {d["_id"]: int(d["pos"]) async for d in db["checkpoints"].find({})}
    counters = {d["_id"]: int(d["pos"]) async for d in db["topics"].find({})}
    lanes = [d async for d in db["lanes"].find({}, {"state": 1, "tenant_id": 1})]
    suspended = frozenset([d["_id"] async for d in db["tenants"].find({"status": {"$nin": ["active", None]}},
                                                                       {"_id": 1})])
    return LogSnapshot(spend, checkpoints, counters, {d["_id"]: d.get("state", "") for d in lanes},
                       {d["_id"]: d.get("tenant_id", "") for d in lanes}, suspended)


# --- 1. topics ---------------------------------------------------------------------------------------


async def check_topics(report: VerifyReport, db: AsyncDatabase, snap: LogSnapshot) -> None:
    """Positions 0 .. counter-1 of every topic, each exactly once; nothing at or past a counter that a
    fresh read of the counters does not cover; no checkpoint ahead of its counter."""
    report.counts["topics"] = len(snap.counters)
    report.counts["checkpoints"] = len(snap.checkpoints)
    for cid, pos in sorted(snap.checkpoints.items()):
        topic = cid.partition("|")[2]
        if pos > snap.counters.get(topic, 0):
            report.add("checkpoint_ahead", None, f"checkpoint {cid} at {pos} but topic {topic} ends at "
                       f"{snap.counters.get(topic, 0)}")
    beyond: dict[str, list[int]] = {}
    for topic, end in sorted(snap.counters.items()):
        beyond_here = await _scan_topic(report, db, topic, end)
        if beyond_here:
            beyond[topic] = beyond_here
    async for d in db["events"].find({"topic": {"$exists": True, "$nin": list(snap.counters)}},
                                     {"_id": 0, "topic": 1, "pos": 1}):
        beyond.setdefault(str(d["topic"]), []).append(d.get("pos", -1))
    if beyond:
        # Written after the counters were read (a commit takes the counter and inserts at once): a
        # fresh counter covers them. One that still does not is a position no counter ever gave.
        fresh = {d["_id"]: int(d["pos"]) async for d in db["topics"].find({"_id": {"$in": list(beyond)}})}
        for topic, positions in sorted(beyond.items()):
            bad = sorted(p for p in positions if p >= fresh.get(topic, 0))
            if bad:
                report.add("position_beyond_counter", None, f"topic {topic}: positions {_ranges(bad)} at or past "
                           f"its counter ({fresh.get(topic, 'none')})")


async def _scan_topic(report: VerifyReport, db: AsyncDatabase, topic: str, end: int) -> list[int]:
    """Check positions [0, end) of `topic` through the (topic, pos) index; return the positions found
    at or past `end`."""
    expected = 0
    twice: list[int] = []
    missing: list[int] = []
    beyond: list[int] = []
    cursor = db["events"].find({"topic": topic}, {"_id": 0, "pos": 1}, batch_size=BATCH).sort("pos", ASCENDING)
    async for d in cursor:
        pos = d.get("pos")
        if not isinstance(pos, int):
            report.add("topic_gap", None, f"topic {topic}: an event without an integer pos ({pos!r})")
        elif pos >= end:
            beyond.append(pos)
        elif pos < expected:
            twice.append(pos)
        else:
            report.counts["positions"] += 1
            missing.extend(range(expected, pos))
            expected = pos + 1
    missing.extend(range(expected, end))
    if missing:
        report.add("topic_gap", None, f"topic {topic}: {len(missing)} of positions [0, {end}) hold no event, "
                   f"e.g. {_ranges(missing)}")
    if twice:
        report.add("position_twice", None, f"topic {topic}: positions held by two events: {_ranges(twice)}")
    return beyond


def _ranges(positions: Sequence[int], show: int = 5) -> str:
    """`3, 7-9, 12` for sorted positions (the first `show` runs)."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:show])
    return text + (f" ... ({len(runs) - show} more runs)" if len(runs) > show else "")


# --- 4./5. one message -------------------------------------------------------------------------------


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
            what = "twice" if event.seq == expected_seq - 1 else f"found {event.seq}"
            return _Folded(events, None, f"seqs not 1..n: expected {expected_seq}, {what}")
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


@dataclass
class _Judgement:
    """What the Mongo-side checks make of one message: its place (a COUNT_KEYS key) and its problems."""

    place: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    multi_sent: bool = False
    billed_amounts: int = 0
    billed_events: int = 0


def _check_sends(j: _Judgement, events: Sequence[Mapping[str, Any]]) -> None:
    """Possible duplicates (notes) and second sends the log does not explain (problems)."""
    sends = 0
    retry_since_send = False
    for e in events:
        kind = e.get("type")
        data = e.get("data") or {}
        if kind in RETRY_TYPES:
            retry_since_send = True
        if kind != "sent":
            continue
        marked = bool(data.get("possible_duplicate"))
        if marked:
            j.notes.append(("possible_duplicate", f"seq {e.get('seq')} sent on route {e.get('route_id')} attempt "
                            f"{data.get('attempt')} after an attempt whose outcome was unknown"))
        if sends and not marked and not retry_since_send:
            j.problems.append(("duplicate_sent", f"seq {e.get('seq')}: sent again (send #{sends + 1}) with neither "
                               "possible_duplicate nor a retry since the previous send"))
        sends += 1
        retry_since_send = False
    j.multi_sent = sends > 1


def _check_billing(j: _Judgement, docs: Sequence[Mapping[str, Any]], state: MessageState | None) -> None:
    bills = [d for d in docs if d.get("type") == "billed"]
    j.billed_events = len(bills)
    j.billed_amounts = sum(int((d.get("data") or {}).get("amount") or 0) for d in bills)
    if len(bills) > 1:
        j.problems.append(("billed_twice", f"{len(bills)} billed events (seqs {[d.get('seq') for d in bills]}), "
                           f"amounts {[(d.get('data') or {}).get('amount') for d in bills]}"))
    if state is not None and state.state in BILLABLE_STATES and state.sent_at is not None and not bills:
        j.problems.append(("unbilled", f"state {state.state!r} after a send, but no billed event (the outcome "
                           "and its billed commit together)"))


def _check_outcomes(j: _Judgement, snap: LogSnapshot, docs: Sequence[Mapping[str, Any]],
                    timer: Mapping[str, Any] | None) -> None:
    """Every entry of this message below a consumer's checkpoint has its outcome."""
    last_seq = max((int(d.get("seq") or 0) for d in docs), default=0)
    for d in docs:
        topic, pos, seq = d.get("topic"), d.get("pos"), int(d.get("seq") or 0)
        if topic is None or not isinstance(pos, int) or seq < last_seq:
            continue  # a later event is the outcome
        held = timer is not None and timer.get("seq") == seq and timer.get("topic") == topic
        for consumer, checkpoint in sorted(snap.consumers.get(topic, {}).items()):
            if pos < checkpoint and not held:
                j.problems.append(("no_outcome", f"{topic}@{pos} ({d.get('type')} seq {seq}) is below the "
                                   f"{consumer} checkpoint ({checkpoint}) but nothing followed it"))


def _check_progress(j: _Judgement, snap: LogSnapshot, state: MessageState, docs: Sequence[Mapping[str, Any]],
                    timer: Mapping[str, Any] | None, now: datetime, stale_after_s: float) -> None:
    """Finished, or waiting where it may wait (backlog, timer, receipt), or stuck."""
    stale = timedelta(seconds=stale_after_s)
    if state.state in TERMINAL_STATES:
        j.place = "terminal"
        return
    if timer is not None and timer.get("seq") == state.version:
        due = _aware(timer.get("due_at"))
        j.place = "on_timer"
        if isinstance(due, datetime) and due < now - stale:
            j.place = "stuck"
            j.problems.append(("stuck", f"state {state.state!r} on a {timer.get('reason')} timer due "
                               f"{due.isoformat()} ({(now - due).total_seconds():.0f}s overdue): is the scheduler "
                               "running?"))
        return
    last = docs[-1]
    topic, pos = last.get("topic"), last.get("pos")
    if topic is None or not isinstance(pos, int):
        j.place = "stuck"
        j.problems.append(("stuck", f"state {state.state!r} (seq {state.version} {last.get('type')!r}) is in no "
                           "topic and on no timer: no stage will act on it"))
        return
    checkpoints = snap.consumers.get(topic, {})
    if checkpoints and pos < min(checkpoints.values()):
        j.place = "stuck"  # below the checkpoint with no outcome: reported as no_outcome
        return
    if topic.startswith("await:"):
        ends = _aware((last.get("data") or {}).get("expires_at"))
        j.place = "awaiting_receipt"
        if isinstance(ends, datetime) and ends < now - stale:
            j.place = "stuck"
            j.problems.append(("stuck", f"sent, receipt wait ended {ends.isoformat()} but the expirer has not passed "
                               f"{topic}@{pos} (checkpoints {checkpoints or 'none'}): is the scheduler running?"))
        return
    if not snap.lane_readable(topic):
        j.place = "paused"
        return
    at = _aware(last.get("at"))
    j.place = "in_backlog"
    if isinstance(at, datetime) and at < now - stale:
        j.place = "stuck"
        j.problems.append(("stuck", f"state {state.state!r} waits in {topic}@{pos} since {at.isoformat()} "
                           f"(checkpoints {checkpoints or 'none'}): is a consumer of that topic running?"))


def judge(snap: LogSnapshot, docs: Sequence[Mapping[str, Any]], timer: Mapping[str, Any] | None, now: datetime,
          stale_after_s: float) -> _Judgement:
    """The Mongo-side checks of one message (its event documents sorted by seq, its timer or None)."""
    j = _Judgement()
    folded = _fold_docs(docs)
    if folded.error is not None:
        j.problems.append(("fold_failed", folded.error))
    _check_sends(j, docs)
    _check_billing(j, docs, folded.state)
    _check_outcomes(j, snap, docs, timer)
    if folded.state is not None:
        _check_progress(j, snap, folded.state, docs, timer, now, stale_after_s)
    return j


def _expected_row(events: Sequence[Event]) -> dict[str, Any]:
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


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class _Context:
    report: VerifyReport
    db: AsyncDatabase
    snap: LogSnapshot
    now: datetime
    stale_after_s: float
    pending_after: datetime | None  # None: no reporting check
    billed_by_tenant: Counter[str] = field(default_factory=Counter)
    rechecks: int = 0


async def verify(db: AsyncDatabase, pg_url: str | None, schema: str, now: datetime, *,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, lag_grace_s: float = DEFAULT_LAG_GRACE_S,
                 projection: str = "reporting", keep_per_kind: int = 1000) -> VerifyReport:
    """Check the log of `db` (topics, checkpoints, attempts, every message, the tenants' spend) and,
    with `pg_url`, the reporting schema `schema` against it; see the module docstring. `now` must be
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
                position = await _projector_position(conn, schema, projection)
                report.reporting_checked = True
                report.projector_position = position
                report.pending_after = min(now, position or now) - timedelta(seconds=lag_grace_s)
                await _check_log(report, db, now, stale_after_s, report.pending_after, conn, schema)
                await _check_daily_stats(report, conn, schema)
    log.info("verify: %s; %d discrepancies %s", report.counts, sum(report.discrepancy_counts.values()),
             dict(report.discrepancy_counts))
    return report


async def _check_log(report: VerifyReport, db: AsyncDatabase, now: datetime, stale_after_s: float,
                     pending_after: datetime | None, conn: psycopg.AsyncConnection | None, schema: str | None) -> None:
    snap = await read_snapshot(db)
    await check_topics(report, db, snap)
    ctx = _Context(report, db, snap, now, stale_after_s, pending_after)
    await _merge(ctx, conn, schema)
    await check_attempts(report, db, now, stale_after_s)
    _check_spend(report, snap.spend_before, await _spend(db), ctx.billed_by_tenant)


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
    events_cur = ctx.db["events"].find({}, {"_id": 0}, batch_size=BATCH).sort(
        [("message_id", ASCENDING), ("seq", ASCENDING)])
    timers_cur = ctx.db["timers"].find({}, batch_size=BATCH).sort("_id", ASCENDING)
    events_in, timers_in = _ReadAhead(aiter(events_cur)), _ReadAhead(aiter(timers_cur))
    sources: list[AsyncGenerator[tuple[str, Any], None]] = [
        _grouped(aiter(events_in), lambda d: d["message_id"]),
        _keyed(aiter(timers_in), lambda d: d["_id"]),
    ]
    names = ["events", "timers"]
    if conn is not None and schema is not None:
        order = await _byte_order(conn)
        ident = sql.Identifier(schema)
        sources += [
            _grouped(_fetch_server_side(conn, "verify_events", sql.SQL(
                "SELECT message_id, seq, type FROM {}.message_events ORDER BY message_id {}, seq"
            ).format(ident, order)), lambda r: r[0]),
            _keyed(_fetch_server_side(conn, "verify_messages", sql.SQL(
                "SELECT message_id, state, last_seq, billed, amount_minor FROM {}.messages ORDER BY message_id {}"
            ).format(ident, order)), lambda r: r[0]),
        ]
        names += ["message_events", "messages"]
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
        for reader in (events_in, timers_in):
            await reader.aclose()
        for source in sources:
            await source.aclose()
        await events_cur.close()
        await timers_cur.close()


async def _byte_order(conn: psycopg.AsyncConnection) -> sql.Composable:
    """`COLLATE "C"` unless the database already sorts text by bytes (then the primary key index
    serves the ORDER BY). MongoDB and Python compare strings by UTF-8 bytes / code points."""
    cur = await conn.execute("SELECT datcollate FROM pg_database WHERE datname = current_database()")
    row = await cur.fetchone()
    return sql.SQL("") if row and row[0] in ("C", "POSIX") else sql.SQL('COLLATE "C"')


async def _check_message(ctx: _Context, mid: str, docs: list[dict[str, Any]] | None, timer: dict[str, Any] | None,
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
        folded = _fold_docs(docs) if docs else None
        projected = _check_projected(ctx, mid, docs or [], folded.events if folded else [], pg_events or [])
        _check_messages_row(report, mid, projected, pg_row)


async def _second_look(ctx: _Context, mid: str, first: _Judgement) -> _Judgement:
    """Judge again on the message's events and timer read in one snapshot: the scan read them at
    different moments, and the message may have moved on meanwhile."""
    docs, timer = await _reread(ctx.db, mid)
    ctx.rechecks += 1
    fresh = judge(ctx.snap, docs, timer, ctx.now, ctx.stale_after_s) if docs else first
    if not fresh.problems:
        ctx.report.counts["in_motion"] += 1
        log.debug("verify: message=%s moved during the scan; consistent on a second look", mid)
    return fresh


def _record(report: VerifyReport, mid: str, j: _Judgement) -> None:
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


async def _reread(db: AsyncDatabase, mid: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One message's events and timer, read in one snapshot transaction."""

    async def body(session: AsyncClientSession) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        docs = [d async for d in db["events"].find({"message_id": mid}, {"_id": 0}, session=session)
                .sort("seq", ASCENDING)]
        return docs, await db["timers"].find_one({"_id": mid}, session=session)

    # A transaction reads one snapshot (EventLog.transaction: majority read concern).
    result: tuple[list[dict[str, Any]], dict[str, Any] | None] = await EventLog(db).transaction(body)
    return result


# --- 3. attempts, 6. money ------------------------------------------------------------------------------


async def check_attempts(report: VerifyReport, db: AsyncDatabase, now: datetime, stale_after_s: float) -> None:
    """Every attempt whose range reaches past its consumer's checkpoint (read after the attempt, so a
    batch that committed meanwhile is not listed): a note while in flight, `attempt_unresolved` once
    older than `stale_after_s`."""
    attempts = [d async for d in db["attempts"].find({}).sort("at", ASCENDING)]
    if not attempts:
        return
    ids = {f"{d['owner'].partition('|')[0]}|{t}" for d in attempts for t in d.get("ranges", {})}
    checkpoints = {d["_id"]: int(d["pos"]) async for d in db["checkpoints"].find({"_id": {"$in": sorted(ids)}})}
    owners = {d["_id"]: d async for d in db["owners"].find({"_id": {"$in": sorted({d["owner"] for d in attempts})}})}
    for a in attempts:
        consumer = a["owner"].partition("|")[0]
        open_ranges = {t: (s, e) for t, (s, e) in a.get("ranges", {}).items()
                       if e > checkpoints.get(f"{consumer}|{t}", 0)}
        if not open_ranges:
            continue
        report.counts["attempts_open"] += 1
        at = _aware(a.get("at"))
        age = (now - at).total_seconds() if isinstance(at, datetime) else float("inf")
        owner = owners.get(a["owner"]) or {}
        current = "current" if owner.get("epoch") == a.get("epoch") else f"owner now at epoch {owner.get('epoch')}"
        ranges = ", ".join(f"{t}[{s},{e}) checkpoint {checkpoints.get(f'{consumer}|{t}', 0)}"
                           for t, (s, e) in sorted(open_ranges.items()))
        detail = (f"attempt {a['_id']} owner {a['owner']} epoch {a.get('epoch')} ({current}, holder "
                  f"{owner.get('holder', '?')}) age {age:.0f}s: {ranges}; {len(a.get('message_ids') or [])} messages")
        if age <= stale_after_s:
            report.note("attempt_in_flight", None, detail)
        else:
            report.add("attempt_unresolved", None, detail + ": no owner resolved it; is a connector running?")


def _check_spend(report: VerifyReport, before: Mapping[str, int], after: Mapping[str, int],
                 billed: Mapping[str, int]) -> None:
    """Each tenant's spent_minor equals the sum of its billed amounts. The scan saw every bill committed
    before `before` was read and none committed after `after`: its sum must lie between the two."""
    for tenant in sorted(set(before) | set(after) | {t for t, n in billed.items() if n}):
        seen = billed.get(tenant, 0)
        if tenant not in after and tenant not in before:
            report.add("spend_mismatch", None, f"tenant {tenant}: billed {seen} but has no tenant document")
            continue
        low, high = before.get(tenant, 0), after.get(tenant, before.get(tenant, 0))
        if not low <= seen <= high:
            what = f"spent_minor {low}" if low == high else f"spent_minor between {low} and {high} during the scan"
            report.add("spend_mismatch", None, f"tenant {tenant}: {what}, billed events sum to {seen}")


# --- 7. reporting ---------------------------------------------------------------------------------------


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
