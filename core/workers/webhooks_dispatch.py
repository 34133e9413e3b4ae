"""The dispatcher of one endpoint's topic `hook:<id>`, held through its owner document and epoch.

A batch: read jobs [checkpoint, checkpoint + N), insert ONE attempt document for that range (before
any POST), POST every event (a message's events one after the other in seq order, messages
concurrently up to a bound), retry failures with exponential back-off and jitter until the job is
`max_age_s` old (then `webhook_failed`, and move on), and commit the checkpoint move with ONE
delivery record of every attempt, fenced by the epoch. A crash before the commit leaves the attempt
open: the next owner sends that range again (at least once; counted in `redelivered`).
A long retry flushes what it tried so far as delivery records every `flush_s` (fenced, no move).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core import metrics
from core.aio import sleep_or_stop, wait_and_clear
from core.domain.webhooks import backoff_s, gives_up, succeeded
from core.store.owners import Ownership
from core.store.webhook_queue import WebhookQueue
from core.store.webhooks import Webhook
from core.workers.webhooks_send import HookSender

log = logging.getLogger(__name__)

# Bounds that keep every document far below MongoDB's 16 MB: events per batch (whole jobs, at
# least one), attempts per delivery record (more are flushed as further records of the batch).
MAX_BATCH_EVENTS = 5000
MAX_RECORD_ATTEMPTS = 2000


@dataclass(frozen=True)
class DispatchSettings:
    batch_jobs: int = 20
    endpoint_concurrency: int = 16
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 3600.0
    max_age_s: float = 24 * 3600
    flush_s: float = 10.0


class Stopped(Exception):
    """The process is stopping in the middle of a batch: it is left uncommitted (its attempt stays
    open, and the next owner sends it again)."""


class TopicDispatch:
    def __init__(self, hook: Webhook, own: Ownership, queue: WebhookQueue, sender: HookSender,
                 clock: Callable[[], datetime], settings: DispatchSettings, stop: asyncio.Event,
                 inflight: asyncio.Semaphore, *, rng: random.Random | None = None,
                 before_commit: Callable[[], Awaitable[None]] | None = None) -> None:
        self.hook, self.own, self.queue, self.sender = hook, own, queue, sender
        self.clock, self.settings, self.stop, self.inflight = clock, settings, stop, inflight
        self.rng = rng or random.Random()
        self.before_commit = before_commit  # fault injection for tests: runs between the POSTs and the commit
        self.stats = {"batches": 0, "events": 0, "delivered": 0, "failed": 0, "given_up": 0, "docs": 0}
        self._attempts: list[dict[str, Any]] = []
        self._flush_now = asyncio.Event()
        self._delivered = False

    @property
    def topic(self) -> str:
        return self.hook.topic

    async def step(self) -> int:
        """One batch; returns the events it handled (0: nothing to do)."""
        start, counter = (await self.queue.positions([self.topic]))[self.topic]
        end = min(start + self.settings.batch_jobs, counter)
        if end <= start:
            return 0
        jobs = _bounded(await self.queue.read(self.topic, start, end))
        end = start + len(jobs)
        items = [(job["created_at"], ev) for job in jobs for ev in job["events"]]
        message_ids = sorted({ev["message_id"] for _, ev in items})
        await self.queue.record_attempt(self.own, self.topic, start, end, message_ids, self.clock())
        self.stats["docs"] += 2  # the attempt and its fence (core/store/owners.py)
        self._attempts, self._delivered = [], False
        flusher = asyncio.create_task(self._flush_periodically(start, end))
        try:
            await self._deliver(items)
        except BaseException:
            flusher.cancel()
            await asyncio.gather(flusher, return_exceptions=True)
            raise
        self._delivered = True  # the flusher ends after any write it has begun (none is cut off)
        self._flush_now.set()
        await flusher
        if self.before_commit is not None:
            await self.before_commit()
        self.stats["docs"] += await self.queue.record(self.own, self.topic, (start, end),
                                                      self._record(start, end, self._take(), final=True))
        self.stats["batches"] += 1
        self.stats["events"] += len(items)
        return len(items)

    async def _deliver(self, items: list[tuple[datetime, dict[str, Any]]]) -> None:
        per_message: dict[str, list[tuple[datetime, dict[str, Any]]]] = {}
        for created_at, ev in items:
            per_message.setdefault(ev["message_id"], []).append((created_at, ev))
        lanes = asyncio.Semaphore(self.settings.endpoint_concurrency)

        async def one_message(events: list[tuple[datetime, dict[str, Any]]]) -> None:
            async with lanes:
                # In seq order, each after the previous one's outcome: a receiver sees a message's
                # events in order (a later one waits while an earlier one is retried).
                for created_at, ev in sorted(events, key=lambda x: x[1]["seq"]):
                    await self._deliver_one(created_at, ev)

        results = await asyncio.gather(*(one_message(evs) for evs in per_message.values()), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _deliver_one(self, created_at: datetime, ev: dict[str, Any]) -> None:
        attempt = 0
        while True:
            if self.stop.is_set() and attempt > 0:
                raise Stopped()  # no retry once stopping; first attempts go on, so the batch may commit
            attempt += 1
            async with self.inflight:
                now = self.clock()
                result = await self.sender.send(self.hook.url, self.hook.secret, ev, int(now.timestamp()))
            if result.latency_ms:  # 0: refused before any connection (SSRF guard)
                metrics.WEBHOOK_LATENCY.observe(result.latency_ms / 1000)
            ok = succeeded(result.status)
            done = ok or gives_up(created_at, self.clock(), self.settings.max_age_s)
            outcome = "delivered" if ok else ("webhook_failed" if done else "failed")
            self._attempts.append({"event_id": ev["id"], "message_id": ev["message_id"], "seq": ev["seq"],
                                   "type": ev["type"], "attempt": attempt, "status": result.status,
                                   "latency_ms": round(result.latency_ms, 2), "at": now, "outcome": outcome,
                                   "error": result.error})
            if len(self._attempts) >= MAX_RECORD_ATTEMPTS:
                self._flush_now.set()
            metrics.WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
            self.stats[{"delivered": "delivered", "failed": "failed", "webhook_failed": "given_up"}[outcome]] += 1
            if done:
                if not ok:
                    log.warning("webhook %s tenant=%s message=%s event=%s: webhook_failed after %d attempts (%s)",
                                self.hook.id, self.hook.tenant_id, ev["message_id"], ev["id"], attempt,
                                result.error or result.status)
                return
            delay = backoff_s(attempt, base_s=self.settings.backoff_base_s, cap_s=self.settings.backoff_cap_s,
                              rng=self.rng)
            remaining = self.settings.max_age_s - (self.clock() - created_at).total_seconds()
            await sleep_or_stop(self.stop, max(0.0, min(delay, remaining)))

    async def _flush_periodically(self, start: int, end: int) -> None:
        while True:
            await wait_and_clear(self._flush_now, self.settings.flush_s)
            if self._delivered:
                return
            taken = self._take()
            if taken:
                self.stats["docs"] += await self.queue.record(self.own, self.topic, None,
                                                              self._record(start, end, taken))

    def _take(self) -> list[dict[str, Any]]:
        taken, self._attempts = self._attempts, []
        return taken

    def _record(self, start: int, end: int, attempts: list[dict[str, Any]], *, final: bool = False) -> dict[str, Any]:
        """A delivery record; `final`: the one committed with the checkpoint move."""
        return {"webhook_id": self.hook.id, "tenant_id": self.hook.tenant_id, "topic": self.topic,
                "range": [start, end], "epoch": self.own.epoch, "at": self.clock(), "final": final,
                "message_ids": sorted({a["message_id"] for a in attempts}), "attempts": attempts}


def _bounded(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first jobs holding at most MAX_BATCH_EVENTS events (at least one job)."""
    total = 0
    for n, job in enumerate(jobs):
        total += len(job["events"])
        if n and total > MAX_BATCH_EVENTS:
            return jobs[:n]
    return jobs
