"""Read helpers over the reporting tables, for the API, `msgcore verify` and tests."""

from __future__ import annotations

from datetime import date
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

DailyKey = tuple[date, str, str, str, str]  # day, tenant_id, route_id, channel, state
DailyValue = tuple[int, int, int]  # events, parts, amount_minor

# The definition daily_stats must always equal (see migrations/0001_reporting.sql).
_RECOUNT = """
SELECT (at AT TIME ZONE 'UTC')::date, tenant_id, coalesce(route_id, ''), channel, type, count(*),
       coalesce(sum((data->>'parts')::bigint) FILTER (WHERE type IN ('accepted', 'sent', 'billed')), 0),
       coalesce(sum((data->>'amount')::bigint) FILTER (WHERE type = 'billed'), 0)
FROM {s}.message_events GROUP BY 1, 2, 3, 4, 5
"""


async def _fetch(pg_url: str, query: sql.Composable, *, as_dict: bool = False) -> list[Any]:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = conn.cursor(row_factory=dict_row) if as_dict else conn.cursor()
        async with cur:
            await cur.execute(query)
            return await cur.fetchall()


async def fetch_messages_rows(pg_url: str, schema: str) -> dict[str, dict[str, Any]]:
    """Every row of `{schema}.messages`, keyed by message_id."""
    q = sql.SQL("SELECT * FROM {}.messages").format(sql.Identifier(schema))
    return {r["message_id"]: r for r in await _fetch(pg_url, q, as_dict=True)}


async def fetch_message_events_rows(pg_url: str, schema: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Every row of `{schema}.message_events`, keyed by (message_id, seq)."""
    q = sql.SQL("SELECT * FROM {}.message_events").format(sql.Identifier(schema))
    return {(r["message_id"], r["seq"]): r for r in await _fetch(pg_url, q, as_dict=True)}


async def daily_stats_rows(pg_url: str, schema: str) -> dict[DailyKey, DailyValue]:
    """`{schema}.daily_stats` as {(day, tenant, route, channel, state): (events, parts, amount_minor)}."""
    q = sql.SQL(
        "SELECT day, tenant_id, route_id, channel, state, events, parts, amount_minor FROM {}.daily_stats"
    ).format(sql.Identifier(schema))
    return {tuple(r[:5]): tuple(r[5:]) for r in await _fetch(pg_url, q)}  # type: ignore[misc]


async def recount_daily_stats(pg_url: str, schema: str) -> dict[DailyKey, DailyValue]:
    """daily_stats recomputed from `{schema}.message_events`, same shape as `daily_stats_rows`.

    Equal to `daily_stats_rows` whenever the projection is consistent.
    """
    q = sql.SQL(_RECOUNT).format(s=sql.Identifier(schema))
    return {tuple(r[:5]): tuple(r[5:]) for r in await _fetch(pg_url, q)}  # type: ignore[misc]


async def checkpoint_row(pg_url: str, schema: str, name: str = "reporting") -> dict[str, Any] | None:
    """The projection's row in `{schema}.checkpoints`, or None."""
    q = sql.SQL("SELECT * FROM {}.checkpoints WHERE projection = {}").format(sql.Identifier(schema), sql.Literal(name))
    rows = await _fetch(pg_url, q, as_dict=True)
    return rows[0] if rows else None


# The views of migrations/0003 (documented in docs/reporting.md), in the order they are documented.
REPORTING_VIEWS = (
    "delivery_rate_daily", "tenant_volume_daily", "tenant_volume_monthly", "campaign_progress", "route_latency",
)  # fmt: skip


async def fetch_billing_ledger_rows(pg_url: str, schema: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Every row of `{schema}.billing_ledger`, keyed by (message_id, seq) of its `billed` event."""
    q = sql.SQL("SELECT * FROM {}.billing_ledger").format(sql.Identifier(schema))
    return {(r["message_id"], r["seq"]): r for r in await _fetch(pg_url, q, as_dict=True)}


async def fetch_inbound_rows(pg_url: str, schema: str) -> dict[tuple[str, int], dict[str, Any]]:
    """Every row of `{schema}.inbound`, keyed by (message_id, seq) of its `inbound` event."""
    q = sql.SQL("SELECT * FROM {}.inbound").format(sql.Identifier(schema))
    return {(r["message_id"], r["seq"]): r for r in await _fetch(pg_url, q, as_dict=True)}


async def fetch_view(pg_url: str, schema: str, view: str) -> list[dict[str, Any]]:
    """Every row of one of REPORTING_VIEWS in `schema`, as dicts (in no particular order)."""
    if view not in REPORTING_VIEWS:
        raise ValueError(f"unknown reporting view {view!r}; one of {', '.join(REPORTING_VIEWS)}")
    q = sql.SQL("SELECT * FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(view))
    return await _fetch(pg_url, q, as_dict=True)
