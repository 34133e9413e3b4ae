"""Retry policy: exponential back-off with full jitter, capped."""

from __future__ import annotations

import random


def backoff_s(attempt: int, *, base_s: float = 2.0, cap_s: float = 300.0, rng: random.Random | None = None) -> float:
    """Delay before attempt `attempt + 1`: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    ceiling = min(cap_s, base_s * (2 ** max(attempt - 1, 0)))
    return (rng or random).uniform(ceiling / 2, ceiling)
