"""The webhook fan-out: follows the change stream on `events` and, per batch, writes ONE job per
endpoint holding the batch's events that endpoint wants, in the transaction that also moves its
resume token (core/store/webhook_queue.py): a crash re-reads from the old token and writes nothing
twice. Only tenants with an enabled registration cost anything beyond reading the stream; the
registrations are cached and read again every `refresh_s`.

While no tenant has an enabled registration the fan-out holds no change stream at all (a stream costs
the store a read of every event: about a tenth of the embedded server's time in the end-to-end
benchmark); it polls the registrations. When the first one appears it resumes from its stored token
(or, the first time ever, from the earliest registration's creation), and an endpoint only gets the
events at or after its own creation, however far back the stream resumes.

One process fans out at a time (owner `webhook-fanout|events`, with a lease); others stand by.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from core import metrics
from core.aio import sleep_or_stop
from core.domain.webhooks import body_bytes, payload, wants
from core.store.change_feed import ChangeFeed, cluster_time_at, token_from_json, token_to_json
from core.store.database import TRANSIENT_ERRORS
from core.store.errors import CheckpointMoved, Fenced, HistoryLost
from core.store.owners import Owners, Ownership
from core.store.webhook_queue import NewJob, WebhookQueue
from core.store.webhooks import Webhook, WebhookStore

log = logging.getLogger(__name__)

OWNER = "webhook-fanout|events"
MAX_BATCH_BYTES = 4 * 1024 * 1024  # JSON bytes of the event copies of one fan-out commit


class FanOut:
    def __init__(self, feed: ChangeFeed, store: WebhookStore, queue: WebhookQueue, owners: Owners,
                 clock: Callable[[], datetime], holder: str, *, max_events: int = 2000, flush_s: float = 0.5,
                 refresh_s: float = 2.0, idle_token_s: float = 5.0, lease_s: float = 30.0) -> None:
        self.feed, self.store, self.queue, self.owners, self.clock = feed, store, queue, owners, clock
        self.holder, self.max_events, self.flush_s = holder, max_events, flush_s
        self.refresh_s, self.idle_token_s, self.lease_s = refresh_s, idle_token_s, lease_s
        self.hooks: dict[str, list[Webhook]] = {}  # tenant -> its enabled registrations
        self._refreshed = float("-inf")
        self._own: Ownership | None = None
        self.following = False  # a change stream is open (only while some registration is enabled)
        self.stats = {"commits": 0, "jobs": 0, "events": 0, "docs": 0}

    async def run(self, stop: asyncio.Event) -> None:
        """Fan out until `stop` (standing by while another process holds the fan-out)."""
        while not stop.is_set():
            try:
                self._own = await self.owners.acquire(OWNER, self.holder, self.clock(), self.lease_s)
                if self._own is None:
                    await sleep_or_stop(stop, self.lease_s / 3)
                    continue
                await self._follow(stop)
            except (CheckpointMoved, Fenced) as e:
                log.warning("webhook fan-out: %s; reading again from the stored token", e)
            except HistoryLost as e:
                # Events between the stored token and now will not be fanned out: say so, loudly.
                log.error("webhook fan-out: resume token no longer in the oplog (%s); following from now, "
                          "events since the last commit get no webhook (replay them per endpoint)", e)
                await self._reset_token()
            except TRANSIENT_ERRORS as e:
                log.warning("webhook fan-out: store unavailable, retrying in 1 s: %s", e)
                await sleep_or_stop(stop, 1.0)
        if self._own is not None:
            await self.owners.release(self._own, self.clock())

    async def _wait_for_registrations(self, stop: asyncio.Event) -> bool:
        """Poll the registrations (renewing the lease) until one is enabled; False if stopped first."""
        await self._maintain()
        while not self.hooks:
            await sleep_or_stop(stop, self.refresh_s)
            if stop.is_set():
                return False
            await self._maintain()
        return True

    async def _follow(self, stop: asyncio.Event) -> None:
        if not await self._wait_for_registrations(stop):
            return
        token, version = await self.queue.fanout_token()
        resume = token_from_json(token) if token else None
        start_at = None
        if resume is None:
            first = min(h.created_at for hooks in self.hooks.values() for h in hooks)
            start_at = min(await self.feed.cluster_time_now(), cluster_time_at(first))
        stream = await self.feed.open(resume_token=resume, cluster_time=start_at, batch_size=self.max_events,
                                      max_await_ms=100)
        pending: dict[str, NewJob] = {}
        count, size, first_at, last_token = 0, 0, 0.0, None
        last_write = float("-inf") if token is None else time.monotonic()
        committed: Mapping[str, Any] | None = resume
        self.following = True
        async with stream:
            while not stop.is_set():
                await self._maintain()
                if not self.hooks and count == 0 and stream.buffered() == 0:
                    break  # nobody listens any more: stop reading the stream (after its token is kept)
                change = await stream.try_next()
                if change is not None:
                    last_token = change["_id"]
                    added = self._route(change["fullDocument"], pending)
                    if added and not count:
                        first_at = time.monotonic()
                    count, size = count + (added > 0), size + added
                now_m = time.monotonic()
                # Bounded by events and bytes: a job (and the transaction) stays far below 16 MB.
                due = count >= self.max_events or size >= MAX_BATCH_BYTES or (
                    count > 0 and now_m - first_at >= self.flush_s)
                idle = (change is None and count == 0 and stream.buffered() == 0
                        and now_m - last_write >= self.idle_token_s)
                if not (due or idle):
                    continue
                at = last_token if count else stream.resume_token
                if at is None or (not count and at == committed):
                    last_write = now_m
                    continue
                await self._commit(list(pending.values()), at, version)
                version += 1
                pending, count, size, last_write, committed = {}, 0, 0, now_m, at
        self.following = False
        if not stop.is_set() and stream.resume_token is not None and stream.resume_token != committed:
            await self._commit([], stream.resume_token, version)

    def _route(self, doc: Mapping[str, Any], pending: dict[str, NewJob]) -> int:
        """Add the event to the jobs of the endpoints that want it; returns the bytes added (0: none)."""
        item: dict[str, Any] | None = None
        size = added = 0
        for hook in self.hooks.get(doc.get("tenant_id") or "", ()):
            if wants(hook.events, doc["type"]) and doc["at"] >= hook.created_at:
                if item is None:
                    item = payload(doc)
                    size = len(body_bytes(item))
                pending.setdefault(hook.id, NewJob(hook.id, hook.tenant_id, [])).events.append(item)
                added += size
        return added

    async def _commit(self, jobs: list[NewJob], token: Mapping[str, Any], version: int) -> None:
        written = await self.queue.commit_fanout(jobs, token_to_json(token), version, self.clock())
        events = sum(len(j.events) for j in jobs)
        self.stats["commits"] += 1
        self.stats["jobs"] += len(jobs)
        self.stats["events"] += events
        self.stats["docs"] += written
        metrics.WEBHOOK_FANOUT_EVENTS.inc(events)
        if jobs:
            log.debug("webhook fan-out: %d event(s) into %d job(s)", events, len(jobs))

    async def _maintain(self) -> None:
        """Registrations read again and the lease renewed, every `refresh_s`."""
        if time.monotonic() - self._refreshed < self.refresh_s:
            return
        self._refreshed = time.monotonic()
        hooks: dict[str, list[Webhook]] = {}
        for h in await self.store.enabled_all():
            hooks.setdefault(h.tenant_id, []).append(h)
        self.hooks = hooks
        assert self._own is not None
        self._own = await self.owners.renew(self._own, self.clock(), self.lease_s)

    def refresh_now(self) -> None:
        """Read the registrations at the next step (tests, after registering an endpoint)."""
        self._refreshed = float("-inf")

    async def _reset_token(self) -> None:
        _, version = await self.queue.fanout_token()
        stream = await self.feed.open(resume_token=None, cluster_time=await self.feed.cluster_time_now(),
                                      batch_size=1, max_await_ms=10)
        async with stream:
            await stream.try_next()
            token = stream.resume_token
        if token is not None:
            await self.queue.commit_fanout([], token_to_json(token), version, self.clock())
