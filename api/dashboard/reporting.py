"""The dashboard's reads of the reporting tables (PostgreSQL): messages per minute over the last hour,
and where each projection stands. Optional extras: any failure (no PostgreSQL configured, not
reachable, tables not created yet, too slow) answers None and the page says "reporting unavailable".

The per-minute series scans the last hour of `messages` by `accepted_at` / `billed_at`; it is cached
per api process (CACHE_S), so however many operators poll, PostgreSQL sees one query every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

log = logging.getLogger(__name__)

TIMEOUT_S = 2.0
CACHE_S = 3.0
MINUTES = 60


@dataclass(frozen=True)
class Minute:
    at: datetime  # start of the minute (UTC)
    accepted: int
    billed: int


@dataclass(frozen=True)
class Checkpoint:
    projection: str
    events_applied: int
    last_event_at: datetime | None
    updated_at: datetime


_SERIES = """
SELECT m.minute, coalesce(a.n, 0) AS accepted, coalesce(b.n, 0) AS billed
FROM generate_series(date_trunc('minute', now()) - interval '{back} minutes', date_trunc('minute', now()),
                     interval '1 minute') AS m(minute)
LEFT JOIN (SELECT date_trunc('minute', accepted_at) AS minute, count(*) AS n FROM {schema}.messages
           WHERE accepted_at >= date_trunc('minute', now()) - interval '{back} minutes' GROUP BY 1) a USING (minute)
LEFT JOIN (SELECT date_trunc('minute', billed_at) AS minute, count(*) AS n FROM {schema}.messages
           WHERE billed_at >= date_trunc('minute', now()) - interval '{back} minutes' GROUP BY 1) b USING (minute)
ORDER BY m.minute
"""


class ReportingReads:
    """Cached reads of one reporting schema through the api's pool."""

    def __init__(self, pool: AsyncConnectionPool | None, schema: str) -> None:
        self.pool, self.schema = pool, schema
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = asyncio.Lock()

    async def per_minute(self) -> list[Minute] | None:
        """Accepted and billed messages per minute, oldest first, the current (partial) minute last."""
        query = sql.SQL(_SERIES.replace("{back}", str(MINUTES - 1))).format(schema=sql.Identifier(self.schema))
        rows = await self._cached("series", query)
        return None if rows is None else [Minute(r["minute"], r["accepted"], r["billed"]) for r in rows]

    async def checkpoints(self) -> list[Checkpoint] | None:
        query = sql.SQL("SELECT projection, events_applied, last_event_at, updated_at FROM {}.checkpoints "
                        "ORDER BY projection").format(sql.Identifier(self.schema))
        rows = await self._cached("checkpoints", query)
        return None if rows is None else [Checkpoint(**r) for r in rows]

    async def _cached(self, name: str, query: sql.Composed) -> list[dict[str, Any]] | None:
        async with self._lock:
            hit = self._cache.get(name)
            if hit is not None and time.monotonic() - hit[0] < CACHE_S:
                return hit[1]  # type: ignore[no-any-return]
            rows = await self._read(query)
            self._cache[name] = (time.monotonic(), rows)
            return rows

    async def _read(self, query: sql.Composed) -> list[dict[str, Any]] | None:
        if self.pool is None:
            return None
        try:
            async with asyncio.timeout(TIMEOUT_S), self.pool.connection(timeout=TIMEOUT_S) as conn, \
                    conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(query)
                return await cur.fetchall()
        except (TimeoutError, PoolTimeout, psycopg.Error) as e:
            log.info("dashboard: reporting read failed: %r", e)
            return None
