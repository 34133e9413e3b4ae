"""A token bucket shared by all binds of a route: the carrier's TPS limit holds across binds."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """`rate` tokens per second with no burst (capacity one token). rate 0 = unlimited.

    A carrier's TPS limit holds for every calendar second: a bucket that could hold a second's worth
    of tokens would let an idle route send up to twice its limit in the first second of a burst."""

    CAPACITY = 1.0

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = self.CAPACITY
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.CAPACITY, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)

    def pause(self, seconds: float) -> None:
        """Spend the bucket into debt so nothing is sent for about `seconds` (SMSC throttling)."""
        if self.rate > 0:
            self.tokens = min(self.tokens, 0.0) - seconds * self.rate
