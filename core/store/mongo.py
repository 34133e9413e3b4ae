"""MongoDB client construction: one place sets the options every process uses."""

from __future__ import annotations

from pymongo import AsyncMongoClient
from pymongo.errors import ConnectionFailure, OperationFailure

from core.store.errors import StoreUnavailable

# What a poll loop may retry after a back-off: the store was unreachable or refused for a transient
# reason. Driver types stay in core/store; callers import this tuple.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (ConnectionFailure, OperationFailure, StoreUnavailable)


def connect(url: str, app_name: str) -> AsyncMongoClient:
    """A tz-aware async client: BSON dates come back as aware UTC datetimes."""
    return AsyncMongoClient(url, tz_aware=True, appname=f"msgcore-{app_name}", retryWrites=True)
