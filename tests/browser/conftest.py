"""A running msgcore (every component a real process, ops/stack.py) and a real headless Chromium
(Debian's `chromium`, driven by Playwright through `executable_path`: no browser download)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from core.domain.routing import Route
from ops.stack import Stack, seed
from tests.conftest import unique_name

CHROMIUM = os.environ.get("MSGCORE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest_asyncio.fixture(loop_scope="session")
async def dash_stack(server_urls: dict[str, str], mongo_client: Any, tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(server_urls["mongo"], server_urls["pg"], unique_name("dash"), unique_name("rep"), tmp_path / "stack",
              receipt_delay_s=0.1)
    s.keys = await seed(s.mongo_url, s.mongo_db, [Route(id="sim", port=s.sim_port, price_per_part=5, window=50)],
                        ["acme"])  # type: ignore[attr-defined]
    s.start_all()
    await asyncio.to_thread(s.wait_http)
    yield s
    codes = s.stop_all()
    await mongo_client.drop_database(s.mongo_db)
    with psycopg.connect(s.pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s.schema)))
    crashed = {n: c for n, c in codes.items() if c not in (0, None, -15)}
    assert not crashed, f"components exited badly: {crashed}"


@pytest_asyncio.fixture(loop_scope="session")
async def page() -> AsyncIterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set MSGCORE_CHROMIUM)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox cannot start.
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=["--no-sandbox", "--disable-dev-shm-usage"])
        context = await browser.new_context(viewport={"width": 1400, "height": 1000})
        yield await context.new_page()
        await context.close()
        await browser.close()
