"""The webhook dispatcher of a process: one task per hook topic it owns.

Every `refresh_s` it reads the enabled registrations, tries to own the topics nobody holds (owner
document + epoch, core/store/owners.py), renews its leases, stops the tasks of endpoints deleted or
disabled (and of topics another holder took over), and sets the backlog gauge. Each endpoint has
its own task and its own bound on messages in flight; all share one bound on POSTs in flight: a
slow or dead endpoint delays only its own topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from core import metrics
from core.aio import sleep_or_stop
from core.store.database import TRANSIENT_ERRORS
from core.store.errors import CheckpointMoved, Fenced, GapInTopic
from core.store.owners import Owners
from core.store.webhook_queue import WebhookQueue, owner_key
from core.store.webhooks import Webhook, WebhookStore
from core.workers.webhooks_dispatch import DispatchSettings, Stopped, TopicDispatch
from core.workers.webhooks_send import HookSender

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0
HOUSEKEEPING_S = 60.0


@dataclass
class _Owned:
    dispatch: TopicDispatch
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None


@dataclass
class WebhookDispatcher:
    store: WebhookStore
    queue: WebhookQueue
    owners: Owners
    sender: HookSender
    clock: Callable[[], datetime]
    holder: str
    settings: DispatchSettings = field(default_factory=DispatchSettings)
    lease_s: float = 30.0
    refresh_s: float = 2.0
    poll_s: float = 0.05
    max_idle_s: float = 0.5
    concurrency: int = 256
    jobs_retention_s: float = 7 * 86_400  # delivered jobs are kept this long (what `replay` can send again)
    deliveries_retention_s: float = 30 * 86_400  # delivery records (GET /v1/webhooks/deliveries)
    owned: dict[str, _Owned] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"redelivered": 0})

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until `stop`; then let each topic abandon its batch and give its owner up."""
        self._inflight = asyncio.Semaphore(self.concurrency)
        self._housekeeping_at = time.monotonic() + HOUSEKEEPING_S
        try:
            while not stop.is_set():
                try:
                    await self.refresh()
                except TRANSIENT_ERRORS as e:
                    log.warning("webhooks: refresh failed, store unavailable: %s", e)
                await sleep_or_stop(stop, self.refresh_s)
        finally:
            for webhook_id in list(self.owned):
                await self._drop(webhook_id, release=True)

    async def refresh(self) -> None:
        hooks = {h.id: h for h in await self.store.enabled_all()}
        for webhook_id in [w for w in self.owned if w not in hooks]:
            await self._drop(webhook_id, release=True)
        now = self.clock()
        for hook in hooks.values():
            held = self.owned.get(hook.id)
            if held is not None:
                held.dispatch.hook = hook  # a new URL or secret applies from the next POST
                await self._renew(held, now)
            else:
                await self._take(hook, now)
        metrics.WEBHOOK_TOPICS_OWNED.set(len(self.owned))
        metrics.WEBHOOK_BACKLOG.set(await self.queue.backlog(list(self.owned)))
        if time.monotonic() >= self._housekeeping_at:
            self._housekeeping_at = time.monotonic() + HOUSEKEEPING_S
            await self._forget_resolved()

    async def _forget_resolved(self) -> None:
        """Attempt documents below the checkpoints say nothing the delivery records do not: keep few.
        Jobs below the checkpoint and delivery records go after their retention."""
        hooks = {h.dispatch.topic: h.dispatch.hook.id for h in self.owned.values()}
        positions = await self.queue.positions(list(hooks))
        now = self.clock()
        for topic, webhook_id in hooks.items():
            await self.owners.forget_resolved(owner_key(topic), {topic: positions[topic][0]})
            jobs, records = await self.queue.purge(webhook_id, positions[topic][0],
                                                   now - timedelta(seconds=self.jobs_retention_s),
                                                   now - timedelta(seconds=self.deliveries_retention_s))
            if jobs or records:
                log.info("webhook %s: retention removed %d delivered job(s) and %d delivery record(s)",
                         webhook_id, jobs, records)

    async def _take(self, hook: Webhook, now: datetime) -> None:
        own = await self.owners.acquire(owner_key(hook.topic), self.holder, now, self.lease_s)
        if own is None:
            return
        start = (await self.queue.positions([hook.topic]))[hook.topic][0]
        open_ranges = await self.owners.open_attempts(own.owner, {hook.topic: start})
        if open_ranges:
            # Sent before a crash or a takeover without a commit: read again and sent again.
            jobs = await self.queue.read(hook.topic, start, max(a.end for a in open_ranges))
            again = sum(len(j["events"]) for j in jobs)
            self.stats["redelivered"] += again
            metrics.WEBHOOK_REDELIVERED.inc(again)
            log.warning("webhook %s tenant=%s: %d event(s) of an earlier owner's attempt are sent again",
                        hook.id, hook.tenant_id, again)
        topic_stop = asyncio.Event()
        dispatch = TopicDispatch(hook, own, self.queue, self.sender, self.clock, self.settings,
                                 topic_stop, self._inflight, rng=random.Random())
        held = _Owned(dispatch, topic_stop)
        held.task = asyncio.create_task(self._loop(held), name=f"webhook:{hook.id}")
        self.owned[hook.id] = held

    async def _renew(self, held: _Owned, now: datetime) -> None:
        own = held.dispatch.own
        if (own.lease_until - now).total_seconds() > self.lease_s / 2:
            return
        try:
            held.dispatch.own = await self.owners.renew(own, now, self.lease_s)
        except Fenced:
            log.warning("webhook %s: another holder took the topic over; stopping here", held.dispatch.hook.id)
            await self._drop(held.dispatch.hook.id, release=False)

    async def _drop(self, webhook_id: str, *, release: bool) -> None:
        held = self.owned.pop(webhook_id, None)
        if held is None:
            return
        held.stop.set()  # a batch in retries stops (uncommitted); one in its POSTs gets a moment to commit
        if held.task is not None:
            _, pending = await asyncio.wait({held.task}, timeout=STOP_GRACE_S)
            if pending:
                held.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await held.task
        if release:
            await self.owners.release(held.dispatch.own, self.clock())

    async def _loop(self, held: _Owned) -> None:
        """Batches until stopped or fenced; transient store errors back off and retry."""
        dispatch, idle, backoff = held.dispatch, self.poll_s, self.poll_s
        while not held.stop.is_set():
            try:
                done = await dispatch.step()
                backoff = self.poll_s
            except (Fenced, Stopped):
                return
            except CheckpointMoved:
                continue
            except GapInTopic as e:
                log.error("webhook %s: %s; this topic stops", dispatch.hook.id, e)
                return
            except TRANSIENT_ERRORS as e:
                log.warning("webhook %s: store error, retrying in %.1fs: %s", dispatch.hook.id, backoff, e)
                await sleep_or_stop(held.stop, backoff)
                backoff = min(5.0, backoff * 2)
                continue
            if done:
                idle = self.poll_s
            else:
                await sleep_or_stop(held.stop, idle)
                idle = min(self.max_idle_s, idle * 2)
