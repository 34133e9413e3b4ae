"""The database handle a process holds, and whether it answers.

The api (and any other entry point) types its handle with `Database` and checks reachability with
`ping`, so that nothing outside this package imports the driver.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from core.store.errors import StoreUnavailable

Database = AsyncDatabase[Any]
Session = AsyncClientSession  # a transaction's session, for tools that read a consistent snapshot
# What a poll loop may retry after a back-off: the store was unreachable or refused for a transient
# reason (core/workers/loop.py, the connector's side writes).
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (ConnectionFailure, OperationFailure, StoreUnavailable)
# Any error of the driver: what an operator tool reports as "the database failed" (ops/cli).
DRIVER_ERRORS: tuple[type[Exception], ...] = (PyMongoError,)

# Driver errors meaning "the database cannot be reached" that some store methods still let through
# untranslated (tenant authentication, route and number reads, ...). An entry point maps them like
# StoreUnavailable until every method of core/store translates its own (then this becomes empty).
UNTRANSLATED_UNAVAILABLE: tuple[type[Exception], ...] = (ConnectionFailure,)


async def ping(db: Database, timeout_s: float) -> None:
    """Return once the database answered a ping; raise StoreUnavailable if it did not within
    `timeout_s` (bounded: the driver alone would wait its whole server selection timeout, 30 s by
    default, longer than any health probe)."""
    try:
        await asyncio.wait_for(db.command("ping"), timeout_s)
    except (TimeoutError, PyMongoError) as e:
        raise StoreUnavailable(f"ping: {e!r}") from e
