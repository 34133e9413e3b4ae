"""Numbers assigned to tenants: an MO message (deliver_sm that is not a receipt) belongs to the tenant
that owns its destination number.

Collection `numbers`: `{_id: number, tenant_id, assigned_at (UTC), actor}`. `_id` is an E.164 number
("+4915112345678") or a short code ("12345"), so a lookup is one probe of the `_id` index and a
batch of MO messages costs one query (`tenants_for`). The collection is small and written only by
operators (admin API), so listing by tenant may scan it.

SMSCs send addresses without the "+" (TON says international), so a lookup tries both spellings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

NUMBER_RE = re.compile(r"^(\+[1-9][0-9]{4,14}|[0-9]{3,8})$")
MAX_PAGE = 1000


async def ensure_inbound_indexes(db: AsyncDatabase[Any]) -> None:
    """Indexes on `events` that MO handling (reply targets) and `GET /v1/inbound` rely on; idempotent.

    Both are partial: only `accepted` (resp. `inbound`) events get an entry, written once when the
    event is inserted (`events` is insert-only), so no other lifecycle event pays for them. An index
    on `streams` instead would be rewritten on every head write.
    """
    events = db["events"]
    await events.create_index([("data.to", ASCENDING), ("tenant_id", ASCENDING), ("at", DESCENDING)],
                              name="accepted_to", partialFilterExpression={"type": "accepted"})
    await events.create_index([("tenant_id", ASCENDING), ("message_id", ASCENDING)],
                              name="inbound_tenant", partialFilterExpression={"type": "inbound"})


class InvalidNumber(ValueError):
    def __init__(self, number: str) -> None:
        super().__init__(f"{number!r} is neither an E.164 number (+ and 5-15 digits) nor a short code (3-8 digits)")
        self.number = number


@dataclass(frozen=True)
class Assignment:
    number: str
    tenant_id: str
    assigned_at: datetime
    actor: str

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Assignment:
        return cls(number=doc["_id"], tenant_id=doc["tenant_id"], assigned_at=doc["assigned_at"],
                   actor=doc.get("actor", ""))


def check_number(number: str) -> str:
    """`number` unchanged if it is an E.164 number or a short code; raises `InvalidNumber` otherwise."""
    if not NUMBER_RE.match(number):
        raise InvalidNumber(number)
    return number


def spellings(address: str) -> list[str]:
    """The `_id`s an SMPP address may be stored under: as given, and with/without the leading "+"."""
    address = address.strip()
    digits = address.lstrip("+")
    if not digits.isdigit():
        return [address]
    return [address, f"+{digits}" if not address.startswith("+") else digits]


class NumberStore:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self.numbers = db["numbers"]

    async def assign(self, number: str, tenant_id: str, actor: str, now: datetime) -> Assignment | None:
        """Assign (or reassign) `number` to `tenant_id`; returns the previous assignment, if any."""
        previous = await self.numbers.find_one_and_update(
            {"_id": check_number(number)},
            {"$set": {"tenant_id": tenant_id, "assigned_at": now, "actor": actor}},
            upsert=True, return_document=ReturnDocument.BEFORE)
        return Assignment.from_doc(previous) if previous else None

    async def unassign(self, number: str) -> Assignment | None:
        """Remove the assignment of `number`; returns it, or None when the number was not assigned."""
        doc = await self.numbers.find_one_and_delete({"_id": number})
        return Assignment.from_doc(doc) if doc else None

    async def get(self, number: str) -> Assignment | None:
        doc = await self.numbers.find_one({"_id": number})
        return Assignment.from_doc(doc) if doc else None

    async def list(self, tenant_id: str | None = None, limit: int = 100, after: str | None = None) -> list[Assignment]:
        """Up to `limit` assignments ordered by number, after number `after` (keyset pagination)."""
        query: dict[str, Any] = {}
        if tenant_id is not None:
            query["tenant_id"] = tenant_id
        if after is not None:
            query["_id"] = {"$gt": after}
        cursor = self.numbers.find(query).sort("_id", ASCENDING).limit(max(1, min(limit, MAX_PAGE)))
        return [Assignment.from_doc(d) async for d in cursor]

    async def tenants_for(self, addresses: Iterable[str]) -> dict[str, str]:
        """address -> tenant id for every address (as the SMSC spelled it) that is assigned; one query."""
        wanted = {a: spellings(a) for a in set(addresses)}
        keys = sorted({k for ks in wanted.values() for k in ks})
        if not keys:
            return {}
        owners = {d["_id"]: d["tenant_id"] async for d in self.numbers.find({"_id": {"$in": keys}}, {"tenant_id": 1})}
        found: dict[str, str] = {}
        for address, ks in wanted.items():
            tenant = next((owners[k] for k in ks if k in owners), None)
            if tenant is not None:
                found[address] = tenant
        return found
