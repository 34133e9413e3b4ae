"""Bind leases (collection `esme_binds`): an SMPP account's `max_binds` enforced across every
`msgcore smpp-server` process.

One document per open bind:

    _id           the bind id (random, chosen by the server process)
    system_id     the account
    holder        the server process holding it (its leases are renewed together)
    lease_until   the bind counts until then; its holder renews it every few seconds, so a bind of a
                  process that died (kill -9, lost host) stops counting one lease after its last renewal
    opened_at, peer, mode

A bind is admitted in one transaction that (1) bumps the account's slot document in `esme_bind_slots`,
(2) deletes the account's expired leases, (3) counts the live ones and (4) inserts the new lease if
there is room. Step 1 is a write to one document per account: two processes admitting a bind of
the same account at the same moment conflict on it, the driver retries the loser, and the retry
counts the winner's lease; so two binds can never both take the last slot (a count and an insert
alone would not conflict: snapshot isolation lets both see the same count).

The happy path writes the lease once at bind, one `update_many` per process per renewal period, and
one delete at unbind: nothing per PDU.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.store.errors import StoreUnavailable
from core.store.topics import EventLog

log = logging.getLogger(__name__)


class BindLeases:
    def __init__(self, db: AsyncDatabase[Any]) -> None:
        self.binds = db["esme_binds"]
        self.slots = db["esme_bind_slots"]
        self.log = EventLog(db)  # for its transaction runner (retries, error translation)

    async def ensure_indexes(self) -> None:
        try:
            await self.binds.create_index([("system_id", ASCENDING), ("lease_until", ASCENDING)], name="account")
            await self.binds.create_index("holder", name="holder")
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def acquire(self, *, system_id: str, bind_id: str, holder: str, max_binds: int, now: datetime,
                      lease_s: float, peer: str = "", mode: str = "") -> tuple[bool, int]:
        """Take a slot of `system_id` for `bind_id`: (admitted, live binds of the account in every
        process before this one). Refused when `max_binds` are live (no lease written then). Raises
        StoreUnavailable."""
        until = now + timedelta(seconds=lease_s)

        async def body(session: Any) -> tuple[bool, int]:
            # The serialising write first: every admission of this account conflicts here.
            await self.slots.update_one({"_id": system_id}, {"$inc": {"admissions": 1}}, upsert=True,
                                        session=session)
            await self.binds.delete_many({"system_id": system_id, "lease_until": {"$lte": now}}, session=session)
            live = await self.binds.count_documents({"system_id": system_id}, session=session)
            if live >= max_binds:
                return False, live
            await self.binds.insert_one({"_id": bind_id, "system_id": system_id, "holder": holder,
                                         "lease_until": until, "opened_at": now, "peer": peer, "mode": mode},
                                        session=session)
            return True, live

        # A refusal returns from the transaction too, so the slot bump commits: harmless (a counter).
        admitted, live = await self.log.transaction(body)
        return bool(admitted), int(live)

    async def renew(self, holder: str, now: datetime, lease_s: float) -> int:
        """Extend every lease of `holder`; returns how many it holds. Raises StoreUnavailable."""
        try:
            res = await self.binds.update_many({"holder": holder},
                                               {"$set": {"lease_until": now + timedelta(seconds=lease_s)}})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return int(res.matched_count)

    async def release(self, bind_id: str) -> None:
        """Free one bind's slot at once (unbind, connection closed). Raises StoreUnavailable; the
        lease then expires by itself."""
        try:
            await self.binds.delete_one({"_id": bind_id})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e

    async def release_holder(self, holder: str) -> int:
        """Free every slot of a process (graceful stop). Raises StoreUnavailable."""
        try:
            res = await self.binds.delete_many({"holder": holder})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return int(res.deleted_count)

    async def live(self, system_id: str, now: datetime) -> int:
        """Binds of the account that count now (all processes)."""
        try:
            return await self.binds.count_documents({"system_id": system_id, "lease_until": {"$gt": now}})
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
