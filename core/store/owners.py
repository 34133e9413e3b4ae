"""Owners and attempts: how a stage with a side effect outside MongoDB (the connector's submit_sm, a
webhook call) keeps "one attempt per batch, nothing sent twice without the log saying so".

- `owners`: `{_id: owner key (e.g. "connector|send:sim"), holder, epoch, lease_until}`. One process
  owns a key at a time. `acquire` takes a free or expired key and bumps its `epoch` (the fencing
  token); every commit of the owner is guarded by its epoch (`EventLog.commit(fence=...)`), so a
  paused or replaced owner can never commit over the new one. The holder renews its lease well
  before it ends and stops sending when it cannot.
- `attempt_fences`: `{_id: owner key, epoch, at}`, the epoch again, written by `acquire` in the same
  transaction as the owner document. `record_attempt` guards its insert by writing this document,
  not the owner document: the attempt of the next batch and the commit of the previous one (which
  writes the owner document) run at the same time, and on one document they conflicted (aborted and
  retried transactions, seen in a profile of the server); a takeover still writes both, so either
  write of a stale owner conflicts with it or finds a newer epoch.
- `attempts`: one document per batch, inserted BEFORE the side effect: `{owner, epoch, ranges:
  {topic: [from, to]}, message_ids, at}`. It is never updated: the batch's commit moves the
  checkpoints past its ranges, which is what resolves it. A new owner that finds an attempt whose
  range reaches past a checkpoint knows exactly which messages may have left without their outcome
  being recorded, and applies the route's unknown-outcome policy to those.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from core.store.errors import Fenced, StoreUnavailable
from core.store.topics import EventLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ownership:
    owner: str
    holder: str
    epoch: int
    lease_until: datetime

    @property
    def fence(self) -> tuple[str, int]:
        return (self.owner, self.epoch)


@dataclass(frozen=True)
class OpenAttempt:
    """Positions an earlier owner attempted and never committed: their outcome is unknown."""

    attempt_id: str
    epoch: int
    topic: str
    start: int
    end: int
    message_ids: tuple[str, ...]


class Owners:
    def __init__(self, db: AsyncDatabase) -> None:
        self.owners = db["owners"]
        self.attempts = db["attempts"]
        self.fences = db["attempt_fences"]
        self.log = EventLog(db)

    async def ensure_indexes(self) -> None:
        await self.attempts.create_index([("owner", ASCENDING), ("at", ASCENDING)], name="owner_at")

    async def acquire(self, owner: str, holder: str, now: datetime, lease_s: float) -> Ownership | None:
        """Take `owner` if it is free, expired, or already ours; None if another holder's lease runs.

        In a transaction on purpose: a holder killed in the middle of a commit leaves that
        transaction open on the server, holding the owner document. A plain write would wait on it
        (some servers reap idle transactions only when another transaction statement comes along);
        in a transaction the conflict surfaces at once, the driver retries, and the retry lets the
        server reap the dead holder's transaction after its lifetime limit.
        """
        until = now + timedelta(seconds=lease_s)

        async def body(session: Any) -> dict[str, Any] | None:
            doc = await self.owners.find_one_and_update(
                {"_id": owner, "$or": [{"lease_until": {"$lte": now}}, {"holder": holder}]},
                {"$set": {"holder": holder, "lease_until": until, "acquired_at": now}, "$inc": {"epoch": 1}},
                return_document=ReturnDocument.AFTER, session=session)
            if doc is None:
                if await self.owners.find_one({"_id": owner}, {"_id": 1}, session=session) is not None:
                    return None  # somebody else holds it
                doc = {"_id": owner, "holder": holder, "lease_until": until, "acquired_at": now, "epoch": 1,
                       "commits": 0}
                await self.owners.insert_one(doc, session=session)
            await self.fences.update_one({"_id": owner}, {"$set": {"epoch": doc["epoch"], "at": now}}, upsert=True,
                                         session=session)
            return dict(doc)

        try:
            doc = await self.log.transaction(body)
        except DuplicateKeyError:
            return None  # created by another holder at the same moment
        if doc is None:
            return None
        log.info("owner %s acquired by %s (epoch %d)", owner, holder, doc["epoch"])
        return Ownership(owner, holder, int(doc["epoch"]), until)

    async def renew(self, own: Ownership, now: datetime, lease_s: float) -> Ownership:
        """Extend the lease; raises Fenced if another holder took over meanwhile."""
        until = now + timedelta(seconds=lease_s)
        try:
            res = await self.owners.update_one({"_id": own.owner, "epoch": own.epoch},
                                               {"$set": {"lease_until": until}})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        if res.matched_count != 1:
            raise Fenced(own.owner, own.epoch)
        return Ownership(own.owner, own.holder, own.epoch, until)

    async def release(self, own: Ownership, now: datetime) -> None:
        """Give the key up at once (graceful stop): a standby may take it without waiting."""
        try:
            await self.owners.update_one({"_id": own.owner, "epoch": own.epoch}, {"$set": {"lease_until": now}})
        except PyMongoError as e:
            log.warning("owner %s: could not release (it expires by itself): %s", own.owner, e)

    async def record_attempt(self, own: Ownership, ranges: dict[str, tuple[int, int]], message_ids: list[str],
                             now: datetime) -> str:
        """Insert the attempt document of one batch, guarded by the epoch (on `attempt_fences`, see the
        module doc), before any side effect."""
        attempt_id = uuid.uuid4().hex

        async def body(session: Any) -> None:
            res = await self.fences.update_one({"_id": own.owner, "epoch": own.epoch}, {"$set": {"at": now}},
                                               session=session)
            if res.matched_count != 1:
                raise Fenced(own.owner, own.epoch)
            await self.attempts.insert_one(
                {"_id": attempt_id, "owner": own.owner, "epoch": own.epoch, "at": now,
                 "ranges": {t: [a, b] for t, (a, b) in ranges.items()}, "message_ids": message_ids},
                session=session)

        await self.log.transaction(body)
        return attempt_id

    async def open_attempts(self, owner: str, checkpoints: dict[str, int]) -> list[OpenAttempt]:
        """Ranges of earlier attempts of `owner` that reach past the checkpoints (topic -> position;
        a topic missing from the dict is read from the store)."""
        out: list[OpenAttempt] = []
        try:
            docs = [d async for d in self.attempts.find({"owner": owner}).sort("at", ASCENDING)]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        consumer = owner.split("|", 1)[0]
        missing = {t for d in docs for t in d["ranges"] if t not in checkpoints}
        if missing:
            checkpoints = {**checkpoints, **await self.log.load_checkpoints(consumer, missing)}
        for d in docs:
            for topic, (start, end) in d["ranges"].items():
                if end > checkpoints.get(topic, 0):
                    out.append(OpenAttempt(d["_id"], int(d["epoch"]), topic, max(start, checkpoints.get(topic, 0)),
                                           end, tuple(d.get("message_ids", ()))))
        return out

    async def forget_resolved(self, owner: str, checkpoints: dict[str, int], keep: int = 100) -> int:
        """Delete attempt documents whose every range lies below the checkpoints (housekeeping: a
        resolved attempt says nothing the log does not), keeping the newest `keep`."""
        try:
            docs = [d async for d in self.attempts.find({"owner": owner}, {"ranges": 1}).sort("at", -1).skip(keep)]
            done = [d["_id"] for d in docs
                    if all(end <= checkpoints.get(t, -1) for t, (_, end) in d["ranges"].items())]
            if done:
                await self.attempts.delete_many({"_id": {"$in": done}})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return len(done)
