"""Tenants, their plans and API keys (collection `tenants`), and the audit of every change to them
(collection `tenant_changes`).

A tenant document (the workers read `status` and `priority` directly):

    _id, name, created_at, spent_minor (kept by the biller)
    status          "active" | "suspended"; `suspended_at` and `suspend_reason` only while suspended
    priority        1..100, default 10: the tenant's weight when bulk (marketing) capacity is shared
    submit_tps      messages per second it may submit through the API; None = unlimited
    submit_burst    messages it may submit at once; None = max(1000, ceil(submit_tps))
    api_keys        [{id, hash, prefix, created_at, revoked_at}]

Keys are shown once and stored only as SHA-256 hashes: they are high-entropy random tokens, so a
fast hash is enough (no password stretching needed). Keys created before keys had ids have no `id`:
their `prefix` serves as one (read methods fill it in, the next change to the keys stores it).
Documents written before plans existed lack `priority`, `submit_tps` and `submit_burst`: readers
take the defaults.

Every change is written in one transaction with its record in `tenant_changes`
`{tenant_id, actor, at, change: {"action": ..., ...}}`, so the audit cannot miss one. Read methods
never return key hashes.
"""

from __future__ import annotations

import builtins
import hashlib
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pymongo import ASCENDING, ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError
from pymongo.read_concern import ReadConcern
from pymongo.write_concern import WriteConcern

from core.domain.ratelimit import effective_burst
from core.ids import new_token

TENANT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
KEY_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ACTIVE, SUSPENDED = "active", "suspended"
DEFAULT_PRIORITY, MIN_PRIORITY, MAX_PRIORITY = 10, 1, 100
MAX_SUBMIT_TPS = 1_000_000.0
MAX_SUBMIT_BURST = 10_000_000
MAX_NAME_LEN = 200
SYSTEM_ACTOR = "system"
PREFIX_LEN = 7  # "mk_" and 4 characters: enough to tell a tenant's keys apart in a listing
SETTINGS = ("name", "priority", "submit_tps", "submit_burst")

T = TypeVar("T")


class TenantExists(Exception):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"tenant {tenant_id} already exists")
        self.tenant_id = tenant_id


class TenantNotFound(Exception):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"no tenant {tenant_id}")
        self.tenant_id = tenant_id


class KeyNotFound(Exception):
    def __init__(self, tenant_id: str, key_id: str) -> None:
        super().__init__(f"tenant {tenant_id} has no API key {key_id}")
        self.tenant_id = tenant_id
        self.key_id = key_id


class InvalidTenantSetting(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """The caller of a tenant endpoint, as authenticated (and cached) by the API."""

    id: str
    name: str
    status: str
    priority: int = DEFAULT_PRIORITY
    submit_tps: float | None = None
    submit_burst: int | None = None

    @property
    def burst(self) -> int | None:
        """The submission burst in force: None when the tenant has no rate limit."""
        return effective_burst(self.submit_tps, self.submit_burst)


def check_tenant_id(tenant_id: str) -> None:
    if not TENANT_ID_RE.match(tenant_id):
        raise InvalidTenantSetting(
            "id", f"{tenant_id!r}: use 1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit")


def validate_settings(fields: dict[str, Any]) -> dict[str, Any]:
    """The settings in `fields` (some of name, priority, submit_tps, submit_burst), normalised;
    raises InvalidTenantSetting naming the first bad one. None clears submit_tps / submit_burst."""
    out: dict[str, Any] = {}
    for field, value in fields.items():
        if field not in SETTINGS:
            raise InvalidTenantSetting(field, f"not a tenant setting (one of {', '.join(SETTINGS)})")
        out[field] = _CHECKS[field](value)
    return out


def _check_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_LEN:
        raise InvalidTenantSetting("name", f"must be a non-blank string of at most {MAX_NAME_LEN} characters")
    return value


def _check_priority(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidTenantSetting("priority", f"must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}")
    return value


def _check_tps(value: Any) -> float | None:
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or not 0 < value <= MAX_SUBMIT_TPS):
        raise InvalidTenantSetting("submit_tps", f"must be a number over 0 and at most {MAX_SUBMIT_TPS:g}, "
                                                 "or null for no limit")
    return float(value)


def _check_burst(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SUBMIT_BURST:
        raise InvalidTenantSetting("submit_burst", f"must be an integer from 1 to {MAX_SUBMIT_BURST}, "
                                                   "or null for the default")
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {"name": _check_name, "priority": _check_priority,
                                            "submit_tps": _check_tps, "submit_burst": _check_burst}


def key_prefix(api_key: str) -> str:
    return api_key[:PREFIX_LEN]


def _new_key(now: datetime, taken: set[str]) -> tuple[dict[str, Any], str]:
    """A new key entry (hash only) and the key itself."""
    key = new_token("mk_")
    key_id = f"key_{secrets.token_urlsafe(6)}"
    while key_id in taken:
        key_id = f"key_{secrets.token_urlsafe(6)}"
    return {"id": key_id, "hash": hash_key(key), "prefix": key_prefix(key), "created_at": now,
            "revoked_at": None}, key


def _with_ids(keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Key entries with an `id` each: a legacy key's is its prefix (`prefix.N` for the N-th repeat of
    a prefix within the tenant, so ids stay unique and stable: entries are only ever appended)."""
    seen: dict[str, int] = {}
    out = []
    for entry in keys:
        if entry.get("id"):
            out.append(entry)
            continue
        prefix = str(entry.get("prefix", "key"))
        seen[prefix] = seen.get(prefix, 0) + 1
        out.append({**entry, "id": prefix if seen[prefix] == 1 else f"{prefix}.{seen[prefix]}"})
    return out


def key_metadata(entry: dict[str, Any]) -> dict[str, Any]:
    return {"id": entry["id"], "prefix": entry.get("prefix"), "created_at": entry.get("created_at"),
            "revoked_at": entry.get("revoked_at")}


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """A tenant document as read methods return it: no key hashes, key ids and plan defaults filled in."""
    out = {k: v for k, v in doc.items() if k != "api_keys"}
    out.setdefault("status", ACTIVE)
    out.setdefault("priority", DEFAULT_PRIORITY)
    out.setdefault("submit_tps", None)
    out.setdefault("submit_burst", None)
    out["api_keys"] = [key_metadata(k) for k in _with_ids(doc.get("api_keys", []))]
    return out


class TenantStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.tenants = db["tenants"]
        self.changes = db["tenant_changes"]
        self._wc = WriteConcern("majority")
        self._rc = ReadConcern("majority")

    async def ensure_indexes(self) -> None:
        await self.tenants.create_index("api_keys.hash", name="api_key_hash")
        await self.changes.create_index([("tenant_id", ASCENDING), ("at", ASCENDING)], name="tenant_at")

    # ---- writes (each in one transaction with its audit record) -------------------------------

    async def _in_transaction(self, body: Callable[[AsyncClientSession], Awaitable[T]]) -> T:
        """Run `body(session)` in a transaction; the driver retries it on TransientTransactionError
        (e.g. a write conflict with the biller's spend update), so `body` reads what it changes."""
        async with self.db.client.start_session() as session:
            return await session.with_transaction(body, read_concern=self._rc, write_concern=self._wc)

    async def _record(self, session: AsyncClientSession, tenant_id: str, actor: str, now: datetime,
                      change: dict[str, Any]) -> None:
        await self.changes.insert_one({"tenant_id": tenant_id, "actor": actor, "at": now, "change": change},
                                      session=session)

    async def _read(self, session: AsyncClientSession, tenant_id: str) -> dict[str, Any]:
        doc = await self.tenants.find_one({"_id": tenant_id}, session=session)
        if doc is None:
            raise TenantNotFound(tenant_id)
        return doc  # type: ignore[no-any-return]

    async def _set(self, session: AsyncClientSession, tenant_id: str, update: dict[str, Any]) -> dict[str, Any]:
        doc = await self.tenants.find_one_and_update({"_id": tenant_id}, update, session=session,
                                                     return_document=ReturnDocument.AFTER)
        if doc is None:  # deleted meanwhile (nothing in msgcore deletes tenants)
            raise TenantNotFound(tenant_id)
        return doc  # type: ignore[no-any-return]

    async def register(self, tenant_id: str, name: str, now: datetime, *, priority: int = DEFAULT_PRIORITY,
                       submit_tps: float | None = None, submit_burst: int | None = None,
                       actor: str = SYSTEM_ACTOR) -> tuple[str, str]:
        """Create a tenant with one API key; returns (key id, key): the only time the key is visible.
        Raises InvalidTenantSetting (a ValueError) or TenantExists."""
        check_tenant_id(tenant_id)
        plan = validate_settings({"name": name, "priority": priority, "submit_tps": submit_tps,
                                  "submit_burst": submit_burst})
        entry, key = _new_key(now, set())
        doc: dict[str, Any] = {"_id": tenant_id, **plan, "status": ACTIVE, "created_at": now, "spent_minor": 0,
                               "api_keys": [entry]}

        async def body(session: AsyncClientSession) -> None:
            await self.tenants.insert_one(doc, session=session)
            await self._record(session, tenant_id, actor, now, {"action": "created", **plan, "key_id": entry["id"]})

        try:
            await self._in_transaction(body)
        except DuplicateKeyError as e:
            raise TenantExists(tenant_id) from e
        return entry["id"], key

    async def create(self, tenant_id: str, name: str, now: datetime, *, priority: int = DEFAULT_PRIORITY,
                     submit_tps: float | None = None, submit_burst: int | None = None,
                     actor: str = SYSTEM_ACTOR) -> str:
        """Create a tenant with one API key; returns the key (the only time it is visible)."""
        _, key = await self.register(tenant_id, name, now, priority=priority, submit_tps=submit_tps,
                                     submit_burst=submit_burst, actor=actor)
        return key

    async def update_limits(self, tenant_id: str, now: datetime, *, actor: str = SYSTEM_ACTOR,
                            **fields: Any) -> dict[str, Any]:
        """Change some of name, priority, submit_tps, submit_burst (None clears the last two); returns
        the tenant. Values equal to the current ones change and record nothing. Raises
        InvalidTenantSetting or TenantNotFound."""
        wanted = validate_settings(fields)

        async def body(session: AsyncClientSession) -> dict[str, Any]:
            doc = public(await self._read(session, tenant_id))
            diff = {k: v for k, v in wanted.items() if doc.get(k) != v}
            if not diff:
                return doc
            after = await self._set(session, tenant_id, {"$set": diff})
            await self._record(session, tenant_id, actor, now,
                               {"action": "updated", "before": {k: doc.get(k) for k in diff}, "after": diff})
            return public(after)

        return await self._in_transaction(body)

    async def suspend(self, tenant_id: str, reason: str, now: datetime, *,
                      actor: str = SYSTEM_ACTOR) -> dict[str, Any]:
        """Suspend a tenant (its API calls are refused; the workers hold its accepted messages);
        returns the tenant. Already suspended: unchanged (first time and reason kept), nothing recorded."""
        if not reason.strip():
            raise InvalidTenantSetting("reason", "must not be blank")

        async def body(session: AsyncClientSession) -> dict[str, Any]:
            doc = await self._read(session, tenant_id)
            if doc.get("status", ACTIVE) == SUSPENDED:
                return public(doc)
            after = await self._set(session, tenant_id, {"$set": {"status": SUSPENDED, "suspended_at": now,
                                                                  "suspend_reason": reason}})
            await self._record(session, tenant_id, actor, now, {"action": "suspended", "reason": reason})
            return public(after)

        return await self._in_transaction(body)

    async def resume(self, tenant_id: str, now: datetime, *, actor: str = SYSTEM_ACTOR) -> dict[str, Any]:
        """Make a suspended tenant active again; returns the tenant. Already active: nothing recorded."""

        async def body(session: AsyncClientSession) -> dict[str, Any]:
            doc = await self._read(session, tenant_id)
            if doc.get("status", ACTIVE) == ACTIVE:
                return public(doc)
            after = await self._set(session, tenant_id, {"$set": {"status": ACTIVE},
                                                         "$unset": {"suspended_at": "", "suspend_reason": ""}})
            await self._record(session, tenant_id, actor, now,
                               {"action": "resumed", "suspended_at": doc.get("suspended_at"),
                                "suspend_reason": doc.get("suspend_reason")})
            return public(after)

        return await self._in_transaction(body)

    async def rotate_key(self, tenant_id: str, now: datetime, revoke_existing: bool = False, *,
                         actor: str = SYSTEM_ACTOR) -> tuple[str, str]:
        """Add an API key; returns (key id, key), the only time the key is visible. The tenant's other
        keys keep working unless `revoke_existing`. Raises TenantNotFound."""

        async def body(session: AsyncClientSession) -> tuple[str, str]:
            keys = _with_ids((await self._read(session, tenant_id)).get("api_keys", []))
            revoked = []
            if revoke_existing:
                for entry in keys:
                    if entry.get("revoked_at") is None:
                        entry["revoked_at"] = now
                        revoked.append(entry["id"])
            entry, key = _new_key(now, {k["id"] for k in keys})
            await self._set(session, tenant_id, {"$set": {"api_keys": [*keys, entry]}})
            await self._record(session, tenant_id, actor, now, {"action": "key_created", "key_id": entry["id"],
                                                                "prefix": entry["prefix"], "revoked": revoked})
            return entry["id"], key

        return await self._in_transaction(body)

    async def add_key(self, tenant_id: str, now: datetime) -> str | None:
        """Add an API key (the others keep working); returns it, or None if there is no such tenant."""
        try:
            return (await self.rotate_key(tenant_id, now))[1]
        except TenantNotFound:
            return None

    async def revoke_key(self, tenant_id: str, key_id: str, now: datetime, *,
                         actor: str = SYSTEM_ACTOR) -> dict[str, Any]:
        """Revoke one key; returns its metadata. Already revoked: unchanged, nothing recorded.
        Raises TenantNotFound or KeyNotFound."""

        async def body(session: AsyncClientSession) -> dict[str, Any]:
            keys = _with_ids((await self._read(session, tenant_id)).get("api_keys", []))
            entry = next((k for k in keys if k["id"] == key_id), None)
            if entry is None:
                raise KeyNotFound(tenant_id, key_id)
            if entry.get("revoked_at") is not None:
                return key_metadata(entry)
            entry["revoked_at"] = now
            await self._set(session, tenant_id, {"$set": {"api_keys": keys}})
            await self._record(session, tenant_id, actor, now, {"action": "key_revoked", "key_id": key_id})
            return key_metadata(entry)

        return await self._in_transaction(body)

    # ---- reads ---------------------------------------------------------------------------------

    async def authenticate(self, api_key: str) -> Tenant | None:
        """The tenant holding this unrevoked key, whatever its status; None for an unknown key."""
        doc = await self.tenants.find_one({"api_keys": {"$elemMatch": {"hash": hash_key(api_key), "revoked_at": None}}},
                                          {"name": 1, "status": 1, "priority": 1, "submit_tps": 1, "submit_burst": 1})
        if doc is None:
            return None
        return Tenant(doc["_id"], doc["name"], doc.get("status", ACTIVE), doc.get("priority", DEFAULT_PRIORITY),
                      doc.get("submit_tps"), doc.get("submit_burst"))

    async def get(self, tenant_id: str) -> dict[str, Any] | None:
        doc = await self.tenants.find_one({"_id": tenant_id}, {"api_keys.hash": 0})
        return public(doc) if doc else None

    async def list(self) -> builtins.list[dict[str, Any]]:
        return [public(d) async for d in self.tenants.find({}, {"api_keys.hash": 0}).sort("_id")]

    async def list_keys(self, tenant_id: str) -> builtins.list[dict[str, Any]] | None:
        """Metadata of the tenant's keys (id, prefix, created_at, revoked_at), oldest first; None if
        there is no such tenant."""
        doc = await self.get(tenant_id)
        keys: builtins.list[dict[str, Any]] | None = None if doc is None else doc["api_keys"]
        return keys

    async def history(self, tenant_id: str, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The last `limit` recorded changes of a tenant, oldest first: {actor, at, change}."""
        cursor = self.changes.find({"tenant_id": tenant_id}, {"_id": 0, "actor": 1, "at": 1, "change": 1})
        docs = [d async for d in cursor.sort([("at", -1), ("_id", -1)]).limit(limit)]
        return list(reversed(docs))
