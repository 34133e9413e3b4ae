"""Router: takes accepted (and retrying) messages, picks a route, appends `routed`.

No lease: the commit is guarded by version, so two routers racing for one message change it once.
The router reads its queue lane by lane (core/store/lanes.py): transactional traffic first, campaigns
and marketing shared fairly between tenants. A suspended tenant's messages are held: their heads are
pushed `HOLD_S` into the future unchanged (no event), and routed once the tenant is active again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from core.domain.errors import NoRoute
from core.domain.events import Event, EventType
from core.domain.message import MessageState, evolve, next_event, queue_name
from core.domain.routing import Route, RouteStatus, choose_route
from core.store.eventstore import EventStore, Transition
from core.store.lanes import ALL, SHARED, LaneBook, LaneClaimer
from core.store.routes import RouteStore

log = logging.getLogger(__name__)

ROUTES_TTL_S = 1.0
HOLD_S = 5.0
BULK_PER_BATCH = 200
# Backpressure: a bulk lane is not routed further while a message it routed between BACKLOG_SINCE_S and
# BACKLOG_AFTER_S ago still waits for its connector. Routing far ahead of what the SMSCs take would
# spend the store's capacity on work a pause or a cancel then leaves unused, and commit route choices
# long before sending.
BACKLOG_AFTER_S = 5.0
BACKLOG_SINCE_S = 60.0
BACKLOG_CHECK_S = 0.5


class Router:
    def __init__(self, store: EventStore, routes: RouteStore, clock: Callable[[], datetime], *,
                 batch_size: int = 500, max_attempts: int = 5, rng: random.Random | None = None,
                 scope: str = ALL) -> None:
        self.store = store
        self.routes = routes
        self.clock = clock
        self.batch_size = batch_size
        # `msgcore router` runs two: one for the shared (transactional) lane, one for the others, so a
        # one-time password never waits for a batch of campaign messages to commit.
        self.scope = scope
        self.lanes = LaneClaimer(store, "route", LaneBook(store.db), bulk_limit=min(batch_size, BULK_PER_BATCH))
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self._routes: list[Route] = []
        self._status: dict[str, RouteStatus] = {}
        self._loaded_at = float("-inf")
        self._backlog_checked = float("-inf")
        self.routed = 0

    async def _refresh(self, now: datetime) -> None:
        # Routes change at run time through the admin API; a short cache keeps reads off the hot path.
        if time.monotonic() - self._loaded_at >= ROUTES_TTL_S:
            self._routes = await self.routes.list(include_disabled=False)
            self._status = await self.routes.statuses(now)
            self._loaded_at = time.monotonic()

    async def step(self) -> int:
        now = self.clock()
        if self.scope != SHARED:
            await self._refresh(now)
            await self._backpressure(now)
        claims = await self.lanes.due(now, self.batch_size, self.scope)
        if not claims:
            return 0
        await self._refresh(now)
        suspended = self.lanes.book.suspended
        transitions = [self._hold(c.state, now) if c.state.tenant_id in suspended else self._decide(c.state, now)
                       for c in claims]
        result = await self.store.commit(transitions, now)
        self.routed += len(result.committed)
        log.debug("router: committed %d, conflicts %d", len(result.committed), len(result.conflicts))
        return len(claims)

    async def _backpressure(self, now: datetime) -> None:
        if time.monotonic() - self._backlog_checked < BACKLOG_CHECK_S:
            return
        self._backlog_checked = time.monotonic()
        waiting = {"$gte": now - timedelta(seconds=BACKLOG_SINCE_S), "$lte": now - timedelta(seconds=BACKLOG_AFTER_S)}
        skip = set()
        for lane in self.lanes.book.lanes:
            queues = [queue_name(f"send:{r.id}", lane.key) for r in self._routes]
            if queues and await self.store.streams.find_one({"queue": {"$in": queues}, "due_at": waiting}, {"_id": 1}):
                skip.add(lane.key)
        if skip != self.lanes.skip:
            log.debug("router: backpressure on lanes %s", sorted(skip))
        self.lanes.skip = skip

    @staticmethod
    def _hold(state: MessageState, now: datetime) -> Transition:
        return Transition(state.version, [], state, due_at=now + timedelta(seconds=HOLD_S))

    def _decide(self, state: MessageState, now: datetime) -> Transition:
        event = self._route_event(state, now)
        return Transition(state.version, [event], evolve(state, event))

    def _route_event(self, state: MessageState, now: datetime) -> Event:
        if state.expires_at is not None and now >= state.expires_at:
            return next_event(state, EventType.EXPIRED, now, {"reason": "validity passed before routing"})
        if state.attempts >= self.max_attempts:
            return next_event(state, EventType.DEAD_LETTERED, now,
                              {"reason": f"{state.attempts} attempts failed", "attempts": state.attempts})
        try:
            route = choose_route(self._routes, state.to, self._status, state.excluded_routes, self.rng)
        except NoRoute as e:
            log.info("router: message=%s tenant=%s no route for %s", state.message_id, state.tenant_id, state.to)
            return next_event(state, EventType.FAILED, now,
                              {"route_id": None, "attempt": state.attempts, "error_code": None,
                               "error_name": "NO_ROUTE", "reason": str(e)}, route_id=None)
        return next_event(state, EventType.ROUTED, now,
                          {"route_id": route.id, "price_per_part": route.price_per_part, "currency": route.currency,
                           "strategy": route.strategy.value}, route_id=route.id)
