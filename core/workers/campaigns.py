"""The scheduler's campaign jobs: release scheduled campaigns when due, mark canceling campaigns
`canceled` and running ones `completed` once their lane is idle.

Canceling the messages themselves is not a job here: the lane's consumers (router, connector)
append `canceled` for every entry they read in a canceling lane; this job only notices when nothing
of the lane is left (core/store/campaigns.py `lane_idle`).

`msgcore scheduler` runs `sweep` every second and, for each scheduled campaign it sees, an APScheduler
date job at its exact `send_at`; the periodic sweep is the safety net (a scheduler restarted after
`send_at` releases the campaign on its first sweep).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from core import metrics
from core.store.campaigns import CampaignStore

log = logging.getLogger(__name__)


class CampaignSweeper:
    def __init__(self, campaigns: CampaignStore, clock: Callable[[], datetime]) -> None:
        self.campaigns = campaigns
        self.clock = clock
        self.released = 0

    async def release(self) -> list[str]:
        """Start every scheduled campaign whose send_at has come; their ids."""
        released = await self.campaigns.release_due(self.clock())
        for campaign_id in released:
            log.info("campaign=%s released: send_at reached", campaign_id)
        self.released += len(released)
        metrics.CAMPAIGN_TRANSITIONS.labels(to="running").inc(len(released))
        return released

    async def sweep(self) -> int:
        """One pass of every campaign job; returns how many campaigns changed status."""
        now = self.clock()
        released = await self.release()
        canceled = await self.campaigns.finish_canceled(now)
        for campaign_id in canceled:
            log.info("campaign=%s canceled: nothing of its lane is left", campaign_id)
        completed = await self.campaigns.complete_finished(now)
        metrics.CAMPAIGN_TRANSITIONS.labels(to="canceled").inc(len(canceled))
        metrics.CAMPAIGN_TRANSITIONS.labels(to="completed").inc(len(completed))
        for campaign_id in completed:
            log.info("campaign=%s completed: nothing left to send", campaign_id)
        return len(released) + len(canceled) + len(completed)
