"""Every ```sql block of README.md and docs/reporting.md runs, as the read-only BI role, against a
schema projected from a real log, and returns rows; and docs/reporting.md names every table, view
and column of the schema.

The examples say `reporting.`; here that prefix becomes the test's schema.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql
from pymongo.asynchronous.database import AsyncDatabase

from projections.bi_role import drop_bi_role, ensure_bi_role
from projections.replay import replay_into
from tests.integration.test_projector import events_collection, insert
from tests.integration.test_reporting_schema import flat, reporting_log

ROOT = Path(__file__).resolve().parents[2]
DOCS = {"README.md": 6, "docs/reporting.md": 12}  # file: at least this many sql statements
_SQL_BLOCK = re.compile(r"```sql\n(.*?)```", re.DOTALL)
_SCHEMA_PREFIX = re.compile(r"\breporting\.")


def sql_blocks(name: str) -> list[str]:
    return _SQL_BLOCK.findall((ROOT / name).read_text())


def for_schema(block: str, schema: str) -> str:
    return _SCHEMA_PREFIX.sub(f"{schema}.", block)


def statement_count(block: str) -> int:
    return sum(1 for part in block.split(";") if re.sub(r"--[^\n]*", "", part).strip())


def psql_binary() -> str | None:
    try:
        from ops.embedded import _pg_bin

        candidate = _pg_bin("psql")
        if Path(candidate).exists():
            return candidate
    except Exception:  # not installed with the embedded servers: fall back to the PATH
        pass
    return shutil.which("psql")


@pytest_asyncio.fixture(loop_scope="session")
async def projected(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> AsyncIterator[tuple[str, str]]:
    """(schema, BI role): a schema replayed from a log of the last minutes, and a role to read it."""
    events = await events_collection(mongo_db)
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=15)
    await insert(
        events, flat(reporting_log(base, n=40, tenants=("demo", "acme"), campaigns=("spring-sale", "welcome")))
    )
    await replay_into(events, pg_url, pg_schema)
    role = f"msgcore_bi_{uuid.uuid4().hex[:10]}"
    await ensure_bi_role(pg_url, pg_schema, role)
    try:
        yield pg_schema, role
    finally:
        await drop_bi_role(pg_url, role)


def test_the_docs_have_examples() -> None:
    for name, least in DOCS.items():
        blocks = sql_blocks(name)
        assert sum(statement_count(b) for b in blocks) >= least, name
        assert all("reporting." in b for b in blocks), f"{name}: an example does not name the schema"


@pytest.mark.parametrize("name", list(DOCS))
async def test_every_example_runs_and_returns_rows(projected: tuple[str, str], pg_url: str, name: str) -> None:
    schema, role = projected
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
        for block in sql_blocks(name):
            async with conn.cursor() as cur:
                await cur.execute(for_schema(block, schema).encode())
                results = 0
                while True:
                    assert cur.description is not None, f"{name}: not a query:\n{block}"
                    assert await cur.fetchall(), f"{name}: no rows from:\n{block}"
                    results += 1
                    if not cur.nextset():
                        break
                assert results == statement_count(block), block


@pytest.mark.parametrize("name", list(DOCS))
async def test_examples_paste_into_psql(projected: tuple[str, str], pg_url: str, name: str) -> None:
    psql = psql_binary()
    if psql is None:
        pytest.skip("no psql binary")
    schema, role = projected
    script = f"SET ROLE {role};\n" + "\n".join(for_schema(b, schema) for b in sql_blocks(name))
    done = subprocess.run(
        [psql, "-X", "-v", "ON_ERROR_STOP=1", "-d", pg_url],
        input=script, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(0 rows)" not in done.stdout, done.stdout
    assert done.stdout.count(" rows)") + done.stdout.count(" row)") == sum(statement_count(b) for b in sql_blocks(name))


async def test_reporting_md_documents_every_table_view_and_column(pg_url: str, pg_schema: str) -> None:
    from projections.schema import migrate

    await migrate(pg_url, pg_schema)
    text = (ROOT / "docs/reporting.md").read_text()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s"
            " ORDER BY table_name, ordinal_position",
            (pg_schema,),
        )
        columns = await cur.fetchall()
    assert columns
    missing = []
    for table, column in columns:
        if f"`{table}`" not in text:
            missing.append(table)
        if not re.search(rf"`(?:\w+\.)?{re.escape(column)}`", text):
            missing.append(f"{table}.{column}")
    assert not missing, f"docs/reporting.md does not document: {sorted(set(missing))}"
