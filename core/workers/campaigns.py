"""The scheduler's campaign jobs: release scheduled campaigns when due, cancel what a canceled
campaign had not sent yet, and mark campaigns completed.

`msgcore scheduler` runs `sweep` every second and, for each scheduled campaign it sees, an APScheduler
date job at its exact `send_at`; the periodic sweep is the safety net (a scheduler restarted after
`send_at` releases the campaign on its first sweep).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from core.store.campaigns import CampaignStore

log = logging.getLogger(__name__)


class CampaignSweeper:
    def __init__(self, campaigns: CampaignStore, clock: Callable[[], datetime]) -> None:
        self.campaigns = campaigns
        self.clock = clock
        self.released = 0
        self.canceled_messages = 0

    async def release(self) -> list[str]:
        released = await self.campaigns.release_due(self.clock())
        for campaign_id in released:
            log.info("campaign=%s released: send_at reached", campaign_id)
        self.released += len(released)
        return released

    async def sweep(self) -> int:
        """One pass of every campaign job; returns how much it did."""
        now = self.clock()
        released = await self.release()
        canceled = await self.campaigns.cancel_sweep(now)
        if canceled:
            log.info("campaigns: %d messages canceled", canceled)
        self.canceled_messages += canceled
        completed = await self.campaigns.complete_finished(now)
        for campaign_id in completed:
            log.info("campaign=%s completed: nothing left to send", campaign_id)
        return len(released) + canceled + len(completed)
