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
   the route's rate; a one-time password read meanwhile is sent first, smsc/send_queue.py);
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
from collections.abc import Callable
from datetime import datetime
from typing import Any

from core.aio import sleep_or_stop, wait_and_clear
from core.domain.message import send_stage
from core.domain.routing import Route, RouteStatus
from core.store.errors import CheckpointMoved, Fenced, StoreUnavailable
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook, TopicReader
from core.store.owners import Owners, Ownership
from core.store.routes import RouteStore
from core.store.topics import CommitResult, Write
from core.workers.lease import acquire_or_stand_by, renew, unresolved_ranges
from smsc.binds import BindPool
from smsc.connector_jobs import Item, Job, OutcomeWrites
from smsc.connector_metrics import RouteMetrics
from smsc.connector_read import CLAIM_AHEAD_S, MIN_CLAIM_AHEAD, TRANSACTIONAL_RESERVE, ReadPath
from smsc.connector_send import SendPath
from smsc.inbound import InboundRecorder, ensure_inbound_indexes
from smsc.receipt_loop import final_receipts, receipt_loop
from smsc.receipts import PART_HOLD_S, RECEIPT_HOLD_S, ReceiptDesk, side
from smsc.send_queue import SendQueue
from smsc.session import DeliverSm, SmppSession
from smsc.throttle import TokenBucket

log = logging.getLogger(__name__)

__all__ = ["CLAIM_AHEAD_S", "MIN_CLAIM_AHEAD", "PART_HOLD_S", "RECEIPT_HOLD_S", "TRANSACTIONAL_RESERVE", "Connector"]

CONSUMER = "connector"
FLUSH_S = 0.02
HEARTBEAT_S = 2.0
COMMIT_BACKOFF_CAP_S = 5.0
DRAIN_COMMIT_S = 3.0  # after the grace period, how long a stopping connector still tries to commit
DEFAULT_VALIDITY_S = 48 * 3600


class Connector(ReadPath, SendPath, OutcomeWrites):
    def __init__(self, store: EventStore, routes: RouteStore, route: Route, clock: Callable[[], datetime], *,
                 owner: str, lease_s: float = 30.0, batch_size: int = 500, max_attempts: int = 5,
                 default_validity_s: float = DEFAULT_VALIDITY_S, partition: int | None = None) -> None:
        """`partition`: of a partitioned route (route.partitions > 1), the one this connector owns and
        sends; it reads only that partition's topics, and takes its share of the route's TPS."""
        self.store = store
        self.log = store.log
        self.routes = routes
        self.route = route  # the route manager swaps it for routing-only changes
        self.clock = clock
        self.owner = owner  # the holder id of the owner key
        self.partition = partition
        self.key = f"{CONSUMER}|{send_stage(route.id, partition)}"
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.max_attempts = max_attempts  # the router dead-letters; kept for the components' wiring
        self.default_validity_s = default_validity_s
        self.owners = Owners(store.db)
        self.reader = TopicReader(self.log, CONSUMER, send_stage(route.id, partition), LaneBook(store.db))
        self.stats = {"sent": 0, "failed": 0, "retried": 0, "receipts": 0, "orphan_receipts": 0,
                      "possible_duplicates": 0, "throttled": 0, "held_unknown": 0, "generic_nacks": 0,
                      "receipts_intermediate": 0, "receipts_duplicate": 0, "part_receipts_persisted": 0, "mo": 0,
                      "mo_unassigned": 0, "malformed_pdus": 0, "reconnects": 0, "expired": 0, "canceled": 0,
                      "suspended_held": 0, "acquired": 0, "fenced": 0, "lease_lapsed": 0, "batches": 0,
                      "dropped_batches": 0, "receipt_flushes": 0}
        self.wake = asyncio.Event()
        self.binds = BindPool(route, self._on_deliver, self.wake.set)
        self.desk = ReceiptDesk(store, route.id, self.stats)
        self.meters = RouteMetrics(route.id)  # Prometheus (core/metrics.py)
        self.bucket = TokenBucket(route.tps_per_owner)
        self.own: Ownership | None = None
        self.owning = False
        self.jobs: collections.deque[Job] = collections.deque()
        self.queue: asyncio.Queue[Item] = SendQueue()  # transactional first (smsc/send_queue.py)
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
        self._urgent_at = float("-inf")  # the last look at the shared lane while the room was full
        self._small = False  # the last read decision waited for room (connector_read.py)
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
        receipts = asyncio.create_task(receipt_loop(self.desk, stop, self.clock), name=f"receipts-{self.route.id}")
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
        got = await acquire_or_stand_by(self.owners, self.key, self.owner, self.clock, self.lease_s, stop,
                                        f"connector route={self.route.id}")
        if got is None:
            return None
        self.stats["acquired"] += 1
        own, self.lease_deadline = got
        return own

    async def _serve(self, own: Ownership, stop: asyncio.Event, grace_s: float) -> None:
        """Send while we own; returns on stop (graceful) or when the ownership is lost."""
        self.own, self.owning = own, True
        self._lost = asyncio.Event()
        self.drain_deadline = None
        self.reader.forget_positions()
        unresolved = await unresolved_ranges(self.owners, own, self.clock, stop, f"connector route={self.route.id}",
                                             self.route.on_unknown_outcome.value)
        if unresolved is None:
            return
        self.unresolved = unresolved
        self.binds.open()
        self.meters.owning(self.route, self.binds.in_flight)
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
            self.meters.standby()
            for t in workers + helpers:
                t.cancel()
            await asyncio.gather(*workers, *helpers, return_exceptions=True)
            await self._wind_down(own, lost)

    async def _wind_down(self, own: Ownership, lost: bool) -> None:
        """After serving: drop what was not committed, unbind, and (unless the ownership was lost)
        record the last receipts, mark the route DOWN and release the owner key."""
        self._drop_jobs()
        if not lost:
            await final_receipts(self.desk, self.clock)
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

    # ---- lease and heartbeat --------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.owning and self.own is not None:
            await asyncio.sleep(min(self.lease_s / 3, max(0.05, self.lease_deadline - loop.time() - 0.05)))
            if loop.time() >= self.lease_deadline:
                self._lose("the lease ran out without a renewal", "lease_lapsed")
                return
            try:
                self.own, self.lease_deadline = await renew(self.owners, self.own, self.clock, self.lease_s)
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
            self.meters.flush()
            status, detail = self.binds.status()
            try:
                await side(self.routes.set_status(self.route.id, status, self.clock(), detail))
            except StoreUnavailable as e:
                log.warning("connector route=%s: could not record route status: %s", self.route.id, e)
            await sleep_or_stop(self._lost, HEARTBEAT_S)

    # ---- committing -----------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        """Commit finished batches strictly in read order (the checkpoint moves require it)."""
        while self.owning:
            if not self.jobs or not self.jobs[0].done.is_set():
                await wait_and_clear(self._commit_wake, 0.05)
                continue
            job = self.jobs[0]
            now, now_loop = self.clock(), asyncio.get_running_loop().time()  # the same instant, for metrics
            writes = job.writes + [self._outcome_write(item, now, job) for item in job.items]
            result = await self._commit(job, writes)
            if result is None:
                return
            if self.jobs and self.jobs[0] is job:
                self.jobs.popleft()
            for key, n in job.counts.items():
                self.stats[key] += n
            self.meters.committed(job, len(result.conflicts), now, now_loop)
            committed = set(result.committed)
            for w in writes:  # receipts of these match in memory, without a query
                if w.events and w.events[0]["type"] == "sent" and w.message_id in committed:
                    self.desk.remember_sent(w.events[0])
            for item in job.items:
                self.desk.awaiting_commit.difference_update(item.smsc_ids)
            self._commit_wake.set()
            self.wake.set()

    async def _commit(self, job: Job, writes: list[Write]) -> CommitResult | None:
        """One transaction for the whole batch, fenced by our epoch; store errors are retried with
        back-off for as long as we own (the outcomes stay in memory). None once we lost the key."""
        assert self.own is not None
        fence = (self.key, job.epoch)
        delay = FLUSH_S
        while self.owning and not job.dropped:
            try:
                result = await self.log.commit(writes, moves=job.batch.moves, fence=fence, redecide=self._moved_on)
            except Fenced:
                self._lose("fenced at commit", "fenced")
                return None
            except CheckpointMoved as e:
                # Only an owner moves these checkpoints: someone else owns the topic now.
                self._lose(f"checkpoints moved under us: {e.checkpoints[:3]}", "fenced")
                return None
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
            return result
        return None

    @staticmethod
    async def _moved_on(ids: list[str]) -> list[Write]:
        """Messages whose next seq was taken meanwhile (an operator): whoever appended it owns what
        comes next; dropped from the batch."""
        return []

    # ---- receipts and MO ------------------------------------------------------------------------

    def _on_deliver(self, pdu: DeliverSm, session: SmppSession) -> None:
        self.desk.add(pdu, session)
