"""Tenants and their API keys. Keys are shown once and stored only as SHA-256 hashes: they are
high-entropy random tokens, so a fast hash is enough (no password stretching needed)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from core.ids import new_token

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class TenantExists(Exception):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id} already exists")
        self.tenant_id = tenant_id


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    status: str


class TenantStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.tenants = db["tenants"]

    async def ensure_indexes(self) -> None:
        await self.tenants.create_index("api_keys.hash", name="api_key_hash")

    async def create(self, tenant_id: str, name: str, now: datetime) -> str:
        """Create a tenant with one API key; returns the key (the only time it is visible)."""
        if not TENANT_ID_RE.match(tenant_id):
            raise ValueError(
                f"tenant id {tenant_id!r}: use 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit"
            )
        key = new_token("mk_")
        doc: dict[str, Any] = {
            "_id": tenant_id, "name": name, "status": "active", "created_at": now, "spent_minor": 0,
            "api_keys": [{"hash": hash_key(key), "prefix": key[:7], "created_at": now, "revoked_at": None}],
        }
        try:
            await self.tenants.insert_one(doc)
        except DuplicateKeyError as e:
            raise TenantExists(tenant_id) from e
        return key

    async def add_key(self, tenant_id: str, now: datetime) -> str | None:
        key = new_token("mk_")
        res = await self.tenants.update_one(
            {"_id": tenant_id},
            {"$push": {"api_keys": {"hash": hash_key(key), "prefix": key[:7], "created_at": now, "revoked_at": None}}},
        )
        return key if res.matched_count else None

    async def authenticate(self, api_key: str) -> Tenant | None:
        doc = await self.tenants.find_one({"api_keys": {"$elemMatch": {"hash": hash_key(api_key), "revoked_at": None}}},
                                          {"name": 1, "status": 1})
        return Tenant(doc["_id"], doc["name"], doc["status"]) if doc else None

    async def get(self, tenant_id: str) -> dict[str, Any] | None:
        return await self.tenants.find_one({"_id": tenant_id}, {"api_keys.hash": 0})

    async def list(self) -> list[dict[str, Any]]:
        return [d async for d in self.tenants.find({}, {"api_keys.hash": 0}).sort("_id")]
