"""`msgcore heads rebuild`: recreate every head in `streams` from the log, which is the truth."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import Event, EventType
from core.domain.message import MessageState, evolve, queue_for
from core.store.heads import due_at_for, head_doc

log = logging.getLogger(__name__)


def _head_for(state: MessageState, last: Event, now: datetime) -> dict[str, Any]:
    """The head of `state`, due as it was when its last event was written (not all at `now`: a
    campaign's million heads due at one instant would make every slice of its lane hold them all)."""
    retry_at = last.data.get("next_at") if last.type == EventType.RETRY else None
    return head_doc(state, now=now, due_at=due_at_for(state, queue_for(state), min(now, last.at), retry_at))


async def rebuild_heads(db: AsyncDatabase, now: datetime, batch: int = 1000,
                        progress: Callable[[int], None] | None = None) -> int:
    """Fold every message's events and replace its head; returns the number of heads written.

    Leases are dropped: run it with the workers stopped, or accept that in-flight attempts are
    retried (and counted as possible duplicates) once their lease would have expired.
    """
    ops: list[ReplaceOne] = []
    written = 0
    state: MessageState | None = None
    last: Event | None = None

    async def flush() -> None:
        nonlocal ops, written
        if ops:
            await db["streams"].bulk_write(ops, ordered=False)
            written += len(ops)
            if progress:
                progress(written)
            ops = []

    async for doc in db["events"].find({}).sort([("message_id", ASCENDING), ("seq", ASCENDING)]):
        event = Event.from_doc(doc)
        if last is not None and event.message_id != last.message_id and state is not None:
            ops.append(ReplaceOne({"_id": state.message_id}, _head_for(state, last, now), upsert=True))
            state = None
            if len(ops) >= batch:
                await flush()
        state = evolve(state, event)
        last = event
    if state is not None and last is not None:
        ops.append(ReplaceOne({"_id": state.message_id}, _head_for(state, last, now), upsert=True))
    await flush()
    log.info("heads rebuild: %d heads written", written)
    return written
