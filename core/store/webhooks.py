"""Webhook registrations: `webhooks` collection, one document per endpoint of a tenant.

    {_id: "wh_<token>", tenant_id, url, events: [type, ...] | ["*"], secret, enabled, created_at,
     updated_at}

The secret is kept as is (it signs every delivery, so it cannot be stored hashed); it is shown once,
when created or rotated. A tenant reads and changes only its own registrations (every query carries
`tenant_id`); the workers read all enabled ones (`enabled_all`, a small collection read every few
seconds). Deliveries of an endpoint go through its topic `hook:<id>` (core/store/webhook_queue.py).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.store.errors import StoreError, StoreUnavailable

log = logging.getLogger(__name__)

MAX_WEBHOOKS_PER_TENANT = 10


class WebhookNotFound(StoreError):
    def __init__(self, webhook_id: str) -> None:
        super().__init__(f"no webhook {webhook_id}")
        self.webhook_id = webhook_id


class TooManyWebhooks(StoreError):
    def __init__(self, tenant_id: str, limit: int) -> None:
        super().__init__(f"tenant {tenant_id} has {limit} webhooks, the most allowed: delete one first")
        self.limit = limit


@dataclass(frozen=True)
class Webhook:
    id: str
    tenant_id: str
    url: str
    events: tuple[str, ...]
    secret: str
    enabled: bool
    created_at: datetime
    updated_at: datetime

    @property
    def topic(self) -> str:
        return hook_topic(self.id)


def hook_topic(webhook_id: str) -> str:
    """The topic of an endpoint's delivery jobs."""
    return f"hook:{webhook_id}"


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _webhook(doc: dict[str, Any]) -> Webhook:
    return Webhook(id=doc["_id"], tenant_id=doc["tenant_id"], url=doc["url"], events=tuple(doc["events"]),
                   secret=doc["secret"], enabled=bool(doc.get("enabled", True)), created_at=doc["created_at"],
                   updated_at=doc["updated_at"])


class WebhookStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.webhooks = db["webhooks"]

    async def ensure_indexes(self) -> None:
        try:
            await self.webhooks.create_index([("tenant_id", ASCENDING), ("created_at", ASCENDING)],
                                             name="tenant_created")
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def create(self, tenant_id: str, url: str, events: list[str], now: datetime) -> Webhook:
        """A new enabled registration with a fresh secret; TooManyWebhooks over the tenant's limit
        (checked, then inserted: two concurrent creates may pass one over, which is harmless)."""
        doc = {"_id": "wh_" + secrets.token_hex(8), "tenant_id": tenant_id, "url": url, "events": events,
               "secret": new_secret(), "enabled": True, "created_at": now, "updated_at": now}
        try:
            if await self.webhooks.count_documents({"tenant_id": tenant_id}) >= MAX_WEBHOOKS_PER_TENANT:
                raise TooManyWebhooks(tenant_id, MAX_WEBHOOKS_PER_TENANT)
            await self.webhooks.insert_one(doc)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        log.info("webhook %s created for tenant %s: %s events=%s", doc["_id"], tenant_id, url, events)
        return _webhook(doc)

    async def list_for(self, tenant_id: str) -> list[Webhook]:
        try:
            return [_webhook(d) async for d in self.webhooks.find({"tenant_id": tenant_id}).sort("created_at", 1)]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def get(self, tenant_id: str, webhook_id: str) -> Webhook:
        try:
            doc = await self.webhooks.find_one({"_id": webhook_id, "tenant_id": tenant_id})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        if doc is None:
            raise WebhookNotFound(webhook_id)
        return _webhook(doc)

    async def update(self, tenant_id: str, webhook_id: str, changes: dict[str, Any], now: datetime) -> Webhook:
        """Set `changes` (url, events, enabled) on the tenant's webhook; WebhookNotFound if none."""
        allowed = {k: v for k, v in changes.items() if k in ("url", "events", "enabled")}
        return await self._set(tenant_id, webhook_id, {**allowed, "updated_at": now})

    async def rotate_secret(self, tenant_id: str, webhook_id: str, now: datetime) -> Webhook:
        """A new secret; deliveries sign with it from the workers' next refresh (a few seconds)."""
        hook = await self._set(tenant_id, webhook_id, {"secret": new_secret(), "updated_at": now})
        log.info("webhook %s of tenant %s: secret rotated", webhook_id, tenant_id)
        return hook

    async def delete(self, tenant_id: str, webhook_id: str) -> None:
        """Remove the registration; its undelivered jobs stay in its topic, read by nobody."""
        try:
            res = await self.webhooks.delete_one({"_id": webhook_id, "tenant_id": tenant_id})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        if res.deleted_count != 1:
            raise WebhookNotFound(webhook_id)
        log.info("webhook %s of tenant %s deleted", webhook_id, tenant_id)

    async def enabled_all(self) -> list[Webhook]:
        """Every enabled registration of every tenant (the workers' cache)."""
        try:
            return [_webhook(d) async for d in self.webhooks.find({"enabled": True})]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def _set(self, tenant_id: str, webhook_id: str, fields: dict[str, Any]) -> Webhook:
        try:
            doc = await self.webhooks.find_one_and_update({"_id": webhook_id, "tenant_id": tenant_id},
                                                          {"$set": fields}, return_document=ReturnDocument.AFTER)
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        if doc is None:
            raise WebhookNotFound(webhook_id)
        return _webhook(doc)
