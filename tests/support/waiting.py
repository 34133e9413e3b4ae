"""Bounded waiting for tests: poll a condition until it holds or a deadline passes (never a timed
assertion on how long it took)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 60.0, interval_s: float = 0.1) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s}s")
        await asyncio.sleep(interval_s)
