"""The event store: acceptance of new messages (with idempotency), and reads of a message's life.

Contract:
- `events` holds immutable facts, unique on (message_id, seq); nothing here updates or deletes one.
- A message's state is the fold of its events (`state`), read through the unique index: no head is
  kept per message, so nothing is rewritten per message on the happy path.
- `accept` appends the first event of each new message, handing it to the router's topic of its
  lane (or to a timer when it is scheduled for later), in one transaction with the idempotency record
  and any side writes (a campaign's counters). All or nothing.
- Work moves between stages through topics read by position (core/store/topics.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from core import metrics
from core.domain.events import Event
from core.domain.message import MessageState, fold
from core.store.errors import StoreUnavailable
from core.store.topics import EventLog, Write, place_events

log = logging.getLogger(__name__)


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
        self.log = EventLog(db)
        self.events = db["events"]
        self.idempotency = db["idempotency"]

    async def ensure_indexes(self) -> None:
        from core.store.owners import Owners

        await self.log.ensure_indexes()
        await Owners(self.db).ensure_indexes()

    async def accept(self, writes: Sequence[Write], idempotency: IdempotencyRecord | None = None,
                     side_writes: Sequence[tuple[str, list[Any]]] = ()) -> None:
        """Append the first events of new messages (see `Write`) in one transaction, together with
        the idempotency record and `side_writes` (collection name, bulk operations).

        Raises IdempotencyReplay if the idempotency key was used before (nothing is written then),
        DuplicateKeyError if a message id exists already (nothing is written).
        """

        async def body(session: AsyncClientSession) -> None:
            if idempotency is not None:
                created = writes[0].events[0]["at"] if writes else None
                await self.idempotency.insert_one(
                    {"_id": idempotency.key, "request_hash": idempotency.request_hash,
                     "message_ids": idempotency.message_ids, "created_at": created}, session=session)
            for collection, ops in side_writes:
                if ops:
                    await self.db[collection].bulk_write(ops, ordered=False, session=session)

        try:
            await self._commit_with(writes, body)
        except DuplicateKeyError as e:
            if idempotency is not None and _key_of(e).get("_id") == idempotency.key:
                existing = await self.idempotency.find_one({"_id": idempotency.key})
                if existing is not None:
                    raise IdempotencyReplay(existing) from e
            raise

    async def _commit_with(self, writes: Sequence[Write], before: Any) -> None:
        async def body(session: AsyncClientSession) -> None:
            await before(session)
            positions = await self.log.take_positions(session, writes)
            docs = place_events(writes, positions)
            if docs:
                await self.events.insert_many(docs, ordered=False, session=session)
            await self.log.write_timers(session, writes)

        await self.log.transaction(body)
        metrics.count_committed(writes, (w.message_id for w in writes))

    # ---- reads ----------------------------------------------------------------------------------

    async def load_events(self, message_id: str) -> list[Event]:
        return [Event.from_doc(d) for d in await self.log.load_events(message_id)]

    async def state(self, message_id: str) -> MessageState | None:
        """The message's current state: the fold of its events (None if it does not exist)."""
        return fold(await self.load_events(message_id))

    async def states(self, message_ids: Iterable[str]) -> dict[str, MessageState]:
        """Fold of each existing message, one query for all."""
        out = {}
        for mid, docs in (await self.log.load_many(message_ids)).items():
            state = fold([Event.from_doc(d) for d in docs])
            if state is not None:
                out[mid] = state
        return out

    async def exists(self, message_ids: Iterable[str]) -> set[str]:
        """Which of these message ids have a first event."""
        ids = list(message_ids)
        if not ids:
            return set()
        try:
            return {d["message_id"] async for d in self.events.find({"message_id": {"$in": ids}, "seq": 1},
                                                                    {"message_id": 1})}
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e


def _key_of(e: DuplicateKeyError) -> dict[str, Any]:
    return (e.details or {}).get("keyValue") or {}
