from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from ops.stack import Stack
from tests.support.stacks import fresh_stack


@pytest_asyncio.fixture(loop_scope="session")
async def stack(server_urls: dict[str, str], mongo_client, tmp_path: Path) -> AsyncIterator[Stack]:
    """All components as real processes on loopback, on a fresh database and reporting schema."""
    async with fresh_stack(server_urls, mongo_client, tmp_path / "stack", "e2e") as s:
        yield s


@pytest.fixture
def e2e_marker(request: pytest.FixtureRequest) -> None:
    request.node.add_marker(pytest.mark.e2e)
