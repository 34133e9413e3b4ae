"""Reads for the operator dashboard (api/dashboard/) that no other store module offers: across tenants,
newest first, each bounded by a limit and answered by an index (`_id` or `status`).

Read-only. Driver errors become StoreUnavailable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.store.errors import StoreUnavailable

OPEN_CAMPAIGNS = ("draft", "scheduled", "running", "paused", "canceling")


async def recent_accepted(db: AsyncDatabase[Any], limit: int) -> list[dict[str, Any]]:
    """The newest `limit` `accepted` events of the log (all tenants), newest first, by `_id` (the
    insertion order): {message_id, tenant_id, to, at, campaign_id}."""
    try:
        cursor = db["events"].find({"type": "accepted"}, {"message_id": 1, "tenant_id": 1, "at": 1, "data.to": 1,
                                                          "data.campaign_id": 1}).sort("_id", DESCENDING).limit(limit)
        docs = [d async for d in cursor]
    except PyMongoError as e:
        raise StoreUnavailable(f"recent accepted: {e!r}") from e
    return [{"message_id": d["message_id"], "tenant_id": d.get("tenant_id", ""), "to": d.get("data", {}).get("to", ""),
             "at": d.get("at"), "campaign_id": d.get("data", {}).get("campaign_id")} for d in docs]


async def newest_event_at(db: AsyncDatabase[Any]) -> datetime | None:
    """The `at` of the newest event in the log (by `_id`), None for an empty log."""
    try:
        doc = await db["events"].find_one({}, {"at": 1}, sort=[("_id", DESCENDING)])
    except PyMongoError as e:
        raise StoreUnavailable(f"newest event: {e!r}") from e
    return None if doc is None else doc.get("at")


async def campaigns_overview(db: AsyncDatabase[Any], limit: int) -> list[dict[str, Any]]:
    """Up to `limit` campaign documents of every tenant: the open ones (not canceled or completed)
    first, newest first, then the most recently created closed ones to fill the page."""
    try:
        coll = db["campaigns"]
        open_ = [d async for d in coll.find({"status": {"$in": list(OPEN_CAMPAIGNS)}})
                 .sort("created_at", DESCENDING).limit(limit)]
        rest: list[dict[str, Any]] = []
        if len(open_) < limit:
            rest = [d async for d in coll.find({"status": {"$nin": list(OPEN_CAMPAIGNS)}})
                    .sort("created_at", DESCENDING).limit(limit - len(open_))]
    except PyMongoError as e:
        raise StoreUnavailable(f"campaigns overview: {e!r}") from e
    return open_ + rest


async def campaign_tenant(db: AsyncDatabase[Any], campaign_id: str) -> str | None:
    """The tenant owning `campaign_id`, None if there is no such campaign."""
    try:
        doc = await db["campaigns"].find_one({"_id": campaign_id}, {"tenant_id": 1})
    except PyMongoError as e:
        raise StoreUnavailable(f"campaign tenant: {e!r}") from e
    return None if doc is None else doc["tenant_id"]


async def route_status_details(db: AsyncDatabase[Any]) -> dict[str, dict[str, Any]]:
    """Each route's last status report as its connector wrote it: {status, heartbeat_at, detail}."""
    try:
        return {d["_id"]: d async for d in db["route_status"].find({})}
    except PyMongoError as e:
        raise StoreUnavailable(f"route status details: {e!r}") from e
