"""The stages' poll loop (core/workers/loop.py): idle polls back off, work resets the pace."""

from __future__ import annotations

import asyncio

import pytest

from core.workers import loop


async def test_idle_polls_back_off_up_to_the_cap_and_work_resets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    stop = asyncio.Event()
    work = iter([0, 0, 0, 0, 0, 3, 0, 0])

    async def no_sleep(_stop: asyncio.Event, seconds: float) -> None:
        slept.append(seconds)

    async def step() -> int:
        done = next(work, None)
        if done is None:
            stop.set()
            return 0
        return done

    monkeypatch.setattr(loop, "sleep_or_stop", no_sleep)
    await loop.run_until_stopped("test", step, stop, 0.05, max_idle_s=0.2)
    assert slept[:7] == [0.05, 0.1, 0.2, 0.2, 0.2, 0.05, 0.1]


async def test_without_a_cap_every_idle_poll_waits_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    stop = asyncio.Event()
    calls = iter(range(4))

    async def no_sleep(_stop: asyncio.Event, seconds: float) -> None:
        slept.append(seconds)

    async def step() -> int:
        if next(calls, None) is None:
            stop.set()
        return 0

    monkeypatch.setattr(loop, "sleep_or_stop", no_sleep)
    await loop.run_until_stopped("test", step, stop, 0.05)
    assert slept[:4] == [0.05, 0.05, 0.05, 0.05]
