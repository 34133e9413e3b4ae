"""Every query of the Grafana reporting dashboard (ops/grafana/dashboards/msgcore-reporting.json) runs
against a freshly migrated reporting schema in a real PostgreSQL."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psycopg

from projections.schema import migrate

DASHBOARD = Path(__file__).resolve().parents[2] / "ops/grafana/dashboards/msgcore-reporting.json"
# Grafana's macro for the time picker, replaced by the range it would expand to.
TIME_FILTER = re.compile(r"\$__timeFilter\(([^()]*(?:\([^()]*\))?[^()]*)\)")


def queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["rawSql"] for p in doc["panels"] for t in p.get("targets", [])]


def expand(raw: str, schema: str) -> str:
    expanded = TIME_FILTER.sub(lambda m: f"{m.group(1)} BETWEEN now() - interval '7 days' AND now()", raw)
    return expanded.replace("${schema}", schema)


async def test_every_reporting_panel_query_runs(pg_url: str, pg_schema: str) -> None:
    await migrate(pg_url, pg_schema)
    found = queries()
    assert len(found) >= 8
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for raw in found:
            sql = expand(raw, pg_schema)
            assert "$" not in sql, sql
            conn.execute(sql).fetchall()  # type: ignore[arg-type]
