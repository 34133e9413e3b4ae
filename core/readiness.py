"""Readiness: are the stores and upstreams a process needs reachable? Shared by the api's /readyz
and the workers' metrics server (core/metrics_server.py). Liveness (/healthz) never comes here: a
store outage must not get every process restarted.

A check is a name and an async callable that returns when the dependency answers and raises
StoreUnavailable (or OSError) when it does not, or NotReady when it answers but is not usable;
`run_checks` bounds each by a timeout and never raises for those.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from core import metrics
from core.store.database import Database, ping
from core.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
OK = "ok"

Check = Callable[[], Awaitable[None]]


class NotReady(Exception):
    """A dependency answered but cannot be used yet; the message names it (route ids, never secrets)."""


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


def smpp_check() -> Check:
    """The connector's upstreams: every route this process owns (or owns a partition of) has at least
    one bound SMPP link. Read from the bind gauges the connector keeps (smsc/connector_metrics.py), so
    no SMSC round trip. A process that owns no route is ready: it stands by for a lease, and holding
    it unready would stall a rolling update whose new copies wait for the old ones' leases."""

    async def check() -> None:
        owned = {s.labels["route"] for s in _samples(metrics.CONNECTOR_OWNER) if s.value > 0}
        bound = {s.labels["route"] for s in _samples(metrics.SMPP_BINDS)
                 if s.labels["state"] == "bound" and s.value > 0}
        if unbound := sorted(owned - bound):
            raise NotReady(f"no bound SMPP link for route {', '.join(unbound)}")

    return check


def _samples(metric: Any) -> list[Any]:
    return [s for family in metric.collect() for s in family.samples]


async def run_checks(checks: dict[str, Check], timeout_s: float = CHECK_TIMEOUT_S) -> dict[str, str]:
    """Each check's outcome: "ok", or "unavailable: <why>". Checks run concurrently."""

    async def one(name: str, check: Check) -> tuple[str, str]:
        try:
            await asyncio.wait_for(check(), timeout_s)
        except NotReady as e:
            log.info("readiness: %s not ready: %s", name, e)
            return name, f"unavailable: {e}"
        except (TimeoutError, StoreUnavailable, OSError) as e:
            log.info("readiness: %s unavailable: %r", name, e)
            return name, f"unavailable: {type(e).__name__}"
        return name, OK

    return dict(await asyncio.gather(*(one(n, c) for n, c in checks.items())))


def all_ok(results: dict[str, str]) -> bool:
    return all(v == OK for v in results.values())
