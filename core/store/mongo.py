"""MongoDB client construction: one place sets the options every process uses."""

from __future__ import annotations

from pymongo import AsyncMongoClient


def connect(url: str, app_name: str) -> AsyncMongoClient:
    """A tz-aware async client: BSON dates come back as aware UTC datetimes."""
    return AsyncMongoClient(url, tz_aware=True, appname=f"msgcore-{app_name}", retryWrites=True)
