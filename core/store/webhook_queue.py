"""Webhook delivery jobs, read by position, and their delivery records (DESIGN.md, "the event log").

- `webhook_jobs`: one document per endpoint per fan-out batch: `{topic: "hook:<id>", pos, webhook_id,
  tenant_id, created_at, events: [payload, ...]}` (payload: core.domain.webhooks.payload). `pos` is
  dense in its topic, taken from the topic's counter (`topics`, the same `$inc` convention as
  core/store/topics.py) in the transaction that inserts the jobs: unique (topic, pos).
- The fan-out's resume point: `checkpoints` `{_id: "webhook-fanout", token, v}`, written in the same
  transaction as the jobs and guarded by `v` (compare and set): a crash before the commit re-reads
  the change stream from the old token and writes every job once; a second copy that read the same
  changes fails its commit (CheckpointMoved) and writes nothing.
- The dispatcher's checkpoint per topic is `webhooks|hook:<id>` (`pos`), moved by the commit that
  also inserts the batch's delivery record, fenced by the topic's owner epoch (core/store/owners.py).
- `webhook_deliveries`: one document per dispatched batch (or per flush of a long retry):
  `{webhook_id, tenant_id, topic, range, epoch, at, message_ids, attempts: [...]}`, found by
  `message_ids` (multikey index).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, InsertOne, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from core.store.errors import CheckpointMoved, GapInTopic, StoreUnavailable
from core.store.owners import Owners, Ownership
from core.store.topics import EventLog, checkpoint_id
from core.store.webhooks import hook_topic

DISPATCHER = "webhooks"  # consumer name of the dispatcher's checkpoints and owners
FANOUT_CHECKPOINT = "webhook-fanout"


@dataclass(frozen=True)
class NewJob:
    webhook_id: str
    tenant_id: str
    events: list[dict[str, Any]]
    replayed: bool = False  # enqueued again by a replay (a later replay does not copy it again)


def owner_key(topic: str) -> str:
    return checkpoint_id(DISPATCHER, topic)


class WebhookQueue:
    def __init__(self, db: AsyncDatabase) -> None:
        self.log = EventLog(db)
        self.jobs = db["webhook_jobs"]
        self.deliveries = db["webhook_deliveries"]
        self.checkpoints = db["checkpoints"]
        self.topics = db["topics"]
        self.attempts = db["attempts"]
        self.owners = Owners(db)

    async def ensure_indexes(self) -> None:
        try:
            await self.jobs.create_index([("topic", ASCENDING), ("pos", ASCENDING)], unique=True, name="topic_pos")
            await self.jobs.create_index([("webhook_id", ASCENDING), ("created_at", ASCENDING)],
                                         name="webhook_created")
            await self.deliveries.create_index("message_ids", name="message_ids")
            await self.deliveries.create_index([("webhook_id", ASCENDING), ("at", ASCENDING)], name="webhook_at")
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    # ---- fan-out -------------------------------------------------------------------------------

    async def fanout_token(self) -> tuple[str | None, int]:
        """(resume token as JSON text or None, version) of the fan-out."""
        try:
            doc = await self.checkpoints.find_one({"_id": FANOUT_CHECKPOINT})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return (None, 0) if doc is None else (doc.get("token"), int(doc.get("v", 0)))

    async def commit_fanout(self, jobs: Sequence[NewJob], token: str, version: int, now: datetime) -> int:
        """Insert `jobs` (positions from their topics' counters) and move the fan-out's token from
        `version` to `version + 1`, in one transaction. Returns the documents written; raises
        CheckpointMoved if the version is not `version` (nothing written)."""

        async def body(session: AsyncClientSession) -> int:
            await self._move_token(session, token, version)
            return 1 + await self._insert_jobs(session, jobs, now)

        try:
            return int(await self.log.transaction(body))
        except DuplicateKeyError as e:
            raise CheckpointMoved([FANOUT_CHECKPOINT]) from e

    async def enqueue(self, jobs: Sequence[NewJob], now: datetime) -> int:
        """Insert `jobs` at the ends of their topics (a replay). Returns the documents written."""
        return int(await self.log.transaction(lambda s: self._insert_jobs(s, jobs, now)))

    async def _move_token(self, session: AsyncClientSession, token: str, version: int) -> None:
        if version == 0:
            # No document yet: the insert fails on `_id` if another copy created it meanwhile.
            await self.checkpoints.insert_one({"_id": FANOUT_CHECKPOINT, "token": token, "v": 1}, session=session)
            return
        res = await self.checkpoints.update_one({"_id": FANOUT_CHECKPOINT, "v": version},
                                                {"$set": {"token": token, "v": version + 1}}, session=session)
        if res.matched_count != 1:
            raise CheckpointMoved([FANOUT_CHECKPOINT])

    async def _insert_jobs(self, session: AsyncClientSession, jobs: Sequence[NewJob], now: datetime) -> int:
        docs = []
        for topic, group in _by_topic(jobs).items():
            counter = await self.topics.find_one_and_update({"_id": topic}, {"$inc": {"pos": len(group)}},
                                                            upsert=True, return_document=ReturnDocument.AFTER,
                                                            session=session)
            assert counter is not None  # upserted
            start = int(counter["pos"]) - len(group)
            docs += [{"topic": topic, "pos": start + i, "webhook_id": j.webhook_id, "tenant_id": j.tenant_id,
                      "created_at": now, "events": j.events, **({"replayed": True} if j.replayed else {})}
                     for i, j in enumerate(group)]
        if docs:
            await self.jobs.insert_many(docs, ordered=True, session=session)
        return len(docs) + len(_by_topic(jobs))

    # ---- dispatcher ----------------------------------------------------------------------------

    async def positions(self, topics: Sequence[str]) -> dict[str, tuple[int, int]]:
        """topic -> (dispatcher checkpoint, counter): two `_id` lookups for all topics."""
        counters = await self.log.counters(topics)
        checkpoints = await self.log.load_checkpoints(DISPATCHER, topics)
        return {t: (checkpoints[t], counters[t]) for t in topics}

    async def read(self, topic: str, start: int, end: int) -> list[dict[str, Any]]:
        """The jobs at [start, end) of `topic` in order (GapInTopic if the range is not complete)."""
        if end <= start:
            return []
        try:
            docs = await self.jobs.find({"topic": topic, "pos": {"$gte": start, "$lt": end}}).sort(
                "pos", ASCENDING).to_list(None)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        if len(docs) != end - start:
            raise GapInTopic(topic, start, end, len(docs))
        return docs

    async def record_attempt(self, own: Ownership, topic: str, start: int, end: int, message_ids: list[str],
                             now: datetime) -> None:
        """Insert the attempt document of one batch before any POST, fenced by the epoch like the
        connector's (core/store/owners.py): an owner replaced meanwhile gets `Fenced` and POSTs
        nothing, so every event sent twice is one its successor found in an open attempt, and counted."""
        await self.owners.record_attempt(own, {topic: (start, end)}, message_ids, now)

    async def record(self, own: Ownership, topic: str, move: tuple[int, int] | None, doc: dict[str, Any]) -> int:
        """Insert one delivery record and, with `move`, move the topic's checkpoint, in one transaction
        fenced by `own` (Fenced / CheckpointMoved: nothing written). Returns the documents written."""
        moves = {checkpoint_id(DISPATCHER, topic): move} if move is not None else {}
        await self.log.commit([], moves=moves, fence=own.fence,
                              extra=lambda _: [("webhook_deliveries", [InsertOne(doc)])])
        return 2 + (1 if move is not None else 0)

    # ---- reads for the API -----------------------------------------------------------------------

    async def deliveries_of(self, tenant_id: str, message_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Every recorded attempt for `message_id`'s events (of `tenant_id`), oldest first."""
        try:
            docs = await self.deliveries.find({"message_ids": message_id, "tenant_id": tenant_id}).sort(
                "at", ASCENDING).to_list(limit)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return [{**a, "webhook_id": d["webhook_id"]} for d in docs for a in d["attempts"]
                if a["message_id"] == message_id]

    async def jobs_since(self, webhook_id: str, since: datetime, limit: int) -> list[dict[str, Any]]:
        """The endpoint's jobs created at or after `since`, oldest first, at most `limit`."""
        try:
            return await self.jobs.find({"webhook_id": webhook_id, "created_at": {"$gte": since},
                                         "replayed": {"$exists": False}},
                                        {"events": 1, "created_at": 1, "tenant_id": 1}).sort(
                [("created_at", ASCENDING), ("pos", ASCENDING)]).to_list(limit)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def backlog(self, webhook_ids: Sequence[str]) -> int:
        """Jobs not yet dispatched over these endpoints' topics (counter - checkpoint, summed)."""
        if not webhook_ids:
            return 0
        pos = await self.positions([hook_topic(w) for w in webhook_ids])
        return sum(max(0, end - start) for start, end in pos.values())

    async def purge(self, webhook_id: str, below: int, jobs_before: datetime, deliveries_before: datetime
                    ) -> tuple[int, int]:
        """Retention: the endpoint's jobs below its checkpoint (`below`, delivered or given up: never
        read again) created before `jobs_before`, and its delivery records older than
        `deliveries_before`. Returns how many of each were deleted."""
        try:
            jobs = await self.jobs.delete_many({"topic": hook_topic(webhook_id), "pos": {"$lt": below},
                                                "created_at": {"$lt": jobs_before}})
            records = await self.deliveries.delete_many({"webhook_id": webhook_id, "at": {"$lt": deliveries_before}})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return jobs.deleted_count, records.deleted_count

    async def newest_delivery(self, webhook_id: str) -> dict[str, Any] | None:
        try:
            return await self.deliveries.find_one({"webhook_id": webhook_id}, sort=[("at", DESCENDING)])
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e


def _by_topic(jobs: Sequence[NewJob]) -> dict[str, list[NewJob]]:
    out: dict[str, list[NewJob]] = {}
    for j in jobs:
        out.setdefault(hook_topic(j.webhook_id), []).append(j)
    return dict(sorted(out.items()))  # a fixed order of counter writes: two writers never deadlock
