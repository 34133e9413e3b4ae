"""Every component as a real process on loopback (ops/stack.py), on a fresh database and reporting
schema, dropped afterwards; a component that exited badly fails the test that used the stack."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from core.domain.routing import Route
from ops.stack import Stack, seed
from tests.conftest import unique_name


@contextlib.asynccontextmanager
async def fresh_stack(server_urls: dict[str, str], mongo_client: Any, work: Path, prefix: str) -> AsyncIterator[Stack]:
    """A seeded stack (route `sim` on its simulator, tenant `acme`: keys in `stack.keys`), not started."""
    s = Stack(server_urls["mongo"], server_urls["pg"], unique_name(prefix), unique_name("rep"), work,
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
