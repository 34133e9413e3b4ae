"""Reads of a tenant's MO (mobile-originated) messages, for `GET /v1/inbound`.

Read from the log (the `inbound` events, each the first and only event of its stream), so an MO is
listed as soon as the connector committed it, without the projector's lag. Oldest first, keyset
pagination by message id (ids are time-ordered). The query runs on the partial index
`inbound_tenant` of `events` (only `inbound` events are in it; see core/store/numbers.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.errors import OperationFailure, PyMongoError

from core.store.database import Database
from core.store.errors import StoreUnavailable
from core.store.numbers import ensure_inbound_indexes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InboundRecord:
    """One MO message as the tenant sees it. `udh` is {ref, total, index} for a part of a long MO."""

    id: str
    sender: str
    to: str
    text: str
    received_at: datetime
    reply_to: str | None
    smsc_message_id: str | None
    route_id: str | None
    udh: dict[str, int] | None


class InboundReads:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def ensure_indexes(self) -> bool:
        """Create the listing's index; False (logged) if the server refused: the listing then works,
        more slowly. Raises StoreUnavailable if the database cannot be reached."""
        try:
            await ensure_inbound_indexes(self.db)
        except OperationFailure as e:
            log.warning("could not create the inbound indexes (listing works, more slowly): %s", e)
            return False
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return True

    async def list(self, tenant_id: str, *, since: datetime | None, after: str | None,
                   limit: int) -> list[InboundRecord]:
        """At most `limit` MO messages of `tenant_id`, by id, after the id `after` and received at or
        after `since`. Raises StoreUnavailable if the database cannot be reached."""
        query: dict[str, Any] = {"type": "inbound", "tenant_id": tenant_id}
        if after is not None:
            query["message_id"] = {"$gt": after}
        if since is not None:
            query["at"] = {"$gte": since}
        try:
            cursor = self.db["events"].find(query).sort("message_id", ASCENDING).limit(limit)
            return [_record(d) async for d in cursor]
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e


def _record(doc: dict[str, Any]) -> InboundRecord:
    data = doc.get("data", {})
    return InboundRecord(id=doc["message_id"], sender=data["from"], to=data["to"], text=data.get("text", ""),
                         received_at=doc["at"], reply_to=data.get("reply_to"),
                         smsc_message_id=data.get("smsc_message_id"), route_id=doc.get("route_id"),
                         udh=dict(data["udh"]) if data.get("udh") else None)
