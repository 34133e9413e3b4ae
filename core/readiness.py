"""Readiness: are the stores a process needs reachable? Shared by the api's /readyz and the workers'
metrics server (core/metrics_server.py).

A check is a name and an async callable that returns when the dependency answers and raises
StoreUnavailable (or OSError) when it does not; `run_checks` bounds each by a timeout and never
raises for those.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from core.store.database import Database, ping
from core.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
OK = "ok"

Check = Callable[[], Awaitable[None]]


def mongo_check(db: Database) -> Check:
    async def check() -> None:
        await ping(db, CHECK_TIMEOUT_S)

    return check


def pg_check(pg_url: str) -> Check:
    """A fresh connection and `SELECT 1` (the workers hold no pool to borrow from)."""

    async def check() -> None:
        # Imported here: psycopg costs ~0.15 s and ~9 MB to the processes that never use PostgreSQL.
        import psycopg

        try:
            async with await psycopg.AsyncConnection.connect(pg_url, connect_timeout=int(CHECK_TIMEOUT_S),
                                                             autocommit=True) as conn:
                await conn.execute("SELECT 1")
        except psycopg.Error as e:
            raise StoreUnavailable(f"postgres: {e!r}") from e

    return check


async def run_checks(checks: dict[str, Check], timeout_s: float = CHECK_TIMEOUT_S) -> dict[str, str]:
    """Each check's outcome: "ok", or "unavailable: <why>". Checks run concurrently."""

    async def one(name: str, check: Check) -> tuple[str, str]:
        try:
            await asyncio.wait_for(check(), timeout_s)
        except (TimeoutError, StoreUnavailable, OSError) as e:
            log.info("readiness: %s unavailable: %r", name, e)
            return name, f"unavailable: {type(e).__name__}"
        return name, OK

    return dict(await asyncio.gather(*(one(n, c) for n, c in checks.items())))


def all_ok(results: dict[str, str]) -> bool:
    return all(v == OK for v in results.values())
