"""The SMSC connector of one route: reads its send topics by position, sends submit_sm, commits the
outcomes; turns delivery receipts into `delivered|undelivered` + `billed` and MO into `inbound`
(smsc/receipts.py). The decisions are core/domain/outcomes.py's; this module only does I/O.

Ownership (core/store/owners.py): one process at a time owns `connector|send:<route>`. Only while it
owns does it bind (smsc/binds.py) and send; it renews the lease every lease_s/3. On `Fenced`, or when
its lease would run out locally without a renewal, it stops sending at once, drops the batches it has
not committed (never commits them), unbinds and waits as a hot standby, like a process that could not
acquire the key. A graceful stop commits what is in flight and releases the key.

One batch, in this order (commit order = read order, even while batches are pipelined):
1. read: `TopicReader` over the route's lanes (transactional first, bulk limited to CLAIM_AHEAD_S of
   the route's rate, so a one-time password waits behind at most ~0.5 s of bulk);
2. decide before sending (canceling lane, an earlier owner's open attempt, validity passed, suspended
   tenant) and record ONE attempt document for the batch, before any submit_sm;
3. submit through a fixed pool of send workers (one per window slot; no task per message) that keep
   the windows full, honour the TPS bucket and wait out throttling;
4. commit the whole batch in one transaction with the checkpoint moves, fenced by the epoch. A store
   outage keeps the outcomes in memory and retries; nothing is dropped until committed.

A crash between 2 and 4 leaves an open attempt: the next owner applies the route's unknown-outcome
policy to exactly those positions (`resend`: sent again as a possible duplicate; `hold`: `unknown`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.aio import sleep_or_stop, wait_and_clear
from core.domain.encoding import encode_text, make_udh
from core.domain.events import EventType
from core.domain.message import (
    MessageState,
    await_topic,
    event_doc,
    lane_of,
    lane_of_topic,
    route_topic,
    state_of_routed,
)
from core.domain.outcomes import (
    Before,
    SubmitDecision,
    SubmitReport,
    Verdict,
    decide_before_send,
    decide_submit,
    is_throttling,
    sent_expires_at,
)
from core.domain.retry import backoff_s
from core.domain.routing import Route, RouteStatus
from core.store.errors import CheckpointMoved, Fenced, StoreUnavailable
from core.store.eventstore import EventStore
from core.store.lanes import ALL, Batch, LaneBook, TopicReader
from core.store.owners import Owners, Ownership
from core.store.routes import RouteStore
from core.store.timers import HOLD_S, timer_doc
from core.store.topics import Write
from smsc.binds import BindPool
from smsc.inbound import InboundRecorder, ensure_inbound_indexes
from smsc.receipts import PART_HOLD_S, RECEIPT_HOLD_S, ReceiptDesk, side
from smsc.session import DeliverSm, SessionError, SmppSession
from smsc.status import describe, status_name
from smsc.throttle import TokenBucket

log = logging.getLogger(__name__)

__all__ = ["PART_HOLD_S", "RECEIPT_HOLD_S", "Connector"]

CONSUMER = "connector"
FLUSH_S = 0.02
RECEIPT_BATCH = 500
RECEIPT_WAIT_S = 0.1
HEARTBEAT_S = 2.0
THROTTLE_BASE_S = 0.5
THROTTLE_CAP_S = 10.0
PART_THROTTLE_RETRIES = 50  # a part throttled this often in a row is given up (retry, elsewhere if possible)
# Read no more than the route's TPS lets out in this long: a read message waits for its token in read
# order, so a one-time password arriving during a campaign waits behind at most this much bulk.
CLAIM_AHEAD_S = 0.5
MIN_CLAIM_AHEAD = 10
# Transactional reads may exceed the claim-ahead by this much: an OTP arriving while bulk fills the
# connector is read at once (it still queues behind at most CLAIM_AHEAD_S of bulk to be sent).
TRANSACTIONAL_RESERVE = 20
SMALL_READ_S = 0.05  # a read smaller than half the room waits this long after the previous read
MAX_PENDING_BATCHES = 8  # read ahead of the commits at most this far (a store outage holds them in memory)
LEASE_MARGIN = 0.8  # stop sending once this share of the lease has passed since the last renewal began
REROUTE_AFTER_S = 5.0  # no bind for this long: read anyway, so queued messages go back to the router (NOT_SENT)
COMMIT_BACKOFF_CAP_S = 5.0
DRAIN_COMMIT_S = 3.0  # after the grace period, how long a stopping connector still tries to commit
DEFAULT_VALIDITY_S = 48 * 3600


@dataclass(eq=False, slots=True)
class _Item:
    """One message of a batch to send, and what came back."""

    job: _Job
    state: MessageState
    duplicate: bool  # an earlier owner's attempt may have sent it (policy resend)
    smsc_ids: list[str] = field(default_factory=list)
    status: int = 0
    nack: bool = False
    error: str = ""
    maybe_sent: bool = False


@dataclass(eq=False)
class _Job:
    """One batch: read, decided, sent, then committed in read order."""

    batch: Batch
    epoch: int
    writes: list[Write]  # decided before sending (canceled, expired, unknown, suspended timers)
    items: list[_Item]
    left: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def finish_one(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()


class _Lost(Exception):
    """Our ownership ended (fenced, or the lease ran out locally)."""


class Connector:
    def __init__(self, store: EventStore, routes: RouteStore, route: Route, clock: Callable[[], datetime], *,
                 owner: str, lease_s: float = 30.0, batch_size: int = 500, max_attempts: int = 5,
                 default_validity_s: float = DEFAULT_VALIDITY_S) -> None:
        self.store = store
        self.log = store.log
        self.routes = routes
        self.route = route  # the route manager swaps it for routing-only changes
        self.clock = clock
        self.owner = owner  # the holder id of the owner key
        self.key = f"{CONSUMER}|send:{route.id}"
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.max_attempts = max_attempts  # the router dead-letters; kept for the components' wiring
        self.default_validity_s = default_validity_s
        self.owners = Owners(store.db)
        self.reader = TopicReader(self.log, CONSUMER, f"send:{route.id}", LaneBook(store.db))
        self.stats = {"sent": 0, "failed": 0, "retried": 0, "receipts": 0, "orphan_receipts": 0,
                      "possible_duplicates": 0, "throttled": 0, "held_unknown": 0, "generic_nacks": 0,
                      "receipts_intermediate": 0, "receipts_duplicate": 0, "part_receipts_persisted": 0, "mo": 0,
                      "mo_unassigned": 0, "malformed_pdus": 0, "reconnects": 0, "expired": 0, "canceled": 0,
                      "suspended_held": 0, "acquired": 0, "fenced": 0, "lease_lapsed": 0, "batches": 0,
                      "dropped_batches": 0, "receipt_flushes": 0}
        self.wake = asyncio.Event()
        self.binds = BindPool(route, self._on_deliver, self.wake.set)
        self.desk = ReceiptDesk(store, route.id, self.stats)
        self.bucket = TokenBucket(route.tps)
        self.own: Ownership | None = None
        self.owning = False
        self.jobs: collections.deque[_Job] = collections.deque()
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.unfinished = 0  # items read and not yet answered
        self.unresolved: dict[str, list[tuple[int, int]]] = {}  # an earlier owner's open attempts
        self.throttled_until = 0.0
        self.throttle_level = 0
        self.lease_deadline = 0.0
        self.drain_deadline: float | None = None
        self._lost = asyncio.Event()
        self._commit_wake = asyncio.Event()
        self._done_at: collections.deque[float] = collections.deque(maxlen=100_000)  # submit completions
        self._down_since: float | None = None
        self._read_at = float("-inf")
        self._wake_below = 0  # the send workers wake the reader once no more than this many are unanswered

    # ---- compatibility views ------------------------------------------------------------------------

    @property
    def sessions(self) -> list[SmppSession]:
        return self.binds.sessions

    @property
    def held(self) -> dict[str, Any]:
        """Receipts held because they overtook the commit of their `sent`."""
        return self.desk.held

    @property
    def capacity(self) -> int:
        return self.binds.capacity

    @property
    def inbound(self) -> InboundRecorder:
        """The MO recorder (smsc/inbound.py) the receipt desk uses."""
        return self.desk.inbound

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, grace_s: float = 10.0) -> None:
        """Own the route and send until `stop`; a standby while another process owns it."""
        try:
            await side(ensure_inbound_indexes(self.store.db))
        except StoreUnavailable as e:  # MO still works, only slower
            log.warning("connector route=%s: could not create the inbound indexes: %s", self.route.id, e)
        receipts = asyncio.create_task(self._receipt_loop(stop), name=f"receipts-{self.route.id}")
        try:
            while not stop.is_set():
                own = await self._acquire(stop)
                if own is None:
                    break
                await self._serve(own, stop, grace_s)
        finally:
            receipts.cancel()
            await asyncio.gather(receipts, return_exceptions=True)
            log.info("connector route=%s stopped: %s", self.route.id, self.stats)

    async def _acquire(self, stop: asyncio.Event) -> Ownership | None:
        """Take the owner key, waiting as a hot standby while another holder's lease runs."""
        waited = False
        while not stop.is_set():
            started = asyncio.get_running_loop().time()
            try:
                own = await self.owners.acquire(self.key, self.owner, self.clock(), self.lease_s)
            except StoreUnavailable as e:
                log.warning("connector route=%s: cannot reach the store to acquire %s: %s", self.route.id, self.key, e)
                own = None
            if own is not None:
                self.lease_deadline = started + self.lease_s * LEASE_MARGIN
                self.stats["acquired"] += 1
                return own
            if not waited:
                log.info("connector route=%s holder=%s: %s is owned elsewhere; standing by", self.route.id,
                         self.owner, self.key)
                waited = True
            await sleep_or_stop(stop, min(1.0, self.lease_s / 4))
        return None

    async def _serve(self, own: Ownership, stop: asyncio.Event, grace_s: float) -> None:
        """Send while we own; returns on stop (graceful) or when the ownership is lost."""
        self.own, self.owning = own, True
        self._lost = asyncio.Event()
        self.drain_deadline = None
        self.reader.forget_positions()
        try:
            attempts = await self.owners.open_attempts(self.key, {})
        except StoreUnavailable as e:
            log.warning("connector route=%s: cannot read open attempts, giving the key up: %s", self.route.id, e)
            await self.owners.release(own, self.clock())
            await sleep_or_stop(stop, 1.0)
            return
        self.unresolved = {}
        for a in attempts:
            self.unresolved.setdefault(a.topic, []).append((a.start, a.end))
        if attempts:
            log.warning("connector route=%s: %d open attempts of earlier owners (%s); policy %s", self.route.id,
                        len(attempts), ", ".join(f"{a.topic}[{a.start},{a.end})" for a in attempts[:5]),
                        self.route.on_unknown_outcome.value)
        self.binds.open()
        loop = asyncio.get_running_loop()
        self._down_since = loop.time()
        workers = [asyncio.create_task(self._send_worker()) for _ in range(self.route.window * self.route.binds)]
        helpers = [asyncio.create_task(self._renew_loop()), asyncio.create_task(self._heartbeat()),
                   asyncio.create_task(self._commit_loop())]
        try:
            await self._read_loop(stop)
            if self.owning:
                await self._drain(grace_s)
        finally:
            lost = not self.owning or self._lost.is_set()
            self.owning = False
            for t in workers + helpers:
                t.cancel()
            await asyncio.gather(*workers, *helpers, return_exceptions=True)
            self._drop_jobs()
            if not lost:
                await self._final_receipts()
            self.stats["reconnects"] = self.binds.reconnects
            await self.binds.close()
            self.stats["malformed_pdus"] = self.binds.malformed
            await self.desk.forget_unacknowledged()
            self.desk.awaiting_commit.clear()
            if not lost:
                with contextlib.suppress(StoreUnavailable):
                    await side(self.routes.set_status(self.route.id, RouteStatus.DOWN, self.clock(),
                                                      "connector stopped"))
                await self.owners.release(own, self.clock())
            self.own = None

    def _lose(self, why: str, key: str) -> None:
        """Stop sending at once: in-memory batches are dropped, never committed."""
        if self._lost.is_set():
            return
        self.stats[key] += 1
        self.owning = False
        self._lost.set()
        self.wake.set()
        self._commit_wake.set()
        log.warning("connector route=%s holder=%s: ownership of %s lost (%s); dropping %d uncommitted batches and "
                    "standing by", self.route.id, self.owner, self.key, why, len(self.jobs))

    def _drop_jobs(self) -> None:
        if self.jobs:
            self.stats["dropped_batches"] += len(self.jobs)
        for job in self.jobs:
            job.dropped = True
            job.done.set()
        self.jobs.clear()
        while not self.queue.empty():
            self.queue.get_nowait()
        self.unfinished = 0

    async def _drain(self, grace_s: float) -> None:
        """Graceful stop: no more reads; the batches in flight are sent and committed within
        grace_s. Then the binds close: a submit still waiting for its answer gets the unknown-outcome
        policy, a message not sent yet is recorded NOT_SENT (back to the router); a few more seconds
        for those commits, and what is still not committed is left to the next owner (open attempt)."""
        loop = asyncio.get_running_loop()
        self.drain_deadline = loop.time() + grace_s
        self._commit_wake.set()
        while self.jobs and self.owning and loop.time() < self.drain_deadline:
            await wait_and_clear(self._commit_wake, 0.05)
        if self.jobs and self.owning:
            await self.binds.close()
            end = loop.time() + DRAIN_COMMIT_S
            while self.jobs and self.owning and loop.time() < end:
                await wait_and_clear(self._commit_wake, 0.05)
        if self.jobs:
            log.error("connector route=%s: %d batches not committed at shutdown; the next owner finds their "
                      "attempts open and applies policy %s (e.g. message=%s)", self.route.id, len(self.jobs),
                      self.route.on_unknown_outcome.value,
                      next((i.state.message_id for j in self.jobs for i in j.items), None))

    async def _final_receipts(self) -> None:
        for _ in range(3):
            try:
                if self.desk.busy:
                    await self.desk.flush(self.clock())
                return
            except StoreUnavailable as e:
                log.warning("connector route=%s: final receipt flush failed: %s", self.route.id, e)
                await asyncio.sleep(0.2)

    # ---- lease and heartbeat --------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.owning and self.own is not None:
            await asyncio.sleep(min(self.lease_s / 3, max(0.05, self.lease_deadline - loop.time() - 0.05)))
            if loop.time() >= self.lease_deadline:
                self._lose("the lease ran out without a renewal", "lease_lapsed")
                return
            started = loop.time()
            try:
                self.own = await self.owners.renew(self.own, self.clock(), self.lease_s)
                self.lease_deadline = started + self.lease_s * LEASE_MARGIN
            except Fenced:
                self._lose("fenced at renewal", "fenced")
                return
            except StoreUnavailable as e:
                log.warning("connector route=%s: lease renewal failed: %s", self.route.id, e)

    def _may_send(self) -> bool:
        if not self.owning:
            return False
        if asyncio.get_running_loop().time() >= self.lease_deadline:
            self._lose("the lease ran out without a renewal", "lease_lapsed")
            return False
        return True

    async def _heartbeat(self) -> None:
        while self.owning:
            self.stats["reconnects"], self.stats["malformed_pdus"] = self.binds.reconnects, self.binds.malformed
            status, detail = self.binds.status()
            try:
                await side(self.routes.set_status(self.route.id, status, self.clock(), detail))
            except StoreUnavailable as e:
                log.warning("connector route=%s: could not record route status: %s", self.route.id, e)
            await sleep_or_stop(self._lost, HEARTBEAT_S)

    # ---- reading --------------------------------------------------------------------------------

    async def _read_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set() and self.owning:
            if self.binds.capacity:
                self._down_since = None
            elif self._down_since is None:
                self._down_since = loop.time()
            claim_room = self._claim_room()
            room = claim_room - self.unfinished
            down_long = self._down_since is not None and loop.time() - self._down_since >= REROUTE_AFTER_S
            # Every batch costs a read, an attempt and a commit whatever its size: while the last read
            # is recent, wait until half the room is free rather than read a handful at a time.
            threshold = max(MIN_CLAIM_AHEAD, claim_room // 2)
            small = room < threshold and loop.time() - self._read_at < SMALL_READ_S
            if (not self.binds.capacity and not down_long) or room + TRANSACTIONAL_RESERVE <= 0 or small \
                    or loop.time() < self.throttled_until or len(self.jobs) >= MAX_PENDING_BATCHES:
                # Woken by the send workers only once that much room is free, not per message.
                self._wake_below = claim_room - threshold
                await wait_and_clear(self.wake, 0.01 if small else 0.05)
                continue
            self._read_at = loop.time()
            try:
                got = await self._read_batch(room)
            except Fenced:
                self._lose("fenced at attempt", "fenced")
                return
            except (StoreUnavailable, CheckpointMoved) as e:
                log.warning("connector route=%s: read failed, store unavailable: %s", self.route.id, e)
                await sleep_or_stop(stop, 1.0)
                continue
            if not got:
                await wait_and_clear(self.wake, 0.05)

    def _claim_room(self) -> int:
        """How many messages may be read and not yet answered: two windows, and no more than the
        route sends in CLAIM_AHEAD_S (at its TPS limit, or at the rate it achieved in the last two
        seconds when the store or the SMSC is slower than that)."""
        room = self.binds.capacity * 2
        if self.route.tps:
            room = min(room, max(1, int(self.route.tps * CLAIM_AHEAD_S)))
        horizon = asyncio.get_running_loop().time() - 2.0
        while self._done_at and self._done_at[0] < horizon:
            self._done_at.popleft()
        return min(room, max(MIN_CLAIM_AHEAD, int(len(self._done_at) / 2.0 * CLAIM_AHEAD_S)))

    async def _read_batch(self, room: int) -> int:
        """Read, decide, record the attempt, queue the sends. Returns the entries read."""
        own = self.own
        assert own is not None
        batch = await self.reader.read(min(room + TRANSACTIONAL_RESERVE, self.batch_size), ALL,
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

    async def _prepare(self, batch: Batch, own: Ownership, now: datetime) -> _Job:
        """Decide every entry before sending: what to send, and the writes that need no submit."""
        job = _Job(batch, own.epoch, [], [])
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
                job.items.append(_Item(job, state, duplicate=what == Before.SEND_DUPLICATE))
            else:
                job.writes.append(self._unsent_write(what, state, entry, lane, earlier, now, job))
        return job

    def _attempted_before(self, topic: str, pos: int) -> bool:
        return bool(self.unresolved) and any(start <= pos < end for start, end in self.unresolved.get(topic, ()))

    def _unsent_write(self, what: Before, state: MessageState, entry: dict[str, Any], lane: str, earlier: bool,
                      now: datetime, job: _Job) -> Write:
        mid, rid = state.message_id, self.route.id
        if what == Before.CANCEL:
            job.counts["canceled"] += 1
            reason = f"campaign {state.campaign_id} canceled" if state.campaign_id else "lane canceled"
            return Write(mid, [event_doc(state, EventType.CANCELED, now, {"reason": reason, "attempted": earlier})])
        if what == Before.UNKNOWN:
            job.counts["held_unknown"] += 1
            log.warning("connector message=%s tenant=%s route=%s: an earlier owner's attempt (its lease expired "
                        "without an outcome) may have sent it; held for the operator (policy hold)", mid,
                        state.tenant_id, rid)
            return Write(mid, [event_doc(state, EventType.UNKNOWN, now, {
                "route_id": rid, "attempt": state.attempts + 1, "smsc_message_ids": [],
                "reason": "an earlier attempt's lease expired without an outcome (owner taken over)"})])
        if what == Before.EXPIRE:
            job.counts["expired"] += 1
            return Write(mid, [event_doc(state, EventType.EXPIRED, now,
                                         {"reason": "validity passed before it could be sent"})])
        job.counts["suspended_held"] += 1
        log.info("connector message=%s tenant=%s route=%s: tenant suspended, held", mid, state.tenant_id, rid)
        return Write(mid, [], timer=timer_doc(
            message_id=mid, tenant_id=state.tenant_id, topic=entry["topic"], seq=state.version,
            due_at=now + timedelta(seconds=HOLD_S), reason="tenant_suspended", lane=lane,
            campaign_id=state.campaign_id, channel=state.channel))

    # ---- sending --------------------------------------------------------------------------------

    async def _send_worker(self) -> None:
        """One window slot: sends queued messages one after the other, in read order across workers."""
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue.get()
            job = item.job
            if job.dropped:
                continue
            try:
                await self._send(item)
            finally:
                if not job.dropped:
                    self.unfinished -= 1
                    self._done_at.append(loop.time())
                    job.finish_one()
                    if job.done.is_set():
                        self._commit_wake.set()
                    if self.unfinished <= self._wake_below:
                        self.wake.set()

    def _source_ton_npi(self, sender: str) -> tuple[int, int]:
        """TON/NPI of the source address: the route's when set, else derived from the sender
        (alphanumeric 5/0, numeric international 1/1)."""
        numeric = sender.lstrip("+").isdigit()
        ton = self.route.source_ton if self.route.source_ton is not None else (1 if numeric else 5)
        npi = self.route.source_npi if self.route.source_npi is not None else (1 if numeric else 0)
        return ton, npi

    async def _send(self, item: _Item) -> None:
        """Submit every part of one message; the result stays on `item` (nothing is raised)."""
        state = item.state
        job = item.job
        encoded = encode_text(state.text)
        ref = random.randrange(256)
        source_ton, source_npi = self._source_ton_npi(state.sender)
        destination = state.to.lstrip("+")
        try:
            for index, payload in enumerate(encoded.parts, start=1):
                udh = make_udh(ref, encoded.part_count, index) if encoded.part_count > 1 else b""
                for _ in range(PART_THROTTLE_RETRIES + 1):
                    await self._wait_throttle()
                    await self.bucket.take()
                    if job.dropped or not self._may_send():
                        return  # the batch is dropped with our ownership: nothing more is sent
                    if self._past_drain() and not item.smsc_ids:
                        item.error = "connector stopping"
                        return
                    session = self.binds.pick()
                    result = await session.submit(
                        source=state.sender, destination=destination, short_message=udh + payload,
                        data_coding=encoded.data_coding, esm_class=0x40 if udh else 0, source_ton=source_ton,
                        source_npi=source_npi, dest_ton=self.route.dest_ton, dest_npi=self.route.dest_npi)
                    item.status, item.nack = result.status, result.generic_nack
                    if not is_throttling(result.status, result.generic_nack):
                        break
                    # Not taken: wait out the route's pause and submit the same part again.
                    self._throttled(state.message_id, result.status)
                if item.status != 0 or item.nack:
                    if item.nack:
                        self.stats["generic_nacks"] += 1
                        log.warning("connector message=%s route=%s: generic_nack 0x%02x for part %d", state.message_id,
                                    self.route.id, item.status, index)
                    return
                self.throttle_level = 0
                if result.message_id:
                    item.smsc_ids.append(result.message_id)
                    self.desk.awaiting_commit.add(result.message_id)
        except (SessionError, OSError) as e:
            item.error, item.maybe_sent = f"{type(e).__name__}: {e}", True
        except LookupError as e:  # no bind was up: nothing left this process
            item.error = str(e)

    def _past_drain(self) -> bool:
        return self.drain_deadline is not None and asyncio.get_running_loop().time() > self.drain_deadline

    def _throttle_left(self) -> float:
        return self.throttled_until - asyncio.get_running_loop().time()

    async def _wait_throttle(self) -> None:
        while (left := self._throttle_left()) > 0:
            await asyncio.sleep(left)

    def _throttled(self, message_id: str, status: int) -> None:
        """The SMSC asked us to slow down: pause the whole route, longer each time in a row."""
        self.stats["throttled"] += 1
        self.throttle_level = min(self.throttle_level + 1, 8)
        delay = backoff_s(self.throttle_level, base_s=THROTTLE_BASE_S, cap_s=THROTTLE_CAP_S)
        loop = asyncio.get_running_loop()
        if loop.time() + delay > self.throttled_until:
            self.throttled_until = loop.time() + delay
            log.warning("connector route=%s: %s (message=%s); route paused %.1fs", self.route.id,
                        status_name(status), message_id, delay)

    # ---- committing -----------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Commit finished batches strictly in read order (the checkpoint moves require it)."""
        while self.owning:
            if not self.jobs or not self.jobs[0].done.is_set():
                await wait_and_clear(self._commit_wake, 0.05)
                continue
            job = self.jobs[0]
            now = self.clock()
            writes = job.writes + [self._outcome_write(item, now, job) for item in job.items]
            if not await self._commit(job, writes):
                return
            if self.jobs and self.jobs[0] is job:
                self.jobs.popleft()
            for key, n in job.counts.items():
                self.stats[key] += n
            for item in job.items:
                self.desk.awaiting_commit.difference_update(item.smsc_ids)
            self._commit_wake.set()
            self.wake.set()

    async def _commit(self, job: _Job, writes: list[Write]) -> bool:
        """One transaction for the whole batch, fenced by our epoch; store errors are retried with
        back-off for as long as we own (the outcomes stay in memory). False once we lost the key."""
        assert self.own is not None
        fence = (self.key, job.epoch)
        delay = FLUSH_S
        while self.owning and not job.dropped:
            try:
                result = await self.log.commit(writes, moves=job.batch.moves, fence=fence, redecide=self._moved_on)
            except Fenced:
                self._lose("fenced at commit", "fenced")
                return False
            except CheckpointMoved as e:
                # Only an owner moves these checkpoints: someone else owns the topic now.
                self._lose(f"checkpoints moved under us: {e.checkpoints[:3]}", "fenced")
                return False
            except StoreUnavailable as e:
                delay = min(COMMIT_BACKOFF_CAP_S, delay * 2)
                log.warning("connector route=%s: store unavailable, keeping %d batches (%d messages) in memory; "
                            "retry in %.1fs: %s", self.route.id, len(self.jobs),
                            sum(len(j.items) + len(j.writes) for j in self.jobs), delay, e)
                await sleep_or_stop(self._lost, delay)
                continue
            if result.conflicts:
                log.warning("connector route=%s: %d messages moved on meanwhile (e.g. message=%s)", self.route.id,
                            len(result.conflicts), result.conflicts[0])
            return True
        return False

    @staticmethod
    async def _moved_on(ids: list[str]) -> list[Write]:
        """Messages whose next seq was taken meanwhile (an operator): whoever appended it owns what
        comes next; dropped from the batch."""
        return []

    def _outcome_write(self, item: _Item, now: datetime, job: _Job) -> Write:
        s = item.state
        rid = self.route.id
        report = SubmitReport(tuple(item.smsc_ids), item.status, item.nack, item.error, item.maybe_sent)
        # An earlier owner's attempt counts: this resend is the message's next attempt after it.
        attempt = s.attempts + (2 if item.duplicate else 1)
        d = decide_submit(report, policy=self.route.on_unknown_outcome.value, attempt=attempt, names=_names)
        ids = f"message={s.message_id} tenant={s.tenant_id} route={rid}"
        if d.verdict == Verdict.SENT:
            data: dict[str, Any] = {
                "route_id": rid, "smsc_message_ids": list(item.smsc_ids), "attempt": attempt,
                "parts": len(item.smsc_ids), "price_per_part": s.price_per_part, "currency": s.currency,
                "expires_at": sent_expires_at(s.expires_at, now, self.default_validity_s)}
            if item.duplicate:
                data["possible_duplicate"] = True
                job.counts["possible_duplicates"] += 1
            job.counts["sent"] += 1
            return Write(s.message_id, [event_doc(s, EventType.SENT, now, data)], [await_topic(rid)])
        if d.verdict == Verdict.RETRY:
            return self._retry_write(s, d, item, attempt, now, job, ids)
        if d.verdict == Verdict.UNKNOWN:
            job.counts["held_unknown"] += 1
            log.warning("connector %s: outcome unknown, held for the operator (policy hold): %s", ids, d.reason)
            return Write(s.message_id, [event_doc(s, EventType.UNKNOWN, now, {
                "route_id": rid, "attempt": attempt, "reason": d.reason, "smsc_message_ids": list(item.smsc_ids)})])
        job.counts["failed"] += 1
        log.info("connector %s: failed permanently: %s", ids, d.error_name)
        return Write(s.message_id, [event_doc(s, EventType.FAILED, now, {
            "route_id": rid, "attempt": attempt, "error_code": d.error_code, "error_name": d.error_name,
            "reason": d.reason})])

    def _retry_write(self, s: MessageState, d: SubmitDecision, item: _Item, attempt: int, now: datetime, job: _Job,
                     ids: str) -> Write:
        """`retry` and its timer back into the router's topic of the message's lane."""
        next_at = now + timedelta(seconds=d.retry_in_s)
        data: dict[str, Any] = {"route_id": self.route.id, "attempt": attempt, "error_code": d.error_code,
                                "error_name": d.error_name, "reason": d.reason, "next_at": next_at,
                                "exclude_route": d.exclude_route, "smsc_message_ids": list(item.smsc_ids)}
        if d.possible_duplicate or item.duplicate:
            # The submit may have reached the SMSC: whatever is sent next may be a duplicate.
            data["possible_duplicate"] = True
            job.counts["possible_duplicates"] += 1
        job.counts["retried"] += 1
        log.info("connector %s: retry at %s: %s", ids, next_at.isoformat(), d.reason)
        doc = event_doc(s, EventType.RETRY, now, data)
        lane = lane_of(s)
        return Write(s.message_id, [doc], timer=timer_doc(
            message_id=s.message_id, tenant_id=s.tenant_id, topic=route_topic(lane), seq=doc["seq"], due_at=next_at,
            reason="retry", lane=lane, campaign_id=s.campaign_id, channel=s.channel))

    # ---- receipts and MO ------------------------------------------------------------------------

    def _on_deliver(self, pdu: DeliverSm, session: SmppSession) -> None:
        self.desk.add(pdu, session)

    async def _receipt_loop(self, stop: asyncio.Event) -> None:
        """Flush the receipts when they stop coming (the SMSC's deliver window may be full: it waits
        for our acknowledgements), or when RECEIPT_BATCH of them or RECEIPT_WAIT_S have piled up. One
        flush costs one query and one commit, whatever its size."""
        loop = asyncio.get_running_loop()
        backoff = FLUSH_S
        seen, since = 0, loop.time()
        while not stop.is_set():
            await asyncio.sleep(backoff)
            if not self.desk.busy:
                seen, since = 0, loop.time()
                continue
            n = len(self.desk.fresh)
            if n > 0 and n != seen and n < RECEIPT_BATCH and loop.time() - since < RECEIPT_WAIT_S:
                seen = n  # still coming in: let the batch grow
                continue
            try:
                await self.desk.flush(self.clock())
                self.stats["receipt_flushes"] += 1
                seen, since = 0, loop.time()
                backoff = FLUSH_S
            except StoreUnavailable as e:
                backoff = min(COMMIT_BACKOFF_CAP_S, backoff * 2)
                log.warning("connector route=%s: store unavailable, keeping %d receipts in memory; retry in %.1fs: %s",
                            self.route.id, len(self.desk.fresh), backoff, e)


def _names(status: int) -> tuple[str, str]:
    return status_name(status), describe(status)
