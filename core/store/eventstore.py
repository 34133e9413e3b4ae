"""The event log and its heads in MongoDB: append with an expected version, claim due work.

Contract:
- `events` holds immutable facts, unique on (message_id, seq); nothing here updates or deletes one.
- Every event is written in the same transaction as its head, and the head write is guarded by the
  version the writer read (and by its lease token, for leased stages). A writer that lost a race
  changes nothing; `commit` reports it as a conflict and commits the rest of its batch.
- Work is found by claiming heads of one queue whose `due_at` has passed. Stages with a side effect
  outside MongoDB (the SMSC connector) take a lease first; the lease records the attempt.
- Every write to `events` and `streams` runs in a transaction, even a lone lease update: conflicts
  then surface as TransientTransactionError, which the driver retries. (On the embedded server a
  plain multi-document update that meets an open transaction waits on it under a collection lock,
  which stalled the whole pipeline under load.)
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReplaceOne, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from core.domain.events import Event, utcnow
from core.domain.message import MessageState, queue_name
from core.store.cursor import EPOCH, QueueCursor
from core.store.heads import NOT_LEASED, head_doc, state_from_head

log = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
MAX_SLICES_PER_SCAN = 20
LEASE_PROJECTION = {"version": 1, "lease_token": 1, "due_at": 1}


SideWrites = Callable[[Sequence["Transition"]], list[tuple[str, list[Any]]]]


class _Conflict(Exception):
    """Raised inside a transaction to abort it: some head moved on since it was read."""


@dataclass(frozen=True)
class Transition:
    """New events for one message and its head afterwards, guarded by the version read."""

    expected_version: int
    events: Sequence[Event]
    state: MessageState
    due_at: datetime | None = None
    lease_token: str | None = None
    head_extra: dict[str, Any] = field(default_factory=dict)
    # Only if nobody holds a live lease on the head (e.g. cancel a message unless a connector is
    # sending it right now): a lease does not change the version, so the version alone cannot say.
    unleased: bool = False

    @property
    def message_id(self) -> str:
        return self.state.message_id


@dataclass(frozen=True)
class Claimed:
    """A head claimed by a stage. `token` is set for leased claims; `prior_lease` says a previous
    holder's lease expired without an outcome (the attempt's result is unknown)."""

    state: MessageState
    token: str | None = None
    prior_lease: bool = False


@dataclass
class CommitResult:
    committed: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IdempotencyRecord:
    key: str  # "<tenant_id>:<client key>"
    request_hash: str
    message_ids: list[str]


class IdempotencyReplay(Exception):
    """The idempotency key was used before; carries the earlier record."""

    def __init__(self, record: dict[str, Any]) -> None:
        super().__init__(record["_id"])
        self.record = record


class EventStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.events = db["events"]
        self.streams = db["streams"]
        self.idempotency = db["idempotency"]
        # Durable writes: majority where the server supports it (a single node acknowledges alone).
        self._wc = WriteConcern("majority")
        self._rc = ReadConcern("majority")

    async def ensure_indexes(self) -> None:
        await self.events.create_index([("message_id", ASCENDING), ("seq", ASCENDING)], unique=True,
                                       name="message_seq")
        # Receipts are matched through the `sent` events: an insert-only collection, so each entry of
        # this index is written once, instead of on every head write as an index on `streams` would be.
        await self.events.create_index("data.smsc_message_ids", name="sent_smsc_ids", sparse=True)
        # `streams` keeps a single secondary index: every head write pays for each index it has.
        await self.streams.create_index([("queue", ASCENDING), ("due_at", ASCENDING)], name="queue_due")

    # ---- transactions -------------------------------------------------------------------------

    async def _in_transaction(self, body: Any) -> Any:
        """Run `body(session)` in a transaction; the driver retries TransientTransactionError and
        UnknownTransactionCommitResult as its documented rules say."""
        async with self.db.client.start_session() as session:
            return await session.with_transaction(body, read_concern=self._rc, write_concern=self._wc)

    async def accept(self, items: Sequence[tuple[Event, dict[str, Any]]],
                     idempotency: IdempotencyRecord | None = None,
                     side_writes: Sequence[tuple[str, list[Any]]] = ()) -> None:
        """Append the first event of new streams with their heads, in one transaction, together with
        `side_writes` (collection name, bulk operations), e.g. a campaign's counters.

        Raises IdempotencyReplay if the idempotency key was used before (nothing is written then).
        """

        async def body(session: AsyncClientSession) -> None:
            if idempotency is not None:
                await self.idempotency.insert_one(
                    {"_id": idempotency.key, "request_hash": idempotency.request_hash,
                     "message_ids": idempotency.message_ids, "created_at": items[0][0].at if items else None},
                    session=session,
                )
            if items:
                await self.events.insert_many([e.to_doc() for e, _ in items], ordered=False, session=session)
                await self.streams.insert_many([h for _, h in items], ordered=False, session=session)
            for collection, writes in side_writes:
                if writes:
                    await self.db[collection].bulk_write(writes, ordered=False, session=session)

        try:
            await self._in_transaction(body)
        except (DuplicateKeyError, BulkWriteError) as e:
            if idempotency is not None and _is_duplicate(e):
                existing = await self.idempotency.find_one({"_id": idempotency.key})
                if existing is not None:
                    raise IdempotencyReplay(existing) from e
            raise

    async def commit(self, transitions: Sequence[Transition], now: datetime,
                     side_writes: SideWrites | None = None) -> CommitResult:
        """Append each transition's events and replace its head, all in one transaction.

        Transitions whose head moved on (another writer, or a lost lease) are dropped and reported in
        `conflicts`; the others are committed together. `side_writes(batch)` returns further writes
        (collection name, operations) that belong to exactly the transitions committed, such as a
        tenant's spend; it is called again for whatever remains after a conflict.
        """
        result = CommitResult()
        pending = list(transitions)
        for _ in range(5):
            if not pending:
                return result
            try:
                await self._in_transaction(lambda s, batch=pending: self._write(batch, now, s, side_writes))
                result.committed.extend(t.message_id for t in pending)
                return result
            except (_Conflict, DuplicateKeyError, BulkWriteError) as e:
                if not isinstance(e, _Conflict) and not _is_duplicate(e):
                    raise
                pending, lost = await self._drop_stale(pending, now)
                result.conflicts.extend(lost)
                log.debug("commit: %d lost a race and were dropped: %s", len(lost), lost[:5])
        raise RuntimeError("commit: conflicts did not settle after 5 rounds")

    async def _write(self, batch: Sequence[Transition], now: datetime, session: AsyncClientSession,
                     side_writes: SideWrites | None) -> None:
        docs = [e.to_doc() for t in batch for e in t.events]
        if docs:
            await self.events.insert_many(docs, ordered=False, session=session)
        ops = []
        for t in batch:
            guard: dict[str, Any] = {"_id": t.message_id, "version": t.expected_version}
            if t.lease_token is not None:
                guard["lease_token"] = t.lease_token
            if t.unleased:
                guard["lease_until"] = {"$lte": now}
            ops.append(ReplaceOne(guard, head_doc(t.state, now=now, due_at=t.due_at, **t.head_extra)))
        res = await self.streams.bulk_write(ops, ordered=False, session=session)
        if res.matched_count != len(ops):
            raise _Conflict()
        for collection, writes in (side_writes(batch) if side_writes else []):
            if writes:
                await self.db[collection].bulk_write(writes, ordered=False, session=session)

    async def _drop_stale(self, batch: list[Transition], now: datetime) -> tuple[list[Transition], list[str]]:
        heads = {
            d["_id"]: d
            async for d in self.streams.find({"_id": {"$in": [t.message_id for t in batch]}},
                                             {"version": 1, "lease_token": 1, "lease_until": 1})
        }
        keep, lost = [], []
        for t in batch:
            h = heads.get(t.message_id)
            fresh = h is not None and h["version"] == t.expected_version and (
                t.lease_token is None or h.get("lease_token") == t.lease_token) and (
                not t.unleased or h.get("lease_until", NOT_LEASED) <= now)
            (keep if fresh else lost).append(t if fresh else t.message_id)  # type: ignore[arg-type]
        return keep, lost  # type: ignore[return-value]

    # ---- claims ---------------------------------------------------------------------------------

    async def due(self, queue: str, now: datetime, limit: int, cursor: QueueCursor | None = None) -> list[Claimed]:
        """Heads of `queue` whose time has come, oldest first; no lease (the commit's version guard
        settles races). With a cursor, only its window is scanned (see core/store/cursor.py)."""
        docs = await self.scan(queue, now, limit, cursor, projection=None)
        return [Claimed(state_from_head(d)) for d in docs]

    async def scan(self, queue: str, now: datetime, limit: int, cursor: QueueCursor | None,
                    projection: dict[str, int] | None) -> list[dict[str, Any]]:
        """Up to `limit` due heads of `queue`, oldest first (the cursor's window when one is given)."""
        for _ in range(MAX_SLICES_PER_SCAN):
            lo, hi = cursor.window(now) if cursor else (EPOCH, now)
            found = [d async for d in self.streams.find({"queue": queue, "due_at": {"$gte": lo, "$lte": hi}},
                                                        projection).sort("due_at", ASCENDING).limit(limit)]
            if cursor is None:
                return found
            full = len(found) >= limit
            if not cursor.advance(now, hi, full, found[-1]["due_at"] if found else None):
                return found
        return []

    async def claim(self, queue: str, now: datetime, limit: int, owner: str, lease_s: float,
                    cursor: QueueCursor | None = None) -> list[Claimed]:
        """Lease up to `limit` due heads of `queue` for `lease_s` seconds and count the attempt.

        The lease moves `due_at` to the lease's end: if the holder dies, the head falls due again
        then, and the next claim sees the earlier attempt (`prior_lease`). Three round trips whatever
        the batch size: find candidates, lease them in one transaction, read back what was won.
        """
        if limit <= 0:
            return []
        found = await self.scan(queue, now, limit, cursor, projection=LEASE_PROJECTION)
        return await self.lease(found, now, owner, lease_s)

    async def lease(self, found: Sequence[dict[str, Any]], now: datetime, owner: str,
                    lease_s: float) -> list[Claimed]:
        """Lease heads found by `scan(..., projection=LEASE_PROJECTION)`; returns those won."""
        if not found:
            return []
        # A head whose previous lease expired without an outcome: that attempt's result is unknown.
        prior = {d["_id"] for d in found if d.get("lease_token") is not None}
        token = uuid.uuid4().hex
        until = now + timedelta(seconds=lease_s)
        lease = {"$set": {"lease_owner": owner, "lease_token": token, "lease_until": until, "due_at": until},
                 "$inc": {"attempts": 1}}
        # One statement per head, guarded by the version read and by being due: a head another worker
        # leased or moved on since the find is left alone. The filter names only `_id`, `version` and
        # `due_at` on purpose: with the queue field in it, a server may plan each statement on the
        # queue index and scan the whole queue. In a transaction like every write to `streams`, so a
        # conflict is retried by the driver.
        ops = [UpdateOne({"_id": d["_id"], "version": d["version"], "due_at": {"$lte": now}}, lease) for d in found]
        await self._in_transaction(lambda s: self.streams.bulk_write(ops, ordered=False, session=s))
        won = [d async for d in self.streams.find({"_id": {"$in": [d["_id"] for d in found]}})
               if d.get("lease_token") == token]
        return [Claimed(state_from_head(d), token=token, prior_lease=d["_id"] in prior) for d in won]

    async def release(self, claims: Sequence[Claimed], due_at: datetime) -> None:
        """Give leased heads back untouched (e.g. shutdown before sending), undoing the attempt count."""
        ops = [UpdateOne({"_id": c.state.message_id, "lease_token": c.token},
                         {"$set": {"lease_owner": None, "lease_token": None, "lease_until": NOT_LEASED,
                                   "due_at": due_at}, "$inc": {"attempts": -1}})
               for c in claims if c.token]
        if ops:
            await self._in_transaction(lambda s: self.streams.bulk_write(ops, ordered=False, session=s))

    # ---- reads ----------------------------------------------------------------------------------

    async def head(self, message_id: str) -> dict[str, Any] | None:
        return await self.streams.find_one({"_id": message_id})

    async def load_events(self, message_id: str) -> list[Event]:
        cursor = self.events.find({"message_id": message_id}).sort("seq", ASCENDING)
        return [Event.from_doc(d) async for d in cursor]

    async def heads_by_smsc_ids(self, route_id: str, smsc_ids: Sequence[str]) -> list[MessageState]:
        """Heads of the messages that `sent` these SMSC ids on `route_id`."""
        sent = self.events.find({"data.smsc_message_ids": {"$in": list(smsc_ids)}, "type": "sent"},
                                {"message_id": 1, "route_id": 1})
        ids = list({e["message_id"] async for e in sent if e.get("route_id") == route_id})
        if not ids:
            return []
        return [state_from_head(d) async for d in self.streams.find({"_id": {"$in": ids}})]

    async def any_unfinished(self) -> bool:
        """Whether some stage still has work on any head. Shallow queues cost one index probe; a lane
        (a campaign's, possibly millions deep) is probed slice by slice from its floor
        (core/store/lanes.py), since an unbounded query would cost all its heads on some servers."""
        from core.store.lanes import deep_cursor, lane_has_heads  # lanes builds on this module

        stages = ["route", *[f"send:{r}" for r in await self.db["routes"].distinct("_id")]]
        if await self.streams.find_one({"queue": {"$in": ["receipt", "bill", *stages]}}, {"_id": 1}) is not None:
            return True
        now = utcnow()
        async for lane in self.db["lanes"].find({}, {"since": 1, "created_at": 1}):
            floor = lane.get("since") or lane.get("created_at")
            for stage in stages:
                if await lane_has_heads(self, queue_name(stage, lane["_id"]), deep_cursor(floor), now):
                    return True
        return False

    async def heads_by_ids(self, ids: Sequence[str]) -> dict[str, MessageState]:
        return {d["_id"]: state_from_head(d) async for d in self.streams.find({"_id": {"$in": list(ids)}})}


def _is_duplicate(e: Exception) -> bool:
    if isinstance(e, DuplicateKeyError):
        return True
    if isinstance(e, BulkWriteError):
        return any(err.get("code") == DUPLICATE_KEY for err in e.details.get("writeErrors", []))
    return isinstance(e, OperationFailure) and e.code == DUPLICATE_KEY
