"""The suppression list (opt-outs) in MongoDB: entries as event streams plus their current state, and
each tenant's keyword settings.

Collections:
- `events`: every change of an entry is an `opted_out` / `opted_in` event of the entry's own stream
  (`core.domain.consent.stream_id`, shapes in core/domain/events.py). No topic: no stage consumes it.
- `suppressions`: one document per entry ever changed, `_id` = its stream id: `{tenant_id, channel,
  address, scope, active, version (seq of its newest event), since, updated_at, source, actor,
  reason}`, written in the same transaction as the events, guarded by `version` (a concurrent change
  of the same entry loses on the unique (message_id, seq) index, or on `_id`, and is planned again).
- `consent`: one document per tenant, `{_id: tenant_id, active: {channel: count of active entries},
  settings: {...} (core.domain.consent.ConsentSettings), settings_by, settings_at}`; `active` moves
  in the same transaction as the entries.

Acceptance asks `blocked` for every batch. A tenant without active entries costs no round trip: its
"has any" flag is cached per process (`SuppressionFlags`, `ttl_s`); a change in this process updates
the cache at once, a change in another process (an MO STOP recorded by a connector) is seen here
within `ttl_s` for a tenant that had no entries (later changes are exact: a tenant with entries is
looked up on every batch, one query for the batch).
"""

from __future__ import annotations

import builtins
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, InsertOne, ReplaceOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from core.domain.consent import Change, ConsentSettings, blocked, parse_settings, stream_id
from core.domain.events import SCHEMA_VERSION, EventType
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.topics import Write

log = logging.getLogger(__name__)

ENTRIES, TENANTS = "suppressions", "consent"
MAX_PLAN_ROUNDS = 4


@dataclass
class SuppressionFlags:
    """Per process: does a tenant have any active entry. Cached `ttl_s` seconds, keyed by
    (database, tenant) so that tests on several databases in one process do not mix."""

    ttl_s: float = 5.0
    _entries: dict[tuple[str, str], tuple[bool, float]] = field(default_factory=dict)

    def get(self, db: str, tenant_id: str) -> bool | None:
        hit = self._entries.get((db, tenant_id))
        if hit is None or hit[1] <= time.monotonic():
            return None
        return hit[0]

    def put(self, db: str, tenant_id: str, has_any: bool) -> None:
        if len(self._entries) > 100_000:
            self._entries.clear()
        self._entries[(db, tenant_id)] = (has_any, time.monotonic() + self.ttl_s)

    def drop(self, db: str, tenant_id: str) -> None:
        self._entries.pop((db, tenant_id), None)


FLAGS = SuppressionFlags()  # the process's cache (the api builds a store per request)


@dataclass
class Planned:
    """One transaction's writes, and the suppression plans among them (per tenant)."""

    writes: list[Write]
    side_writes: list[tuple[str, list[Any]]]
    plans: dict[str, Plan] = field(default_factory=dict)


class SuppressionConflict(Exception):
    """An entry kept changing under a batch of changes (retried MAX_PLAN_ROUNDS times)."""


@dataclass
class Plan:
    """The writes of a batch of changes: entry events, entry documents and the tenant's counters;
    `applied`: the changes that change something (an opt-out of an entry already out is none)."""

    writes: list[Write] = field(default_factory=list)
    side_writes: list[tuple[str, list[Any]]] = field(default_factory=list)
    applied: list[Change] = field(default_factory=list)
    delta: int = 0


class SuppressionStore:
    def __init__(self, db: AsyncDatabase[Any], flags: SuppressionFlags = FLAGS) -> None:
        self.db = db
        self.entries = db[ENTRIES]
        self.tenants = db[TENANTS]
        self.flags = flags

    async def ensure_indexes(self) -> None:
        # Serves the acceptance lookup (address $in among active entries) and the keyset listing.
        await self.entries.create_index([("tenant_id", ASCENDING), ("channel", ASCENDING), ("active", ASCENDING),
                                         ("address", ASCENDING), ("scope", ASCENDING)], name="tenant_active_address")

    # ---- acceptance -------------------------------------------------------------------------------

    async def blocked(self, tenant_id: str, items: Sequence[tuple[str, str, str]]) -> dict[int, str]:
        """Index -> blocking scope for the items `(channel, to, sender)` that the tenant's list
        suppresses. No round trip while the tenant has no entries (cached), else one query."""
        if not items or not await self.has_any(tenant_id):
            return {}
        query = {"tenant_id": tenant_id, "channel": {"$in": sorted({c for c, _, _ in items})}, "active": True,
                 "address": {"$in": sorted({to for _, to, _ in items})}}
        try:
            active = [(d["channel"], d["address"], d["scope"])
                      async for d in self.entries.find(query, {"channel": 1, "address": 1, "scope": 1, "_id": 0})]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return blocked(items, active)

    async def has_any(self, tenant_id: str) -> bool:
        cached = self.flags.get(self.db.name, tenant_id)
        if cached is not None:
            return cached
        try:
            doc = await self.tenants.find_one({"_id": tenant_id}, {"active": 1})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        has_any = any(int(n) > 0 for n in ((doc or {}).get("active") or {}).values())
        self.flags.put(self.db.name, tenant_id, has_any)
        return has_any

    # ---- changes ----------------------------------------------------------------------------------

    async def apply(self, tenant_id: str, changes: Sequence[Change], now: datetime) -> list[Change]:
        """Commit `changes` in one transaction (all or nothing); the ones that changed something."""

        async def planned() -> Planned | None:
            plan = await self.plan(tenant_id, changes, now)
            return Planned(plan.writes, plan.side_writes, {tenant_id: plan}) if plan.writes else None

        done = await self.commit_replanning(planned, f"tenant {tenant_id}")
        return done.plans[tenant_id].applied if done is not None else []

    async def commit_replanning(self, planned: Callable[[], Awaitable[Planned | None]], what: str) -> Planned | None:
        """Commit what `planned()` returns (events, side writes, and the suppression plans among them)
        in one transaction. A write that lost a race (another writer changed one of its entries or
        messages meanwhile: a duplicate key, nothing written) is planned again, at most MAX_PLAN_ROUNDS
        times, then SuppressionConflict. None from `planned()`: nothing to write."""
        for _ in range(MAX_PLAN_ROUNDS):
            done = await planned()
            if done is None:
                return None
            try:
                await EventStore(self.db).accept(done.writes, side_writes=done.side_writes)
            except (DuplicateKeyError, BulkWriteError) as e:
                log.info("%s: suppression entries or messages changed meanwhile, planning again: %s", what,
                         str(e)[:200])
                continue
            for tenant_id, plan in done.plans.items():
                self.committed(tenant_id, plan)
            return done
        raise SuppressionConflict(f"{what}: suppression entries or messages kept changing")

    def committed(self, tenant_id: str, plan: Plan) -> None:
        """After a plan's commit: this process's flag follows at once; log each change."""
        if plan.delta > 0:
            self.flags.put(self.db.name, tenant_id, True)
        elif plan.delta < 0:
            self.flags.drop(self.db.name, tenant_id)
        for c in plan.applied:
            log.info("tenant=%s %s channel=%s address=%s scope=%s source=%s actor=%s", tenant_id,
                     "opted_out" if c.opt_out else "opted_in", c.channel, c.address, c.scope, c.source, c.actor)

    async def plan(self, tenant_id: str, changes: Sequence[Change], now: datetime) -> Plan:
        """The writes of `changes` (applied in order; one query for the entries' current state).
        Commit them with EventStore.accept (alone or with other writes), then call `committed`."""
        keys = {stream_id(tenant_id, c.channel, c.address, c.scope) for c in changes}
        try:
            current = {d["_id"]: d async for d in self.entries.find({"_id": {"$in": sorted(keys)}})}
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        plan = Plan()
        events: dict[str, list[dict[str, Any]]] = {}
        docs: dict[str, dict[str, Any]] = {}
        deltas: dict[str, int] = {}
        for c in changes:
            key = stream_id(tenant_id, c.channel, c.address, c.scope)
            doc = docs.get(key) or current.get(key)
            if bool(doc and doc["active"]) == c.opt_out:
                continue  # already so: no event
            version = int(doc["version"]) if doc else 0
            events.setdefault(key, []).append(_event(tenant_id, key, version + 1, c, now))
            docs[key] = _entry_doc(tenant_id, key, version + 1, c, now, doc)
            deltas[c.channel] = deltas.get(c.channel, 0) + (1 if c.opt_out else -1)
            plan.applied.append(c)
        plan.writes = [Write(key, evs, [None] * len(evs)) for key, evs in events.items()]
        ops: list[Any] = []
        for key, doc in docs.items():
            before = current.get(key)
            ops.append(InsertOne(doc) if before is None else
                       ReplaceOne({"_id": key, "version": before["version"]}, doc, upsert=True))
        plan.side_writes = [(ENTRIES, ops)]
        inc = {f"active.{ch}": n for ch, n in deltas.items() if n}
        if inc:
            plan.side_writes.append((TENANTS, [UpdateOne({"_id": tenant_id}, {"$inc": inc}, upsert=True)]))
        plan.delta = sum(deltas.values())
        return plan

    # ---- reads --------------------------------------------------------------------------------------

    async def list(self, tenant_id: str, *, channel: str = "sms", address: str | None = None,
                   after: tuple[str, str] | None = None, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """Active entries by (address, scope), the page after `after`."""
        query: dict[str, Any] = {"tenant_id": tenant_id, "channel": channel, "active": True}
        if address is not None:
            query["address"] = address
        if after is not None:
            query["$or"] = [{"address": {"$gt": after[0]}}, {"address": after[0], "scope": {"$gt": after[1]}}]
        try:
            cursor = self.entries.find(query, {"_id": 0}).sort([("address", ASCENDING), ("scope", ASCENDING)])
            return [d async for d in cursor.limit(limit)]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def active_scopes(self, tenant_id: str, channel: str, address: str) -> builtins.list[str]:
        return [d["scope"] for d in await self.list(tenant_id, channel=channel, address=address, limit=1000)]

    async def export(self, tenant_id: str, channel: str = "sms") -> AsyncIterator[dict[str, Any]]:
        """Every active entry, by (address, scope), streamed."""
        cursor = self.entries.find({"tenant_id": tenant_id, "channel": channel, "active": True}, {"_id": 0})
        try:
            async for d in cursor.sort([("address", ASCENDING), ("scope", ASCENDING)]).batch_size(1000):
                yield d
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    # ---- keyword settings ----------------------------------------------------------------------------

    async def settings(self, tenant_ids: Iterable[str]) -> dict[str, ConsentSettings]:
        """Each tenant's settings (the defaults for a tenant that has none), one query."""
        ids = sorted(set(tenant_ids))
        try:
            found = {d["_id"]: d.get("settings") or {}
                     async for d in self.tenants.find({"_id": {"$in": ids}}, {"settings": 1})}
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return {t: parse_settings(found.get(t) or {}) for t in ids}

    async def put_settings(self, tenant_id: str, settings: ConsentSettings, actor: str, now: datetime) -> None:
        try:
            await self.tenants.update_one({"_id": tenant_id}, {"$set": {
                "settings": settings.to_doc(), "settings_by": actor, "settings_at": now}}, upsert=True)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e


def _event(tenant_id: str, key: str, seq: int, c: Change, now: datetime) -> dict[str, Any]:
    data: dict[str, Any] = {"address": c.address, "scope": c.scope, "source": c.source, "actor": c.actor,
                            "reason": c.reason, **c.extra}
    return {"message_id": key, "seq": seq, "type": (EventType.OPTED_OUT if c.opt_out else EventType.OPTED_IN).value,
            "at": now, "tenant_id": tenant_id, "route_id": None, "channel": c.channel, "v": SCHEMA_VERSION,
            "data": data}


def _entry_doc(tenant_id: str, key: str, version: int, c: Change, now: datetime,
               before: dict[str, Any] | None) -> dict[str, Any]:
    since = now if c.opt_out else (before or {}).get("since")
    return {"_id": key, "tenant_id": tenant_id, "channel": c.channel, "address": c.address, "scope": c.scope,
            "active": c.opt_out, "version": version, "since": since, "updated_at": now, "source": c.source,
            "actor": c.actor, "reason": c.reason}
