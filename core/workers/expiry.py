"""Expiry: a sent message whose receipt never came within its validity becomes `expired`."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from core.domain.events import EventType
from core.domain.message import evolve, next_event
from core.store.cursor import QueueCursor
from core.store.eventstore import EventStore, Transition


class Expirer:
    def __init__(self, store: EventStore, clock: Callable[[], datetime], *, batch_size: int = 500) -> None:
        self.store = store
        self.clock = clock
        self.batch_size = batch_size
        self.cursor = QueueCursor()
        self.expired = 0

    async def step(self) -> int:
        now = self.clock()
        claims = await self.store.due("receipt", now, self.batch_size, self.cursor)
        if not claims:
            return 0
        transitions = []
        for c in claims:
            event = next_event(c.state, EventType.EXPIRED, now, {"reason": "no delivery receipt within validity"})
            transitions.append(Transition(c.state.version, [event], evolve(c.state, event)))
        result = await self.store.commit(transitions, now)
        self.expired += len(result.committed)
        return len(claims)
