"""The scheduler's timer job: hands waiting messages (retry back-off, `send_at`, a suspended tenant's
hold) back to their topics once due (core/store/timers.py).

Each round releases up to `batch_size` due timers in one transaction; the job repeats rounds while
there is work, so a burst of due timers drains in one run. A suspended tenant's timers are postponed
(by timers.HOLD_S each time) and released in the first round after the tenant is active again. Who is
suspended comes from a cached read of the tenants (LaneBook, about a second old at most), like every
stage. Two releasers may run (two schedulers): each timer is released exactly once, the loser of a
race finds it gone or loses on the unique (message_id, seq) index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from core import metrics
from core.store.errors import StoreUnavailable
from core.store.lanes import LaneBook
from core.store.timers import ReleaseResult, Timers

log = logging.getLogger(__name__)

MAX_ROUNDS = 100  # per run: the job comes back within a second, other jobs get their turn meanwhile


class TimerReleaser:
    def __init__(self, timers: Timers, book: LaneBook, clock: Callable[[], datetime], *,
                 batch_size: int = 500) -> None:
        self.timers = timers
        self.book = book
        self.clock = clock
        self.batch_size = batch_size
        self.released = 0
        self.postponed = 0

    async def step(self) -> int:
        """One round; returns how many timers it dealt with (released, postponed or dropped as
        obsolete): 0 means nothing was due."""
        await self.book.refresh()
        suspended = self.book.suspended
        result: ReleaseResult = await self.timers.release_due(self.clock(), self.batch_size,
                                                              lambda tenant: tenant in suspended,
                                                              canceling=self.book.canceling)
        self.released += len(result.released)
        self.postponed += len(result.postponed)
        metrics.TIMERS_RELEASED.inc(len(result.released))
        metrics.TIMERS_POSTPONED.inc(len(result.postponed))
        if result.released:
            log.info("timers: %d released (e.g. message=%s)", len(result.released), result.released[0])
        if result.postponed:
            log.debug("timers: %d postponed, tenant suspended (e.g. message=%s)", len(result.postponed),
                      result.postponed[0])
        return len(result.released) + len(result.postponed) + len(result.obsolete)

    async def run_due(self) -> int:
        """Rounds until nothing is due (at most MAX_ROUNDS); returns the timers dealt with. A store
        error ends the run (logged): the next run starts over, nothing is lost."""
        total = 0
        for _ in range(MAX_ROUNDS):
            try:
                done = await self.step()
            except StoreUnavailable as e:
                log.warning("timers: store unavailable, retrying on the next run: %s", e)
                break
            total += done
            if done == 0:
                break
        return total
