"""The poll loop shared by the stages: do a step, sleep only when there was nothing to do."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from core.aio import sleep_or_stop
from core.store.database import TRANSIENT_ERRORS

log = logging.getLogger(__name__)


async def run_until_stopped(name: str, step: Callable[[], Awaitable[int]], stop: asyncio.Event,
                            idle_s: float, max_backoff_s: float = 5.0, max_idle_s: float | None = None) -> None:
    """Call `step()` until `stop` is set. A step returns how much work it did; 0 means idle.

    With `max_idle_s`, each idle step in a row doubles the sleep up to it (work resets it to
    `idle_s`): an idle poll is a store round trip, and a stage that is idle for long need not ask
    as often as one that just ran dry. Transient store errors back off and retry: a stage holds
    nothing that a restart would lose.
    """
    backoff = idle_s
    idle = idle_s
    while not stop.is_set():
        try:
            done = await step()
            backoff = idle_s
        except TRANSIENT_ERRORS as e:
            log.warning("%s: store error, retrying in %.1fs: %s", name, backoff, e)
            done = 0
            backoff = min(max_backoff_s, backoff * 2)
            await sleep_or_stop(stop, backoff)
            continue
        if done == 0:
            await sleep_or_stop(stop, idle)
            if max_idle_s is not None:
                idle = min(max_idle_s, idle * 2)
        else:
            idle = idle_s
