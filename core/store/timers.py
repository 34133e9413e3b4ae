"""Timers: messages that wait for a time (retry back-off, `send_at`, a suspended tenant's hold).

One document per waiting message (`_id` = message id), written in the same transaction as the event
that made it wait (`Write.timer`): `{message_id, tenant_id, topic, seq, due_at, reason, lane,
campaign_id}`. `seq` is the message's last seq when the timer was set. The scheduler releases due
timers by appending a `released` event (seq + 1) into `topic` and deleting the timer, in one
transaction: released exactly once (a second releaser loses on the unique (message_id, seq) index).
Nothing on the happy path writes a timer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DeleteOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.domain.events import SCHEMA_VERSION
from core.store.errors import StoreUnavailable
from core.store.topics import EventLog, Write

log = logging.getLogger(__name__)

HOLD_S = 5.0  # a suspended tenant's timer is looked at again this much later


def timer_doc(*, message_id: str, tenant_id: str, topic: str, seq: int, due_at: datetime, reason: str,
              lane: str = "", campaign_id: str | None = None, channel: str = "sms") -> dict[str, Any]:
    return {"message_id": message_id, "tenant_id": tenant_id, "topic": topic, "seq": seq, "due_at": due_at,
            "reason": reason, "lane": lane, "campaign_id": campaign_id, "channel": channel}


def released_event(timer: dict[str, Any], now: datetime) -> dict[str, Any]:
    return {"message_id": timer["message_id"], "seq": int(timer["seq"]) + 1, "type": "released", "at": now,
            "tenant_id": timer["tenant_id"], "route_id": None, "channel": timer.get("channel", "sms"),
            "v": SCHEMA_VERSION, "data": {"reason": timer["reason"], "topic": timer["topic"]}}


@dataclass
class ReleaseResult:
    released: list[str] = field(default_factory=list)
    postponed: list[str] = field(default_factory=list)  # suspended tenants
    obsolete: list[str] = field(default_factory=list)  # the message moved on meanwhile: timer dropped


def release_plan(due: list[dict[str, Any]], now: datetime, suspended: Callable[[str], bool],
                 canceling: Collection[str] = ()
                 ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]], list[Write]]:
    """Split due timers into those held (suspended tenant) and those to release, with the writes
    that release them (a `released` event into the timer's topic, the timer cleared). A timer in a
    `canceling` lane is released even for a suspended tenant: its stage cancels it on reading, and
    the cancel completes without waiting for the tenant to come back."""

    def holds(t: dict[str, Any]) -> bool:
        return suspended(t["tenant_id"]) and t.get("lane", "") not in canceling

    held = [t for t in due if holds(t)]
    go = {t["_id"]: t for t in due if not holds(t)}
    writes = [Write(mid, [released_event(t, now)], [t["topic"]], clear_timer=True) for mid, t in go.items()]
    return held, go, writes


def obsolete_collector(result: ReleaseResult) -> Callable[[list[str]], Awaitable[list[Write]]]:
    """The `redecide` of a release: a message whose next seq was taken meanwhile (an operator, a late
    receipt) is no longer described by its timer. Its timer is dropped; whatever moved the message on
    decides its future."""

    async def obsolete(ids: list[str]) -> list[Write]:
        result.obsolete.extend(ids)
        for mid in ids:
            log.warning("timer message=%s: the message moved on before its release; timer dropped", mid)
        return []

    return obsolete


class Timers:
    def __init__(self, db: AsyncDatabase) -> None:
        self.timers = db["timers"]
        self.log = EventLog(db)

    async def due(self, now: datetime, limit: int) -> list[dict[str, Any]]:
        try:
            return [d async for d in self.timers.find({"due_at": {"$lte": now}}).sort("due_at", ASCENDING)
                    .limit(limit)]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def count(self, query: dict[str, Any] | None = None) -> int:
        try:
            return await self.timers.count_documents(query or {})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def any_for_lane(self, lane: str) -> bool:
        try:
            return await self.timers.find_one({"lane": lane}, {"_id": 1}) is not None
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def release_due(self, now: datetime, limit: int, suspended: Callable[[str], bool],
                          canceling: Collection[str] = ()) -> ReleaseResult:
        """Release up to `limit` due timers into their topics; a suspended tenant's are postponed
        (unless their lane is `canceling`)."""
        result = ReleaseResult()
        due = await self.due(now, limit)
        if not due:
            return result
        held, go, writes = release_plan(due, now, suspended, canceling)
        if held:
            try:
                await self.timers.bulk_write([UpdateOne({"_id": t["_id"]}, {"$set": {
                    "due_at": now + timedelta(seconds=HOLD_S)}}) for t in held], ordered=False)
            except PyMongoError as e:
                raise StoreUnavailable(str(e)) from e
            result.postponed = [t["_id"] for t in held]
        if writes:
            res = await self.log.commit(writes, redecide=obsolete_collector(result))
            result.released = res.committed
            if result.obsolete:
                try:
                    await self.timers.bulk_write([DeleteOne({"_id": m, "seq": go[m]["seq"]}) for m in result.obsolete],
                                                 ordered=False)
                except PyMongoError as e:
                    raise StoreUnavailable(str(e)) from e
        return result
