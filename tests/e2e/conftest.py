from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from core.domain.routing import Route
from ops.stack import Stack, seed
from tests.conftest import unique_name


@pytest_asyncio.fixture(loop_scope="session")
async def stack(server_urls: dict[str, str], mongo_client, tmp_path: Path) -> AsyncIterator[Stack]:
    """All components as real processes on loopback, on a fresh database and reporting schema."""
    s = Stack(server_urls["mongo"], server_urls["pg"], unique_name("e2e"), unique_name("rep"), tmp_path / "stack",
              receipt_delay_s=0.1)
    s.keys = await seed(s.mongo_url, s.mongo_db, [Route(id="sim", port=s.sim_port, price_per_part=5, window=50)],
                        ["acme"])  # type: ignore[attr-defined]
    yield s
    codes = s.stop_all()
    await mongo_client.drop_database(s.mongo_db)
    with psycopg.connect(s.pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s.schema)))
    crashed = {n: c for n, c in codes.items() if c not in (0, None, -15)}
    assert not crashed, f"components exited badly: {crashed}"


@pytest.fixture
def e2e_marker(request: pytest.FixtureRequest) -> None:
    request.node.add_marker(pytest.mark.e2e)
