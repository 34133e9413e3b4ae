"""Routes in the `routes` collection and their live status in `route_status`.

The connector of a route writes its status (up/busy/down) with a heartbeat; a status whose heartbeat
is older than STALE_S counts as DOWN, so a dead connector's route is seen as down.
"""

from __future__ import annotations

import builtins
import re
import time
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from core.domain.message import LANE_SEPARATOR, PARTITION_SEPARATOR
from core.domain.routing import Route, RouteStatus
from core.store.errors import RouteNotDrained
from core.store.topics import checkpoint_id

STALE_S = 10.0
ROUTES_TTL_S = 1.0
SEND_CONSUMER = "connector"  # the consumer of the send topics (smsc/connector.py)


class RouteStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.routes = db["routes"]
        self.status = db["route_status"]
        self.changes = db["route_changes"]

    async def list(self, include_disabled: bool = True) -> list[Route]:
        query: dict[str, Any] = {} if include_disabled else {"enabled": True}
        return [Route.model_validate(_without_id(d)) async for d in self.routes.find(query).sort("_id")]

    async def get(self, route_id: str) -> Route | None:
        doc = await self.routes.find_one({"_id": route_id})
        return Route.model_validate(_without_id(doc)) if doc else None

    async def upsert(self, route: Route, *, actor: str, now: datetime) -> None:
        """Create or replace a route and record who changed what, when. A change of `partitions`
        raises RouteNotDrained unless the route is disabled and drained (see `undrained`)."""
        current = await self.get(route.id)
        if current is not None and current.partitions != route.partitions:
            why = "it is enabled: disable it first" if current.enabled else await self.undrained(route.id)
            if why:
                raise RouteNotDrained(route.id, why)
        doc = route.model_dump(mode="json")
        await self.routes.replace_one({"_id": route.id}, {"_id": route.id, **doc}, upsert=True)
        await self.changes.insert_one({"route_id": route.id, "actor": actor, "at": now, "route": doc})

    async def undrained(self, route_id: str) -> str:
        """Why route `route_id` is not drained ("" when it is): messages not yet read from its send
        topics (every partition, every lane) or held on a timer for one of them."""
        stage = re.escape(f"send:{route_id}")
        pattern = {"$regex": f"^{stage}({re.escape(PARTITION_SEPARATOR)}|{re.escape(LANE_SEPARATOR)}|$)"}
        counters = {d["_id"]: int(d["pos"]) async for d in self.db["topics"].find({"_id": pattern})}
        if counters:
            done = {d["_id"]: int(d["pos"]) async for d in self.db["checkpoints"].find(
                {"_id": {"$in": [checkpoint_id(SEND_CONSUMER, t) for t in counters]}})}
            waiting = sum(n - done.get(checkpoint_id(SEND_CONSUMER, t), 0) for t, n in counters.items())
            if waiting > 0:
                return f"{waiting} messages wait in its send topics"
        held = await self.db["timers"].count_documents({"topic": pattern})
        return f"{held} messages are held on timers for its send topics" if held else ""

    async def set_enabled(self, route_id: str, enabled: bool, *, actor: str, now: datetime) -> Route | None:
        """Enable or disable a route (recorded like any change); None if there is no such route. A
        route already in the wanted state is returned unchanged and no change is recorded."""
        route = await self.get(route_id)
        if route is None:
            return None
        if route.enabled != enabled:
            route = route.model_copy(update={"enabled": enabled})
            await self.upsert(route, actor=actor, now=now)
        return route

    async def disable(self, route_id: str, *, actor: str, now: datetime) -> Route | None:
        return await self.set_enabled(route_id, False, actor=actor, now=now)

    async def enable(self, route_id: str, *, actor: str, now: datetime) -> Route | None:
        return await self.set_enabled(route_id, True, actor=actor, now=now)

    async def history(self, route_id: str, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The last `limit` recorded changes of a route, oldest first: {"actor", "at", "route" (the
        full definition after the change), "changed" (fields that differ from the previous record;
        every field for the first one)}."""
        cursor = self.changes.find({"route_id": route_id}).sort([("at", -1), ("_id", -1)]).limit(limit + 1)
        docs = list(reversed([d async for d in cursor]))
        out = []
        for i, d in enumerate(docs):
            before = docs[i - 1]["route"] if i else {}
            changed = sorted(k for k in set(before) | set(d["route"]) if before.get(k) != d["route"].get(k))
            out.append({"actor": d["actor"], "at": d["at"], "route": d["route"], "changed": changed})
        return out[-limit:] if len(docs) > limit else out

    async def set_status(self, route_id: str, status: RouteStatus, now: datetime, detail: str = "") -> None:
        await self.status.update_one(
            {"_id": route_id}, {"$set": {"status": status.value, "heartbeat_at": now, "detail": detail}}, upsert=True
        )

    async def statuses(self, now: datetime) -> dict[str, RouteStatus]:
        out: dict[str, RouteStatus] = {}
        async for d in self.status.find({}):
            fresh = d.get("heartbeat_at") and d["heartbeat_at"] >= now - timedelta(seconds=STALE_S)
            out[d["_id"]] = RouteStatus(d["status"]) if fresh else RouteStatus.DOWN
        return out


class RouteTable:
    """The enabled routes and their statuses as one process sees them, read again at most once per
    `ttl_s`: routes change at run time through the admin API, and a short cache keeps these two reads
    off the hot path of the router and of acceptance."""

    def __init__(self, store: RouteStore, ttl_s: float = ROUTES_TTL_S) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.routes: list[Route] = []
        self.status: dict[str, RouteStatus] = {}
        self._loaded_at = float("-inf")

    async def refresh(self, now: datetime) -> None:
        if time.monotonic() - self._loaded_at >= self.ttl_s:
            self.routes = await self.store.list(include_disabled=False)
            self.status = await self.store.statuses(now)
            self._loaded_at = time.monotonic()


def load_routes_file(path: Path) -> list[Route]:
    """Routes from a TOML file with one [[routes]] table per route."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"routes file {path}: {e}") from e
    return [Route.model_validate(r) for r in data.get("routes", [])]


def _without_id(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "_id"}
