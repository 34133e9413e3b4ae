"""Expiry: a sent message whose receipt never came by the end of its wait becomes `expired`, and is
billed in the same commit.

The `expirer` consumes the `await:<route>` topics (one `sent` event per attempt handed to an SMSC) by
position, staying behind the head of each topic by the receipt wait: it reads in order while the
entry's `data.expires_at` has passed, and stops at the first entry still waiting (positions are in
commit order, not in expiry order: a message with a long wait holds back shorter ones behind it, which
then expire a little late; nothing is missed). No timer per message: the topic is the schedule.

One batch = one transaction: for the messages whose current state is still that `sent` (no receipt,
no retry since), `expired` (seq + 1) and `billed` (seq + 2, priced like a receipt's bill:
core.domain.pricing.price_message) with the tenants' spend, and the expirer's checkpoints moved past
every entry read. Messages that moved on need no write. A receipt racing the expiry loses or wins on
the unique (message_id, seq) index: the loser is dropped from this batch (its writer owns what comes
next) and the rest commits; nothing is billed twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from core import metrics
from core.domain.events import EventType
from core.domain.message import MessageState, await_topic, event_doc
from core.domain.pricing import price_message
from core.store.errors import CheckpointMoved
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.store.topics import Write, checkpoint_id, spend_updates

log = logging.getLogger(__name__)

CONSUMER = "expirer"
ROUTES_TTL_S = 5.0
DEFAULT_VALIDITY_S = 48 * 3600


class Expirer:
    """Reads the `await:<route>` topics of every route (disabled ones too: their messages still
    wait) and expires what is due. `step()` returns the number of entries it moved past (0: idle)."""

    def __init__(self, store: EventStore, routes: RouteStore, clock: Callable[[], datetime], *,
                 batch_size: int = 500, default_validity_s: int = DEFAULT_VALIDITY_S) -> None:
        self.store = store
        self.log = store.log
        self.routes = routes
        self.clock = clock
        self.batch_size = batch_size
        self.default_validity_s = default_validity_s
        self.expired = 0
        self.billed_minor = 0
        self._topics: list[str] = []
        self._topics_at = float("-inf")
        # topic -> (position, expires_at) of the first entry found not yet due: until then the topic
        # needs no read at all (the entry at a position never changes).
        self._not_before: dict[str, tuple[int, datetime]] = {}

    async def _await_topics(self) -> list[str]:
        if time.monotonic() - self._topics_at >= ROUTES_TTL_S:
            self._topics = [await_topic(r.id) for r in await self.routes.list(include_disabled=True)]
            self._topics_at = time.monotonic()
        return self._topics

    async def step(self) -> int:
        now = self.clock()
        topics = await self._await_topics()
        counters = await self.log.counters(topics)
        waiting = [t for t in topics if counters[t] > 0]
        checkpoints = await self.log.load_checkpoints(CONSUMER, waiting)
        entries: list[dict[str, Any]] = []
        moves: dict[str, tuple[int, int]] = {}
        for topic in waiting:
            room = self.batch_size - len(entries)
            start = checkpoints[topic]
            if room <= 0 or start >= counters[topic] or not self._may_be_due(topic, start, now):
                continue
            due = await self._due(topic, start, min(counters[topic], start + room), now)
            if due:
                entries.extend(due)
                moves[checkpoint_id(CONSUMER, topic)] = (start, start + len(due))
        if not entries:
            return 0
        await self._commit(entries, moves, now)
        return len(entries)

    def _may_be_due(self, topic: str, start: int, now: datetime) -> bool:
        held = self._not_before.get(topic)
        return held is None or held[0] != start or held[1] <= now

    async def _due(self, topic: str, start: int, end: int, now: datetime) -> list[dict[str, Any]]:
        """The entries of [start, end) whose wait is over, up to the first one still waiting."""
        docs = await self.log.read(topic, start, end)
        for i, doc in enumerate(docs):
            ends = self._expires_at(doc)
            if ends > now:
                self._not_before[topic] = (start + i, ends)
                return docs[:i]
        self._not_before.pop(topic, None)
        return docs

    def _expires_at(self, doc: dict[str, Any]) -> datetime:
        """When the receipt wait of a `sent` entry ends: its `data.expires_at`, else (an entry
        written without it) its time plus the default validity."""
        ends: datetime | None = doc.get("data", {}).get("expires_at")
        if ends is None:
            ends = doc["at"] + timedelta(seconds=self.default_validity_s)
        assert ends is not None
        return ends if ends.tzinfo is not None else ends.replace(tzinfo=UTC)

    async def _commit(self, entries: list[dict[str, Any]], moves: dict[str, tuple[int, int]], now: datetime) -> None:
        states = await self.store.states(e["message_id"] for e in entries)
        writes = [w for e in entries if (w := self._decide(e, states.get(e["message_id"]), now)) is not None]
        try:
            result = await self.log.commit(writes, moves=moves, extra=lambda batch: [
                ("tenants", spend_updates(_spend(batch), now))])
        except CheckpointMoved as e:
            # Another scheduler expired this range meanwhile: its commit holds the outcome.
            metrics.CHECKPOINT_MOVED.labels(stage="expirer").inc()
            log.info("expirer: checkpoints %s moved meanwhile; reading again", e.checkpoints[:3])
            self._not_before.clear()
            return
        done = set(result.committed)
        self.expired += len(done)
        metrics.COMMIT_CONFLICTS.labels(stage="expirer").inc(len(result.conflicts))
        self.billed_minor += sum(_amount(w) for w in writes if w.message_id in done)
        for mid in result.conflicts:
            log.info("expirer: message=%s got its outcome while expiring; left to that writer", mid)
        if done:
            log.info("expirer: %d messages expired (e.g. message=%s)", len(done), next(iter(done)))

    def _decide(self, entry: dict[str, Any], state: MessageState | None, now: datetime) -> Write | None:
        """`expired` + `billed` for a message still waiting on this `sent`; None when it moved on
        (a receipt came, or it was retried and sent again: that later entry decides)."""
        if state is None or state.state != "sent" or state.version != entry["seq"]:
            return None
        sent = entry.get("data", {})
        parts = int(sent.get("parts") or state.parts)
        price = int(sent.get("price_per_part", state.price_per_part))
        route_id = sent.get("route_id") or state.route_id
        expired = event_doc(state, EventType.EXPIRED, now, {"reason": "no delivery receipt within validity"},
                            route_id=route_id)
        after = replace(state, state="expired", version=state.version + 1)
        billed = event_doc(after, EventType.BILLED, now, {
            "route_id": route_id, "parts": parts, "price_per_part": price, "amount": price_message(parts, price),
            "currency": sent.get("currency", state.currency)}, route_id=route_id)
        return Write(state.message_id, [expired, billed])


def _amount(w: Write) -> int:
    return sum(int(e["data"]["amount"]) for e in w.events if e["type"] == EventType.BILLED.value)


def _spend(batch: Sequence[Write]) -> dict[str, int]:
    """Each tenant's total billed in `batch` (the writes that are about to commit)."""
    out: dict[str, int] = {}
    for w in batch:
        for e in w.events:
            if e["type"] == EventType.BILLED.value:
                out[e["tenant_id"]] = out.get(e["tenant_id"], 0) + int(e["data"]["amount"])
    return out
