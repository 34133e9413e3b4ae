"""A running msgcore (every component a real process, ops/stack.py) and a real headless Chromium
(Debian's `chromium`, driven by Playwright through `executable_path`: no browser download)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from ops.stack import Stack
from tests.support.stacks import fresh_stack

CHROMIUM = os.environ.get("MSGCORE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest_asyncio.fixture(loop_scope="session")
async def dash_stack(server_urls: dict[str, str], mongo_client: Any, tmp_path: Path) -> AsyncIterator[Stack]:
    async with fresh_stack(server_urls, mongo_client, tmp_path / "stack", "dash") as s:
        s.start_all()
        await asyncio.to_thread(s.wait_http)
        yield s


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
