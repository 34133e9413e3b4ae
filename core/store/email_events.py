"""An e-mail provider's later events (core/domain/email_events.py) applied to the log: `delivered`,
`bounced`, `complained` on the message's stream, and the suppressions they cause.

Contract of `ProviderEventStore.apply` (one POST of the provider's event webhook):
- One transaction for the batch: the message events, the suppression entries of hard bounces and
  complaints (their `opted_out` events, entry documents and the tenant's counter, planned by
  core/store/suppressions.py) and the orphans. All or nothing.
- Exactly once per provider event id: an applied event's id is recorded in `provider_event_ids`
  (`_id` = route and event id) in the same transaction; an id found there is a duplicate and writes
  nothing; two requests racing with the same event meet on that `_id` (or on (message_id, seq)), and
  the loser plans again (and then finds it applied).
- The message is the one whose `sent` on this route recorded the event's provider message id: the
  mailer writes `email_provider_ids` (`_id` = route and provider message id -> message id) in the
  commit of the `sent` event. Not an index on `events`: every event of every message, SMS included,
  would pay for it on insert (measured: the end-to-end SMS benchmark lost about a tenth of its rate
  with two such indexes). An event for no known message is an orphan: kept once in
  `orphan_provider_events` (`_id` = route and event id), counted and logged, never an error.
- An event the lifecycle no longer allows (core.domain.email_events.applicable) is stale: counted only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import InsertOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.domain.consent import ALL_SENDERS, Change
from core.domain.email_events import ProviderEvent, applicable, event_data
from core.domain.events import Event, EventType
from core.domain.message import MessageState, event_doc, evolve
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.suppressions import Plan, Planned, SuppressionConflict, SuppressionStore
from core.store.topics import Write

log = logging.getLogger(__name__)

ORPHANS = "orphan_provider_events"
EVENT_IDS = "provider_event_ids"
PROVIDER_IDS = "email_provider_ids"
OLD_EVENTS_INDEXES = ("email_sent_provider_id", "provider_event_id")  # on `events`, before PROVIDER_IDS
SOURCE_OF = {"bounced": "bounce", "complained": "complaint"}


@dataclass
class Outcome:
    """What a batch did: events applied per msgcore type, and those that wrote nothing, by why."""

    applied: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    stale: int = 0
    orphans: int = 0
    ignored: int = 0
    suppressed: int = 0  # suppression entries the batch opted out

    def to_dict(self) -> dict[str, Any]:
        return {"applied": dict(sorted(self.applied.items())), "duplicates": self.duplicates, "stale": self.stale,
                "orphans": self.orphans, "ignored": self.ignored, "suppressed": self.suppressed}


@dataclass
class _Plan:
    docs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # message id -> its new events
    entry_writes: list[Write] = field(default_factory=list)  # suppression entries' events
    side_writes: list[tuple[str, list[Any]]] = field(default_factory=list)
    suppressions: dict[str, Plan] = field(default_factory=dict)
    changes: dict[str, list[Change]] = field(default_factory=dict)
    orphans: list[ProviderEvent] = field(default_factory=list)
    applied_ids: list[str] = field(default_factory=list)  # provider event ids that wrote an event
    outcome: Outcome = field(default_factory=Outcome)


class ProviderEventStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self.db = db
        self.events = db["events"]
        self.store = EventStore(db)
        self.suppressions = SuppressionStore(db)

    async def ensure_indexes(self) -> None:
        """Lookups are by `_id` only; the `events` indexes an earlier version made are dropped (every
        event insert paid for them)."""
        try:
            existing = set(await self.events.index_information())
            for name in OLD_EVENTS_INDEXES:
                if name in existing:
                    await self.events.drop_index(name)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def apply(self, route_id: str, events: Sequence[ProviderEvent], now: datetime) -> Outcome:
        """Apply one batch of the route's provider events (see the module doc). Raises StoreUnavailable
        (nothing written) when the store is down or the batch kept conflicting."""
        outcome = Outcome()

        async def planned() -> Planned | None:
            nonlocal outcome
            plan = await self._plan(route_id, events, now)
            outcome = plan.outcome
            writes = [Write(mid, docs) for mid, docs in plan.docs.items()] + plan.entry_writes
            if plan.applied_ids:
                plan.side_writes.append((EVENT_IDS, [InsertOne({"_id": event_key(route_id, eid), "at": now})
                                                     for eid in plan.applied_ids]))
            if plan.orphans:
                plan.side_writes.append((ORPHANS, [_orphan_op(route_id, e, now) for e in plan.orphans]))
            if not writes and not plan.orphans:
                return None
            return Planned(writes, plan.side_writes, plan.suppressions)

        try:
            await self.suppressions.commit_replanning(planned, f"provider events route={route_id}")
        except SuppressionConflict as e:
            raise StoreUnavailable(str(e)) from e  # the provider retries the batch later
        return outcome

    async def _plan(self, route_id: str, events: Sequence[ProviderEvent], now: datetime) -> _Plan:
        plan = _Plan()
        wanted: dict[str, ProviderEvent] = {}
        for e in events:
            if e.kind == "ignored":
                plan.outcome.ignored += 1
            elif e.event_id in wanted:
                plan.outcome.duplicates += 1  # the same event twice in one batch
            else:
                wanted[e.event_id] = e
        seen = await self._applied_ids(route_id, list(wanted))
        plan.outcome.duplicates += len(seen)
        todo = sorted((e for e in wanted.values() if e.event_id not in seen), key=_order)
        owners = await self._messages_of(route_id, {e.provider_message_id for e in todo})
        states = await self.store.states(set(owners.values()))
        for e in todo:
            mid = owners.get(e.provider_message_id)
            state = states.get(mid) if mid else None
            if state is None:
                plan.orphans.append(e)
                plan.outcome.orphans += 1
                log.info("provider events route=%s: event %s (%s) for provider message id %r matches no e-mail sent "
                         "on this route: kept in %s", route_id, e.event_id, e.provider_event, e.provider_message_id,
                         ORPHANS)
                continue
            states[state.message_id] = self._decide(plan, route_id, state, e, now)
        for tenant_id, changes in plan.changes.items():
            sp = await self.suppressions.plan(tenant_id, changes, now)
            plan.suppressions[tenant_id] = sp
            plan.side_writes.extend(sp.side_writes)
            plan.entry_writes.extend(sp.writes)
            plan.outcome.suppressed += len(sp.applied)
        return plan

    @staticmethod
    def _decide(plan: _Plan, route_id: str, state: MessageState, e: ProviderEvent, now: datetime) -> MessageState:
        """Add the event `e` makes of the message (if the lifecycle allows it) and the suppression it
        causes (even when stale: a complaint after a soft bounce still means "never again"); the state
        after it."""
        if e.suppresses and state.channel == "email":
            plan.changes.setdefault(state.tenant_id, []).append(Change(
                "email", state.to, ALL_SENDERS, True, SOURCE_OF[e.kind], f"provider:{route_id}:{e.event_id}",
                " ".join(p for p in (e.kind, e.bounce_type, e.status, e.reason) if p)[:500]))
        if not applicable(state, e):
            plan.outcome.stale += 1
            log.info("provider events route=%s message=%s: %s (event %s) does not follow state %r: not recorded",
                     route_id, state.message_id, e.kind, e.event_id, state.state)
            return state
        doc = event_doc(state, EventType(e.kind), now, event_data(e, route_id), route_id=route_id)
        plan.docs.setdefault(state.message_id, []).append(doc)
        plan.applied_ids.append(e.event_id)
        plan.outcome.applied[e.kind] = plan.outcome.applied.get(e.kind, 0) + 1
        log.info("provider events route=%s message=%s tenant=%s: %s%s (event %s)", route_id, state.message_id,
                 state.tenant_id, e.kind, f" {e.bounce_type}" if e.bounce_type else "", e.event_id)
        return evolve(state, Event.from_doc(doc))

    async def _applied_ids(self, route_id: str, event_ids: list[str]) -> set[str]:
        if not event_ids:
            return set()
        keys = {event_key(route_id, eid): eid for eid in event_ids}
        try:
            return {keys[d["_id"]] async for d in self.db[EVENT_IDS].find({"_id": {"$in": sorted(keys)}}, {"_id": 1})}
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def _messages_of(self, route_id: str, provider_ids: set[str]) -> dict[str, str]:
        """Provider message id -> message id, for the route's e-mails (one `_id` query)."""
        if not provider_ids:
            return {}
        keys = {event_key(route_id, pid): pid for pid in provider_ids}
        try:
            found = self.db[PROVIDER_IDS].find({"_id": {"$in": sorted(keys)}}, {"message_id": 1})
            return {keys[d["_id"]]: d["message_id"] async for d in found}
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e


def event_key(route_id: str, provider_id: str) -> str:
    """`_id` of a provider's id (event or message) on one route: ids are only unique per provider."""
    return f"{route_id}:{provider_id}"


def provider_id_inserts(writes: Sequence[Write], now: datetime) -> list[InsertOne]:
    """For the mailer's commit: one document per e-mail `sent` event with a provider message id, so
    that the provider's later events find their message (ProviderEventStore._messages_of)."""
    ops = []
    for w in writes:
        for e in w.events:
            data = e.get("data") or {}
            if e.get("type") == "sent" and data.get("provider_message_id"):
                key = event_key(data.get("route_id") or e.get("route_id") or "", data["provider_message_id"])
                ops.append(InsertOne({"_id": key, "message_id": e["message_id"], "at": now}))
    return ops


def _order(e: ProviderEvent) -> float:
    """Apply a batch in the provider's time order (SendGrid batches are not ordered): a `delivered`
    before the complaint that followed it. Events without a time go last, in arrival order."""
    return e.at.timestamp() if e.at is not None else float("inf")


def _orphan_op(route_id: str, e: ProviderEvent, now: datetime) -> UpdateOne:
    doc = {"route_id": route_id, "event_id": e.event_id, "kind": e.kind, "provider_event": e.provider_event,
           "provider_message_id": e.provider_message_id, "email": e.email, "at": e.at, "received_at": now,
           "bounce_type": e.bounce_type, "status": e.status, "reason": e.reason}
    return UpdateOne({"_id": f"{route_id}:{e.event_id}"}, {"$setOnInsert": doc}, upsert=True)
