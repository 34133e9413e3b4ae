"""The reporting indexes serve the reads that poll: the dashboard's per-minute series (messages by
accepted_at and billed_at over the last hour) uses them rather than reading the whole table."""

from __future__ import annotations

import psycopg
from psycopg import sql

from api.dashboard.reporting import _SERIES, MINUTES
from projections.schema import migrate


async def test_the_dashboard_series_can_use_the_time_indexes(pg_url: str, pg_schema: str) -> None:
    assert "0005_messages_time_indexes" in await migrate(pg_url, pg_schema)
    query = sql.SQL(_SERIES.replace("{back}", str(MINUTES - 1))).format(schema=sql.Identifier(pg_schema))
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        # An empty table is cheaper to scan than to look up; with scans priced out the planner shows
        # whether an index can serve the range at all.
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in await (await conn.execute(sql.SQL("EXPLAIN ") + query)).fetchall())
    assert "messages_accepted_at" in plan, plan
    assert "messages_billed_at" in plan, plan
    assert "Seq Scan on messages" not in plan, plan
