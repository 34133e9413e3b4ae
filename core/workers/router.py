"""Router: reads the `route` topics by position, picks a route, appends `routed` into the route's
`send` topic of the message's lane.

One batch = one transaction: the batch's `routed` (or `failed`, `expired`, `dead_lettered`,
`canceled`) events with their positions in the send topics, and the router's checkpoints moved past
the positions it read. Two routers on the same topics race on the checkpoint: one commits, the other
gets CheckpointMoved and reads again from the new checkpoint; no message is routed twice.

Lanes: transactional traffic first, campaigns and marketing shared fairly between tenants
(core/store/lanes.py). A canceling campaign's lane is read too: its messages end `canceled` here,
never routed. A suspended tenant's message found in the shared lane waits on a timer (no event) and
comes back to this topic once the tenant is active (core/store/timers.py).

Consent: a message whose recipient opted out after it was accepted (a campaign uploaded before the
STOP, a scheduled message, a retry) is `rejected` here with reason `opted_out` instead of routed. The
lookup is batched per tenant and costs nothing for a tenant without entries (core/store/suppressions.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from core import metrics
from core.domain.consent import rejection_reason
from core.domain.errors import NoRoute
from core.domain.events import EventType
from core.domain.message import MessageState, event_doc, lane_of_topic, send_topics, state_of_accepted
from core.domain.routing import choose_route, routed_event
from core.store.errors import CheckpointMoved
from core.store.eventstore import EventStore
from core.store.lanes import ALL, SHARED, LaneBook, TopicReader
from core.store.routes import RouteStore, RouteTable
from core.store.suppressions import SuppressionStore
from core.store.timers import HOLD_S, timer_doc
from core.store.topics import Write

log = logging.getLogger(__name__)

CONSUMER = "router"
BULK_PER_BATCH = 200
# Backpressure: a bulk lane is not routed further while this many of its messages wait in the send
# topics (counter - connector checkpoint: exact, two small reads). Routing far ahead of what the SMSCs
# take would commit route choices long before sending, for work a pause or a cancel then leaves unused.
BACKLOG_MAX = 2000
BACKLOG_CHECK_S = 0.5
ROUTABLE = ("accepted", "retry")


class Router:
    def __init__(self, store: EventStore, routes: RouteStore, clock: Callable[[], datetime], *,
                 batch_size: int = 500, max_attempts: int = 5, rng: random.Random | None = None,
                 scope: str = ALL, book: LaneBook | None = None) -> None:
        """`book`: the lanes to read (default: a LaneBook over `store.db`); unit tests give a fixed one."""
        self.store = store
        self.log = store.log
        self.routes = routes
        self.clock = clock
        self.batch_size = batch_size
        # `msgcore router` runs two: one for the shared (transactional) lane, one for the others, so a
        # one-time password never waits for a batch of campaign messages to commit.
        self.scope = scope
        self.reader = TopicReader(self.log, CONSUMER, "route", book if book is not None else LaneBook(store.db),
                                  bulk_limit=min(batch_size, BULK_PER_BATCH))
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.table = RouteTable(routes)
        # None with the in-memory store of the unit tests (no database): nobody is suppressed there.
        self.suppressions = SuppressionStore(store.db) if store.db is not None else None
        self._backlog_checked = float("-inf")
        self.routed = 0
        self.canceled = 0
        self.held = 0
        self.rejected = 0
        self._blocked: dict[str, str] = {}  # message id -> the opt-out's scope, for the batch being decided

    async def step(self) -> int:
        now = self.clock()
        if self.scope != SHARED:
            await self.table.refresh(now)
            await self._backpressure()
        batch = await self.reader.read(self.batch_size, self.scope)
        if not batch:
            return 0
        await self.table.refresh(now)
        states = await self._states(batch.entries)
        self._blocked = await self._opted_out(states)
        writes = [w for e in batch.entries if (w := self._decide(e, states.get(e["message_id"]), now)) is not None]
        try:
            result = await self.log.commit(writes, moves=batch.moves,
                                           redecide=self._dropped)
        except CheckpointMoved as e:
            metrics.CHECKPOINT_MOVED.labels(stage="router").inc()
            log.info("router: another router moved %s; reading again", e.checkpoints[:3])
            self.reader.forget_positions()
            return len(batch.entries)
        self.routed += sum(1 for w in writes if w.events and w.events[0]["type"] == "routed")
        metrics.BATCH_SIZE.labels(stage="router").observe(len(batch.entries))
        log.debug("router: %d entries, committed %d", len(batch.entries), len(result.committed))
        return len(batch.entries)

    async def _states(self, entries: list[dict[str, Any]]) -> dict[str, MessageState]:
        """The state of each entry's message: an `accepted` entry carries it; the others (a timer's
        `released`, an operator's `requeued`) are folded from the log, one query for all."""
        states = {e["message_id"]: state_of_accepted(e) for e in entries if e["type"] == "accepted"}
        others = [e["message_id"] for e in entries if e["type"] != "accepted"]
        if others:
            states.update(await self.store.states(others))
        return states

    async def _opted_out(self, states: dict[str, MessageState]) -> dict[str, str]:
        """Message id -> scope for the routable messages whose recipient is on their tenant's
        suppression list now: one query per tenant that has entries, none for the others."""
        if self.suppressions is None:
            return {}
        by_tenant: dict[str, list[MessageState]] = {}
        for st in states.values():
            if st.state in ROUTABLE:
                by_tenant.setdefault(st.tenant_id, []).append(st)
        out: dict[str, str] = {}
        for tenant_id, group in by_tenant.items():
            hits = await self.suppressions.blocked(tenant_id, [(st.channel, st.to, st.sender) for st in group])
            out.update({group[i].message_id: scope for i, scope in hits.items()})
        return out

    @staticmethod
    async def _dropped(ids: list[str]) -> list[Write]:
        """Messages whose next seq was taken meanwhile: whoever appended it moved the message on and
        owns what comes next; routing it too could send it twice. Dropped from the batch."""
        metrics.COMMIT_CONFLICTS.labels(stage="router").inc(len(ids))
        log.warning("router: %d messages moved on while being routed, left alone (e.g. message=%s)",
                    len(ids), ids[0])
        return []

    def _decide(self, entry: dict[str, Any], state: MessageState | None, now: datetime) -> Write | None:
        """What routing makes of one entry of a route topic (None: nothing to write)."""
        mid = entry["message_id"]
        if state is None or state.state not in ROUTABLE:
            # Moved on since this entry was written (e.g. requeued twice, canceled): nothing to do.
            log.info("router: message=%s is %s, not routable; entry %s@%d skipped", mid,
                     state.state if state else "missing", entry["topic"], entry["pos"])
            return None
        if state.version != entry["seq"]:
            log.info("router: message=%s moved on after entry %s@%d; skipped", mid, entry["topic"], entry["pos"])
            return None
        lane = lane_of_topic(entry["topic"])
        if lane in self.reader.book.canceling:
            self.canceled += 1
            return Write(mid, [event_doc(state, EventType.CANCELED, now, {
                "reason": f"campaign {state.campaign_id} canceled" if state.campaign_id else "lane canceled",
                "attempted": False})])
        if mid in self._blocked:
            self.rejected += 1
            log.info("router: message=%s tenant=%s recipient opted out (scope %s): rejected", mid, state.tenant_id,
                     self._blocked[mid])
            return Write(mid, [event_doc(state, EventType.REJECTED, now,
                                         {"reason": rejection_reason(state.channel), "scope": self._blocked[mid]})])
        if state.tenant_id in self.reader.book.suspended:
            self.held += 1
            log.info("router: message=%s tenant=%s suspended: held", mid, state.tenant_id)
            return Write(mid, [], timer=timer_doc(
                message_id=mid, tenant_id=state.tenant_id, topic=entry["topic"], seq=state.version,
                due_at=now + timedelta(seconds=HOLD_S), reason="tenant_suspended", lane=lane,
                campaign_id=state.campaign_id, channel=state.channel))
        doc, topic = self._route_event(state, now)
        return Write(mid, [doc], [topic])

    def _route_event(self, state: MessageState, now: datetime) -> tuple[dict[str, Any], str | None]:
        if state.expires_at is not None and now >= state.expires_at:
            return event_doc(state, EventType.EXPIRED, now, {"reason": "validity passed before routing"}), None
        if state.attempts >= self.max_attempts:
            return event_doc(state, EventType.DEAD_LETTERED, now,
                             {"reason": f"{state.attempts} attempts failed", "attempts": state.attempts}), None
        try:
            route = choose_route(self.table.routes, state.to, self.table.status, state.excluded_routes, self.rng,
                                 channel=state.channel)
        except NoRoute as e:
            log.info("router: message=%s tenant=%s no route for %s", state.message_id, state.tenant_id, state.to)
            return event_doc(state, EventType.FAILED, now,
                             {"route_id": None, "attempt": state.attempts, "error_code": None,
                              "error_name": "NO_ROUTE", "reason": str(e)}, route_id=None), None
        return routed_event(state, route, now)

    async def _backpressure(self) -> None:
        if time.monotonic() - self._backlog_checked < BACKLOG_CHECK_S:
            return
        self._backlog_checked = time.monotonic()
        lanes = [lane.key for lane in self.reader.book.lanes]
        topics = {t: lane for r in self.table.routes for lane in lanes for t in send_topics(r.id, lane, r.partitions)}
        if not topics:
            self.reader.skip = set()
            return
        counters = await self.log.counters(topics)
        sent = await self.log.load_checkpoints("connector", topics)
        waiting: dict[str, int] = {}
        for topic, lane in topics.items():
            waiting[lane] = waiting.get(lane, 0) + counters[topic] - sent[topic]
        skip = {lane for lane, n in waiting.items() if n >= BACKLOG_MAX}
        if skip != self.reader.skip:
            log.debug("router: backpressure on lanes %s", sorted(skip))
        self.reader.skip = skip

