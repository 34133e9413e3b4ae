"""The API's read side over the reporting tables (PostgreSQL): message search and campaign progress.

The routes parse their input, call these and shape the answer; the SQL lives here. The tables follow
the log with the projector's lag. Every query is one read-only statement on an autocommit
connection of the process's pool (`reporting_pool`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

log = logging.getLogger(__name__)

PROGRESS_TIMEOUT_S = 2.0


class ReportingUnavailable(Exception):
    """The reporting database is not configured, not reachable, or has no tables yet; `retry_after_s`
    is the advice given to the client (None: no advice, e.g. not configured at all)."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def reporting_pool(pg_url: str) -> AsyncConnectionPool:
    """A (not yet opened) pool on the reporting database. Connections are in autocommit: every query
    is one read-only statement."""
    return AsyncConnectionPool(pg_url, min_size=1, max_size=10, open=False, timeout=5.0,
                               kwargs={"autocommit": True, "application_name": "msgcore-api"},
                               name="reporting")


# ---- message search --------------------------------------------------------------------------------

SEARCH_COLUMNS = ("message_id", "state", "to_number", "route_id", "parts", "accepted_at", "delivered_at",
                  "billed", "amount_minor")


@dataclass(frozen=True)
class SearchFilters:
    """Filters of a search; None leaves a filter out. `since` inclusive, `until` exclusive."""

    state: str | None = None
    campaign_id: str | None = None
    to: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def search_messages(pool: AsyncConnectionPool, schema: str, tenant_id: str, filters: SearchFilters,
                          after: tuple[datetime, str] | None, limit: int) -> list[dict[str, Any]]:
    """At most `limit` rows (columns `SEARCH_COLUMNS`) of the tenant's accepted messages, newest first
    by (accepted_at, message_id), strictly after the keyset `after`. Raises ReportingUnavailable."""
    params: dict[str, Any] = {**vars(filters), "tenant": tenant_id, "limit": limit}
    if after is not None:
        params["after_at"], params["after_id"] = after
    query = _search_sql(schema, filters, after is not None)
    try:
        async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, params)
            return await cur.fetchall()
    except psycopg.errors.UndefinedTable as e:
        raise ReportingUnavailable("the reporting tables do not exist yet (is the projector running?)",
                                   retry_after_s=5) from e
    except (PoolTimeout, psycopg.OperationalError) as e:
        log.warning("reporting database unavailable for search: %r", e)
        raise ReportingUnavailable("the reporting database is unavailable, retry later", retry_after_s=1) from e


def _search_sql(schema: str, filters: SearchFilters, keyset: bool) -> sql.Composed:
    conds: list[sql.Composable] = [sql.SQL("tenant_id = %(tenant)s"), sql.SQL("accepted_at IS NOT NULL")]
    for column, key, op in (("state", "state", "="), ("campaign_id", "campaign_id", "="),
                            ("to_number", "to", "="), ("accepted_at", "since", ">="), ("accepted_at", "until", "<")):
        if getattr(filters, key) is not None:
            conds.append(sql.SQL("{} {} {}").format(sql.Identifier(column), sql.SQL(op), sql.Placeholder(key)))
    if keyset:
        conds.append(sql.SQL("(accepted_at, message_id) < (%(after_at)s, %(after_id)s)"))
    return sql.SQL(
        "SELECT {} FROM {}.messages WHERE {} ORDER BY accepted_at DESC, message_id DESC LIMIT %(limit)s"
    ).format(
        sql.SQL(", ").join(sql.Identifier(c) for c in SEARCH_COLUMNS), sql.Identifier(schema),
        sql.SQL(" AND ").join(conds))


# ---- campaign progress -----------------------------------------------------------------------------

@dataclass(frozen=True)
class CampaignStates:
    """A campaign's messages by current state, and how many were sent in the last minute."""

    counts: dict[str, int]
    sent_last_minute: int


async def campaign_states(pool: AsyncConnectionPool | None, schema: str, tenant_id: str,
                          campaign_id: str) -> CampaignStates | None:
    """The campaign's messages by state; None when reporting is not configured or unavailable (the
    campaign is then answered without them: progress is an extra, never a reason to fail)."""
    if pool is None:
        return None
    query = sql.SQL("SELECT state, count(*) AS n, count(*) FILTER (WHERE sent_at > now() - interval '60 seconds') "
                    "AS recent FROM {}.messages WHERE campaign_id = %s AND tenant_id = %s GROUP BY state"
                    ).format(sql.Identifier(schema))
    try:
        async with pool.connection(timeout=PROGRESS_TIMEOUT_S) as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(query, (campaign_id, tenant_id))
            rows = await cur.fetchall()
    except (PoolTimeout, psycopg.Error) as e:
        log.warning("campaign=%s tenant=%s: reporting unavailable for progress: %r", campaign_id, tenant_id, e)
        return None
    return CampaignStates({r["state"]: r["n"] for r in rows if r["state"]}, sum(r["recent"] for r in rows))
