"""Taking an owner key with a hot standby, for the stages with side effects (the SMPP connector, the
mailer): try the key, and while another holder's lease runs, wait and try again.

The local deadline: a holder stops sending once LEASE_MARGIN of the lease has passed since the
acquisition (or the last renewal) *began* on its own clock, so a process paused in the middle of a
store round trip never sends on a lease the store may already consider expired.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from core.aio import sleep_or_stop
from core.store.errors import StoreUnavailable
from core.store.owners import Owners, Ownership

log = logging.getLogger(__name__)

LEASE_MARGIN = 0.8  # stop sending once this share of the lease has passed since the last renewal began


async def acquire_or_stand_by(owners: Owners, key: str, holder: str, clock: Callable[[], datetime], lease_s: float,
                              stop: asyncio.Event, label: str) -> tuple[Ownership, float] | None:
    """The ownership of `key` and its local deadline (event-loop time), or None once `stop` is set.
    `label` names the stage in the logs (e.g. "connector route=sim")."""
    loop = asyncio.get_running_loop()
    waited = False
    while not stop.is_set():
        started = loop.time()
        try:
            own = await owners.acquire(key, holder, clock(), lease_s)
        except StoreUnavailable as e:
            log.warning("%s: cannot reach the store to acquire %s: %s", label, key, e)
            own = None
        if own is not None:
            return own, started + lease_s * LEASE_MARGIN
        if not waited:
            log.info("%s holder=%s: %s is owned elsewhere; standing by", label, holder, key)
            waited = True
        await sleep_or_stop(stop, min(1.0, lease_s / 4))
    return None


async def unresolved_ranges(owners: Owners, own: Ownership, clock: Callable[[], datetime], stop: asyncio.Event,
                            label: str, policy: str) -> dict[str, list[tuple[int, int]]] | None:
    """Topic -> [start, end) ranges of earlier owners' attempts past the checkpoints: their messages
    get the route's unknown-outcome `policy`. None when the store cannot say: the key is given up
    (and a moment waited) so that another holder, or this one later, starts with the full picture."""
    try:
        attempts = await owners.open_attempts(own.owner, {})
    except StoreUnavailable as e:
        log.warning("%s: cannot read open attempts, giving the key up: %s", label, e)
        await owners.release(own, clock())
        await sleep_or_stop(stop, 1.0)
        return None
    ranges: dict[str, list[tuple[int, int]]] = {}
    for a in attempts:
        ranges.setdefault(a.topic, []).append((a.start, a.end))
    if attempts:
        log.warning("%s: %d open attempts of earlier owners (%s); policy %s", label, len(attempts),
                    ", ".join(f"{a.topic}[{a.start},{a.end})" for a in attempts[:5]), policy)
    return ranges


async def renew(owners: Owners, own: Ownership, clock: Callable[[], datetime], lease_s: float
                ) -> tuple[Ownership, float]:
    """Extend the lease; the ownership and its new local deadline (event-loop time). Raises Fenced
    (another holder took over) or StoreUnavailable (the deadline stays where it was)."""
    started = asyncio.get_running_loop().time()
    renewed = await owners.renew(own, clock(), lease_s)
    return renewed, started + lease_s * LEASE_MARGIN
