"""Routes in the `routes` collection and their live status in `route_status`.

The connector of a route writes its status (up/busy/down) with a heartbeat; a status whose heartbeat
is older than STALE_S counts as DOWN, so a dead connector's route is seen as down.
"""

from __future__ import annotations

import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from core.domain.routing import Route, RouteStatus

STALE_S = 10.0


class RouteStore:
    def __init__(self, db: AsyncDatabase) -> None:
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
        """Create or replace a route and record who changed what, when."""
        doc = route.model_dump(mode="json")
        await self.routes.replace_one({"_id": route.id}, {"_id": route.id, **doc}, upsert=True)
        await self.changes.insert_one({"route_id": route.id, "actor": actor, "at": now, "route": doc})

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


def load_routes_file(path: Path) -> list[Route]:
    """Routes from a TOML file with one [[routes]] table per route."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"routes file {path}: {e}") from e
    return [Route.model_validate(r) for r in data.get("routes", [])]


def _without_id(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "_id"}
