"""When a connector records the receipts and MO its binds brought in (smsc/receipts.py does how)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from core.store.errors import StoreUnavailable
from smsc.receipts import ReceiptDesk

log = logging.getLogger(__name__)

FLUSH_S = 0.02
RECEIPT_BATCH = 500
# A flush is one commit (about five store round trips) whatever its size. 0.25 s instead of 0.1 s:
# the 100k campaign 15 % faster and its one-time passwords no slower (receipts reach the log 0.15 s
# later; the SMSC's window is not held: a pause in the receipts still flushes at once).
RECEIPT_WAIT_S = 0.25
BACKOFF_CAP_S = 5.0


async def receipt_loop(desk: ReceiptDesk, stop: asyncio.Event, clock: Callable[[], datetime]) -> None:
    """Flush the receipts when they stop coming (the SMSC's deliver window may be full: it waits
    for our acknowledgements), or when RECEIPT_BATCH of them or RECEIPT_WAIT_S have piled up. One
    flush costs at most one query and one commit, whatever its size."""
    loop = asyncio.get_running_loop()
    backoff = FLUSH_S
    seen, since = 0, loop.time()
    while not stop.is_set():
        await asyncio.sleep(backoff)
        if not desk.busy:
            seen, since = 0, loop.time()
            continue
        n = len(desk.fresh)
        if n > 0 and n != seen and n < RECEIPT_BATCH and loop.time() - since < RECEIPT_WAIT_S:
            seen = n  # still coming in: let the batch grow
            continue
        try:
            await desk.flush(clock())
            desk.stats["receipt_flushes"] += 1
            seen, since = 0, loop.time()
            backoff = FLUSH_S
        except StoreUnavailable as e:
            backoff = min(BACKOFF_CAP_S, backoff * 2)
            log.warning("connector route=%s: store unavailable, keeping %d receipts in memory; retry in %.1fs: %s",
                        desk.route_id, len(desk.fresh), backoff, e)


async def final_receipts(desk: ReceiptDesk, clock: Callable[[], datetime]) -> None:
    """A stopping connector's last flush (a few tries)."""
    for _ in range(3):
        try:
            if desk.busy:
                await desk.flush(clock())
            return
        except StoreUnavailable as e:
            log.warning("connector route=%s: final receipt flush failed: %s", desk.route_id, e)
            await asyncio.sleep(0.2)
