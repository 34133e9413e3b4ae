"""Biller: prices delivered/undelivered/expired messages per part and appends `billed`.

The tenant's spend is settled in the same transaction as the `billed` events, one update per tenant
per batch: a crash can neither bill twice nor lose a charge.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pymongo import UpdateOne

from core.domain.events import EventType
from core.domain.message import evolve, next_event
from core.domain.pricing import price_message
from core.store.cursor import QueueCursor
from core.store.eventstore import EventStore, Transition

log = logging.getLogger(__name__)


class Biller:
    def __init__(self, store: EventStore, clock: Callable[[], datetime], *, batch_size: int = 500) -> None:
        self.store = store
        self.clock = clock
        self.batch_size = batch_size
        self.cursor = QueueCursor()
        self.billed = 0

    async def step(self) -> int:
        now = self.clock()
        claims = await self.store.due("bill", now, self.batch_size, self.cursor)
        if not claims:
            return 0
        transitions = []
        for c in claims:
            s = c.state
            amount = price_message(s.parts, s.price_per_part)
            event = next_event(s, EventType.BILLED, now,
                               {"route_id": s.route_id, "parts": s.parts, "price_per_part": s.price_per_part,
                                "amount": amount, "currency": s.currency})
            transitions.append(Transition(s.version, [event], evolve(s, event)))
        result = await self.store.commit(transitions, now, side_writes=_tenant_spend)
        self.billed += len(result.committed)
        return len(claims)


def _tenant_spend(batch: Sequence[Transition]) -> list[tuple[str, list[Any]]]:
    spend: Counter[str] = Counter()
    for t in batch:
        for e in t.events:
            spend[e.tenant_id] += e.data["amount"]
    return [("tenants", [UpdateOne({"_id": tenant}, {"$inc": {"spent_minor": amount}})
                         for tenant, amount in spend.items() if amount])]
