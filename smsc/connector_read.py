"""The read path of a connector: how much to read (the claim room), reading a batch by position,
deciding before sending and recording the batch's attempt before any submit_sm. Mixed into
`Connector` (smsc/connector.py), whose state it uses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from core.aio import sleep_or_stop, wait_and_clear
from core.domain.message import (
    lane_of_topic,
    state_of_routed,
)
from core.domain.outcomes import (
    Before,
    decide_before_send,
)
from core.store.errors import CheckpointMoved, Fenced, StoreUnavailable
from core.store.lanes import ALL, SHARED, Batch
from core.store.owners import Ownership
from smsc.connector_jobs import Item, Job

log = logging.getLogger(__name__)

# Read no more than the route's TPS lets out in this long. Every batch costs a read, an attempt and a
# commit (about ten store round trips) whatever its size, so a longer horizon is cheaper per message:
# 1 s instead of 0.5 s made the 100k campaign 15 % faster on a saturated store, but a one-time
# password posted during it waited twice as long (p99 2.5 s instead of 1.3 s: the read loop is busy
# with larger bulk reads and attempts when the OTP arrives). Kept at 0.5 s. It also bounds how much
# bulk is attempted ahead, and so still sent after a pause or a cancel.
CLAIM_AHEAD_S = 0.5
MIN_CLAIM_AHEAD = 10
ROOM_WINDOWS = 6  # read-ahead: at most this many windows (and CLAIM_AHEAD_S of the achieved rate)
# Transactional reads may exceed the claim-ahead by this much: an OTP arriving while bulk fills the
# connector is read at once (it still queues behind at most CLAIM_AHEAD_S of bulk to be sent).
TRANSACTIONAL_RESERVE = 20
SMALL_READ_S = 0.05  # a read smaller than half the room waits this long after the previous read
MAX_PENDING_BATCHES = 8  # read ahead of the commits at most this far (a store outage holds them in memory)
URGENT_CHECK_S = 0.05  # while bulk fills the room, the shared lane is still read this often
REROUTE_AFTER_S = 5.0  # no bind for this long: read anyway, so queued messages go back to the router (NOT_SENT)


class ReadPath:
    """Reading, deciding and queueing batches for the send workers."""

    async def _read_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set() and self.owning:
            read = self._next_read(loop.time())
            if read is None:
                await wait_and_clear(self.wake, 0.01 if self._small else 0.05)
                continue
            try:
                got = await read()
            except Fenced:
                self._lose("fenced at attempt", "fenced")
                return
            except (StoreUnavailable, CheckpointMoved) as e:
                log.warning("connector route=%s: read failed, store unavailable: %s", self.route.id, e)
                await sleep_or_stop(stop, 1.0)
                continue
            if not got:
                await wait_and_clear(self.wake, 0.05)

    def _next_read(self, now: float) -> Callable[[], Awaitable[int]] | None:
        """The read to make now, or None to wait (woken by the send workers once enough room is free).

        Every batch costs a read, an attempt and a commit whatever its size: while the last read is
        recent, wait until half the room is free rather than read a handful at a time. Meanwhile the
        shared (transactional) lane is still looked at every URGENT_CHECK_S: a one-time password does
        not wait for campaign traffic to free the room (it is sent first: smsc/send_queue.py)."""
        if self.binds.capacity:
            self._down_since = None
        elif self._down_since is None:
            self._down_since = now
        claim_room = self._claim_room()
        room = claim_room - self.unfinished
        down_long = self._down_since is not None and now - self._down_since >= REROUTE_AFTER_S
        threshold = max(MIN_CLAIM_AHEAD, claim_room // 2)
        self._small = room < threshold and now - self._read_at < SMALL_READ_S
        held = (not self.binds.capacity and not down_long) or now < self.throttled_until \
            or len(self.jobs) >= MAX_PENDING_BATCHES
        if not held and not self._small and room + TRANSACTIONAL_RESERVE > 0:
            self._read_at = now
            return lambda: self._read_batch(room)
        self._wake_below = claim_room - threshold
        if held or not self.binds.capacity or now - self._urgent_at < URGENT_CHECK_S:
            return None
        self._urgent_at = now
        return lambda: self._read_batch(0, scope=SHARED)

    def _claim_room(self) -> int:
        """How many messages may be read and not yet answered: two windows, and no more than the
        route sends in CLAIM_AHEAD_S (at its TPS limit, or at the rate it achieved in the last two
        seconds when the store or the SMSC is slower than that)."""
        room = self.binds.capacity * ROOM_WINDOWS
        if self.route.tps:
            room = min(room, max(1, int(self.route.tps_per_owner * CLAIM_AHEAD_S)))
        horizon = asyncio.get_running_loop().time() - 2.0
        while self._done_at and self._done_at[0] < horizon:
            self._done_at.popleft()
        return min(room, max(MIN_CLAIM_AHEAD, int(len(self._done_at) / 2.0 * CLAIM_AHEAD_S)))

    async def _read_batch(self, room: int, scope: str = ALL) -> int:
        """Read, decide, record the attempt, queue the sends. Returns the entries read."""
        own = self.own
        assert own is not None
        batch = await self.reader.read(min(room + TRANSACTIONAL_RESERVE, self.batch_size), scope,
                                       bulk_limit=max(0, min(room, self.batch_size)))
        if not batch:
            return 0
        try:
            now = self.clock()
            job = await self._prepare(batch, own, now)
            if job.items:
                # One attempt document per batch, BEFORE any submit_sm: a crash from here on leaves
                # an open attempt for the next owner's policy.
                await self.owners.record_attempt(own, batch.ranges, [i.state.message_id for i in job.items], now)
        except BaseException:
            self.reader.rewind(batch.ranges)
            raise
        if not self.owning or self.own is None or self.own.epoch != own.epoch:
            self.reader.rewind(batch.ranges)  # lost meanwhile: this read will not be committed by us
            return 0
        self.stats["batches"] += 1
        self.jobs.append(job)
        job.left = len(job.items)
        if not job.items:
            job.done.set()
        self.unfinished += len(job.items)
        for item in job.items:
            self.queue.put_nowait(item)
        self._commit_wake.set()
        return len(batch.entries)

    async def _prepare(self, batch: Batch, own: Ownership, now: datetime) -> Job:
        """Decide every entry before sending: what to send, and the writes that need no submit."""
        job = Job(batch, own.epoch, [], [])
        released = [e["message_id"] for e in batch.entries if e["type"] != "routed"]
        folded = await self.store.states(released) if released else {}
        book = self.reader.book
        policy = self.route.on_unknown_outcome.value
        seen: set[str] = set()
        for entry in batch.entries:
            mid = entry["message_id"]
            state = state_of_routed(entry) if entry["type"] == "routed" else folded.get(mid)
            if state is None or state.state != "routed" or state.version != entry["seq"] or mid in seen \
                    or state.route_id != self.route.id:
                log.info("connector route=%s: message=%s moved on after entry %s@%d; skipped", self.route.id, mid,
                         entry["topic"], entry["pos"])
                continue
            seen.add(mid)
            lane = lane_of_topic(entry["topic"])
            earlier = self._attempted_before(entry["topic"], entry["pos"])
            expires_at = state.expires_at
            what = decide_before_send(canceling=lane in book.canceling, earlier_attempt=earlier, policy=policy,
                                      expired=expires_at is not None and now >= expires_at,
                                      suspended=state.tenant_id in book.suspended)
            if what in (Before.SEND, Before.SEND_DUPLICATE):
                job.items.append(Item(job, state, duplicate=what == Before.SEND_DUPLICATE))
            else:
                job.writes.append(self._unsent_write(what, state, entry, lane, earlier, now, job))
        return job

    def _attempted_before(self, topic: str, pos: int) -> bool:
        return bool(self.unresolved) and any(start <= pos < end for start, end in self.unresolved.get(topic, ()))

