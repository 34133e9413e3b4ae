"""The event log as the work queue, read by position (see docs/architecture.md).

Collections:
- `events`: one document per lifecycle fact, unique on (message_id, seq); never updated or deleted.
  An event that hands work to a next stage also carries `topic` (that stage's input, e.g. `route`,
  `send:sim~c:42`, `await:sim`) and `pos`, its dense position in that topic (unique (topic, pos)).
- `topics`: one counter document per topic, `{_id: topic, pos: next free position}`. A writer takes
  its positions by `$inc` on the counter in the same transaction that inserts the events: the counter
  write serialises the writers of one topic, so commit order equals position order and a reader of
  [checkpoint, counter) never meets a position that commits later.
- `checkpoints`: `{_id: "<consumer>|<topic>", pos}`: every position below `pos` has its outcome in
  the log. A consumer reads [checkpoint, checkpoint + N) and commits its outputs together with the
  checkpoint move (guarded by the position it read) in one transaction; a crash before the commit
  leaves nothing to undo.
- `owners` (core/store/owners.py) fence the writers of stages with side effects; `timers`
  (core/store/timers.py) hold messages that wait for a time.

Contract of `commit`:
- Atomic: events, positions, checkpoint moves, timers and extra writes commit together or not at all.
- A message whose next seq was taken meanwhile (a receipt racing an expiry) loses on the unique
  index: only that message is dropped from the batch (or decided again by `redecide`), the rest
  commits. Reported in `CommitResult.conflicts`.
- A checkpoint that is not where the caller read it raises `CheckpointMoved`; a stale owner raises
  `Fenced`. Nothing is written in either case.
- Driver errors become `StoreUnavailable` (nothing written, retry later); the driver's own retry
  rules for transactions (`TransientTransactionError`, `UnknownTransactionCommitResult`) apply first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DeleteOne, ReplaceOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure, PyMongoError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from core import metrics
from core.domain.message import notify_topic
from core.store.errors import CheckpointMoved, Fenced, GapInTopic, StoreUnavailable

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
MAX_CONFLICT_ROUNDS = 8


@dataclass
class Write:
    """One message's new events (consecutive seqs), each optionally handed to a topic.

    `topics[i]` is the topic of `events[i]` (None: the event is a fact only). `timer` (a document for
    core/store/timers.py) makes the message wait; `clear_timer` deletes the message's timer."""

    message_id: str
    events: list[dict[str, Any]]
    topics: list[str | None] = field(default_factory=list)
    timer: dict[str, Any] | None = None
    clear_timer: bool = False

    def __post_init__(self) -> None:
        topics = list(self.topics) if self.topics else [None] * len(self.events)
        # An outcome of a message submitted with `notify` goes to that topic (core.domain.message).
        self.topics = [t if t is not None else notify_topic(e) for t, e in zip(topics, self.events, strict=True)]


@dataclass
class CommitResult:
    committed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)  # topic -> [first, end) written


ExtraWrites = Callable[[Sequence[Write]], list[tuple[str, list[Any]]]]
Redecide = Callable[[list[str]], Awaitable[list[Write]]]


class _Conflict(Exception):
    def __init__(self, message_ids: set[str]) -> None:
        super().__init__(sorted(message_ids)[:5])
        self.message_ids = message_ids


# The fields of a `sent` event that receipt correlation reads (EventLog.sent_by_smsc_ids).
SENT_FIELDS = {"_id": 0, "message_id": 1, "seq": 1, "type": 1, "at": 1, "tenant_id": 1, "route_id": 1, "channel": 1,
               "notify": 1,
               "data.smsc_message_ids": 1, "data.route_id": 1, "data.parts": 1, "data.price_per_part": 1,
               "data.currency": 1}


def checkpoint_id(consumer: str, topic: str) -> str:
    return f"{consumer}|{topic}"


class EventLog:
    """Topics, positions and checkpoints over the `events` collection."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.events = db["events"]
        self.topics = db["topics"]
        self.checkpoints = db["checkpoints"]
        self.owners = db["owners"]
        self.timers = db["timers"]
        self._wc = WriteConcern("majority")
        self._rc = ReadConcern("majority")

    async def ensure_indexes(self) -> None:
        await self.events.create_index([("message_id", ASCENDING), ("seq", ASCENDING)], unique=True,
                                       name="message_seq")
        # Sparse: only events handed to a topic carry `topic`/`pos`.
        await self.events.create_index([("topic", ASCENDING), ("pos", ASCENDING)], unique=True, sparse=True,
                                       name="topic_pos")
        # Receipts are matched to the `sent` event that recorded the SMSC's ids (written once per entry).
        await self.events.create_index("data.smsc_message_ids", name="sent_smsc_ids", sparse=True)
        await self.timers.create_index([("due_at", ASCENDING)], name="due")
        await self.timers.create_index([("lane", ASCENDING)], name="lane", sparse=True)

    # ---- transactions -------------------------------------------------------------------------

    async def transaction(self, body: Callable[[AsyncClientSession], Awaitable[Any]]) -> Any:
        """Run `body(session)` in one transaction with majority read and write concern; driver
        errors that survive the driver's own retries become StoreUnavailable."""
        try:
            async with self.db.client.start_session() as session:
                return await session.with_transaction(body, read_concern=self._rc, write_concern=self._wc)
        except (_Conflict, CheckpointMoved, Fenced, DuplicateKeyError, BulkWriteError):
            raise
        except OperationFailure as e:
            if e.code == DUPLICATE_KEY:
                raise
            raise StoreUnavailable(str(e)) from e
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def commit(self, writes: Sequence[Write], *, moves: dict[str, tuple[int, int]] | None = None,
                     fence: tuple[str, int] | None = None, extra: ExtraWrites | None = None,
                     redecide: Redecide | None = None) -> CommitResult:
        """Append `writes` (taking positions in their topics), move checkpoints (`id -> (from, to)`),
        all in one transaction guarded by `fence` (owner id, epoch) when given. See the module doc."""
        result = CommitResult()
        pending = list(writes)
        for _ in range(MAX_CONFLICT_ROUNDS):
            try:
                positions = await self.transaction(
                    lambda s, batch=pending: self._write(s, batch, moves or {}, fence, extra))
            except (DuplicateKeyError, BulkWriteError) as e:
                lost = _conflicting_messages(e, pending)
                if not lost:
                    raise StoreUnavailable(f"unexpected duplicate key: {e}") from e
                exc: _Conflict | None = _Conflict(lost)
            except _Conflict as e:
                exc = e
            else:
                result.committed.extend(w.message_id for w in pending)
                result.positions = positions
                # Every writer's events are counted here, once, after the commit (core/metrics.py).
                metrics.count_committed(pending, result.committed)
                return result
            assert exc is not None
            pending = await drop_lost(pending, exc.message_ids, redecide, result)
        raise StoreUnavailable(f"commit: conflicts did not settle after {MAX_CONFLICT_ROUNDS} rounds")

    async def _write(self, session: AsyncClientSession, batch: Sequence[Write], moves: dict[str, tuple[int, int]],
                     fence: tuple[str, int] | None, extra: ExtraWrites | None) -> dict[str, tuple[int, int]]:
        if fence is not None:
            # A write, not a read: a takeover that bumps the epoch meanwhile makes this transaction
            # conflict (or match nothing), so a stale owner can never commit.
            owner, epoch = fence
            res = await self.owners.update_one({"_id": owner, "epoch": epoch}, {"$inc": {"commits": 1}},
                                               session=session)
            if res.matched_count != 1:
                raise Fenced(owner, epoch)
        # The checkpoints first: a reader whose range another copy committed meanwhile fails fast with
        # CheckpointMoved, before its events could meet that copy's on the unique index.
        await self._move_checkpoints(session, moves)
        positions = await self.take_positions(session, batch)
        docs = place_events(batch, positions)
        if docs:
            await self.events.insert_many(docs, ordered=False, session=session)
        await self.write_timers(session, batch)
        for collection, ops in (extra(batch) if extra else []):
            if ops:
                await self.db[collection].bulk_write(ops, ordered=False, session=session)
        return positions

    async def take_positions(self, session: AsyncClientSession,
                              batch: Sequence[Write]) -> dict[str, tuple[int, int]]:
        counts: dict[str, int] = {}
        for w in batch:
            for t in w.topics:
                if t is not None:
                    counts[t] = counts.get(t, 0) + 1
        positions = {}
        for topic in sorted(counts):  # a fixed order: two writers of the same topics never deadlock
            doc = await self.topics.find_one_and_update({"_id": topic}, {"$inc": {"pos": counts[topic]}},
                                                        upsert=True, return_document=ReturnDocument.AFTER,
                                                        session=session)
            end = int(doc["pos"])
            positions[topic] = (end - counts[topic], end)
        return positions

    async def _move_checkpoints(self, session: AsyncClientSession, moves: dict[str, tuple[int, int]]) -> None:
        for cid, (start, end) in sorted(moves.items()):
            if end == start:
                continue
            if start == 0:
                # No document yet means position 0; an existing one must still say 0. A duplicate key
                # here aborts the transaction on the server: raise at once, write nothing more.
                try:
                    res = await self.checkpoints.update_one({"_id": cid, "pos": 0}, {"$set": {"pos": end}},
                                                            upsert=True, session=session)
                except DuplicateKeyError as e:
                    raise CheckpointMoved([cid]) from e
                if res.matched_count == 0 and res.upserted_id is None:
                    raise CheckpointMoved([cid])
                continue
            res = await self.checkpoints.update_one({"_id": cid, "pos": start}, {"$set": {"pos": end}},
                                                    session=session)
            if res.matched_count != 1:
                raise CheckpointMoved([cid])

    async def write_timers(self, session: AsyncClientSession, batch: Sequence[Write]) -> None:
        ops: list[Any] = []
        for w in batch:
            if w.clear_timer:
                ops.append(DeleteOne({"_id": w.message_id}))
            if w.timer is not None:
                ops.append(ReplaceOne({"_id": w.message_id}, {**w.timer, "_id": w.message_id}, upsert=True))
        if ops:
            await self.timers.bulk_write(ops, ordered=True, session=session)

    # ---- reads ----------------------------------------------------------------------------------

    async def counters(self, topics: Iterable[str]) -> dict[str, int]:
        """The next free position of each topic (0 for a topic never written): one `_id` lookup."""
        names = list(topics)
        if not names:
            return {}
        try:
            found = {d["_id"]: int(d["pos"]) async for d in self.topics.find({"_id": {"$in": names}})}
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return {t: found.get(t, 0) for t in names}

    async def load_checkpoints(self, consumer: str, topics: Iterable[str]) -> dict[str, int]:
        """Checkpoint of `consumer` on each topic (0 when it never committed)."""
        ids = {checkpoint_id(consumer, t): t for t in topics}
        if not ids:
            return {}
        try:
            found = {d["_id"]: int(d["pos"]) async for d in self.checkpoints.find({"_id": {"$in": list(ids)}})}
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return {t: found.get(cid, 0) for cid, t in ids.items()}

    async def read(self, topic: str, start: int, end: int) -> list[dict[str, Any]]:
        """The events at positions [start, end) of `topic`, in order. `end` must not exceed the
        counter read before: such a range is complete (GapInTopic otherwise)."""
        if end <= start:
            return []
        try:
            docs = [d async for d in self.events.find({"topic": topic, "pos": {"$gte": start, "$lt": end}})
                    .sort("pos", ASCENDING)]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        if len(docs) != end - start:
            raise GapInTopic(topic, start, end, len(docs))
        return docs

    async def load_events(self, message_id: str) -> list[dict[str, Any]]:
        """Every event of one message, by seq (through the unique index)."""
        try:
            return [d async for d in self.events.find({"message_id": message_id}).sort("seq", ASCENDING)]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def load_many(self, message_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Every event of each message, by seq: one query for the whole batch."""
        ids = list(dict.fromkeys(message_ids))
        out: dict[str, list[dict[str, Any]]] = {m: [] for m in ids}
        if not ids:
            return out
        try:
            async for d in self.events.find({"message_id": {"$in": ids}}):
                out[d["message_id"]].append(d)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        for events in out.values():
            events.sort(key=lambda d: d["seq"])
        return out

    async def sent_by_smsc_ids(self, smsc_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The `sent` events that recorded any of these SMSC message ids, slimmed to what a receipt's
        outcome and bill need (SENT_FIELDS): decoding whole documents was a tenth of the connector."""
        if not smsc_ids:
            return []
        try:
            return await self.events.find({"data.smsc_message_ids": {"$in": list(smsc_ids)}, "type": "sent"},
                                          SENT_FIELDS).to_list(None)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e


async def drop_lost(pending: list[Write], lost: set[str], redecide: Redecide | None,
                    result: CommitResult) -> list[Write]:
    """The batch for the next round of a commit: the messages that lost a race on (message_id, seq)
    are dropped and reported in `result.conflicts`, or replaced by what `redecide` makes of them."""
    lost_ids = sorted(lost)
    keep = [w for w in pending if w.message_id not in lost]
    log.debug("commit: %d messages lost a race (e.g. message=%s)", len(lost_ids), lost_ids[0])
    if redecide is not None:
        keep.extend(await redecide(lost_ids))
    else:
        result.conflicts.extend(lost_ids)
    return keep


def place_events(batch: Sequence[Write], positions: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """The event documents of `batch` with their topic positions, in batch order."""
    nxt = {t: start for t, (start, _) in positions.items()}
    docs = []
    for w in batch:
        for event, topic in zip(w.events, w.topics, strict=True):
            if topic is None:
                docs.append({**event})  # a copy: the driver adds `_id` to what it inserts
            else:
                docs.append({**event, "topic": topic, "pos": nxt[topic]})
                nxt[topic] += 1
    return docs


def _conflicting_messages(e: Exception, batch: Sequence[Write]) -> set[str]:
    """Message ids whose event hit the (message_id, seq) unique index."""
    if isinstance(e, BulkWriteError):
        docs = [d for w in batch for d in w.events]
        out = set()
        for err in e.details.get("writeErrors", []):
            if err.get("code") != DUPLICATE_KEY:
                continue
            op = err.get("op") or {}
            mid = op.get("message_id")
            if mid is None and 0 <= err.get("index", -1) < len(docs):
                mid = docs[err["index"]].get("message_id")
            if mid is not None:
                out.add(mid)
        return out
    if isinstance(e, DuplicateKeyError):
        key = (e.details or {}).get("keyValue") or {}
        mid = key.get("message_id")
        return {mid} if mid else set()
    return set()


def spend_updates(per_tenant: dict[str, int], now: datetime) -> list[Any]:
    """`$inc` of each tenant's spend: one statement per tenant per batch."""
    return [UpdateOne({"_id": tenant}, {"$inc": {"spent_minor": amount}, "$set": {"spend_updated_at": now}})
            for tenant, amount in per_tenant.items() if amount]
