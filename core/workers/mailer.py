"""The e-mail sender of one route (kind `smtp` or `http`): the SMPP connector's shape, simpler.

Ownership (core/store/owners.py): one process at a time owns `connector|send:<route>` (the send
stage's consumer is "connector" whatever the channel, so the router's backpressure and the route
drain check read the same checkpoints). It renews the lease every lease_s/3; once fenced, or once
its lease would run out locally, it stops sending, drops the batch it has not committed and stands by.

One batch, in this order:
1. read [checkpoint, checkpoint + N) of the route's send topics (TopicReader: lanes, fairness);
2. decide before sending (canceling lane, an earlier owner's open attempt under the route's
   unknown-outcome policy, validity passed, suspended tenant) and record ONE attempt document for
   the batch, before any provider call;
3. send through the route's pool (core/workers/mailer_transport.py), each call asked of the route's
   circuit breaker first (core/domain/circuit_breaker.py): an open breaker sends nothing and the
   e-mail is retried on another route (`CIRCUIT_OPEN`), a route failure counts against it;
4. commit the outcomes (`sent` + `billed`, `retry` + timer, `failed`, `unknown`) with the checkpoint
   moves and the tenants' spend, in one transaction fenced by the epoch. A store outage keeps the
   outcomes in memory and retries the commit while we own.

Batches overlap: while batch N is sent, batch N+1 is read and decided (its attempt is recorded
only once N's sending is over, just before N+1's own: a batch read ahead and dropped at a stop was
not attempted, and is simply read again), and batch N-1 commits; N's commit starts once N-1's is
done, so commits follow read order. The reader keeps its positions ahead of the checkpoints, and the
messages of batches not yet committed are skipped by the next read (core/workers/mailer_batch.py).
A fence found by a commit stops the sending under way at once; that batch's open attempt is then
the next owner's to decide, as after a crash.

The breaker's state is the route's status for routing (open: DOWN, half-open: BUSY, closed: UP),
written at each transition and every HEARTBEAT_S; each transition is logged and named in the events
of the e-mails it concerns (`breaker` in `sent`, `retry`, `failed`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Callable
from datetime import datetime

from core.aio import sleep_or_stop
from core.domain.circuit_breaker import BreakerState, CircuitBreaker, Transition
from core.domain.email import MailResult, circuit_open_decision, decide_mail
from core.domain.email_mime import build_mime
from core.domain.message import send_stage
from core.domain.routing import Route, RouteStatus
from core.store.database import TRANSIENT_ERRORS
from core.store.email_events import PROVIDER_IDS, provider_id_inserts
from core.store.errors import CheckpointMoved, Fenced, StoreUnavailable
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook, TopicReader
from core.store.owners import Owners, Ownership
from core.store.routes import SEND_CONSUMER, RouteStore
from core.store.topics import Write, spend_updates
from core.workers.lease import acquire_or_stand_by, renew, unresolved_ranges
from core.workers.mailer_batch import Prepared, decide_batch
from core.workers.mailer_transport import Transport, transport_for
from core.workers.mailer_writes import MailItem, billed_amounts, outcome_write

log = logging.getLogger(__name__)

CONSUMER = SEND_CONSUMER
HEARTBEAT_S = 2.0
POLL_S = 0.05
COMMIT_BACKOFF_CAP_S = 5.0
BREAKER_STATUS = {BreakerState.CLOSED: RouteStatus.UP, BreakerState.HALF_OPEN: RouteStatus.BUSY,
                  BreakerState.OPEN: RouteStatus.DOWN}


class Mailer:
    def __init__(self, store: EventStore, routes: RouteStore, route: Route, clock: Callable[[], datetime], *,
                 owner: str, lease_s: float = 30.0, batch_size: int = 100,
                 transport: Callable[[Route], Transport] = transport_for, rng: random.Random | None = None) -> None:
        self.store = store
        self.log = store.log
        self.routes = routes
        self.route = route
        self.clock = clock
        self.owner = owner  # the holder id of the owner key
        self.key = f"{CONSUMER}|{send_stage(route.id)}"
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.make_transport = transport
        self.rng = rng or random.Random()
        self.owners = Owners(store.db)
        self.reader = TopicReader(self.log, CONSUMER, send_stage(route.id), LaneBook(store.db))
        self.breaker = CircuitBreaker(route.id, route.breaker)
        self.transitions: list[Transition] = []
        self.stats: collections.Counter[str] = collections.Counter()
        self.own: Ownership | None = None
        self.lost = asyncio.Event()
        self.unresolved: dict[str, list[tuple[int, int]]] = {}
        self.lease_deadline = 0.0
        self.pending: asyncio.Task[None] | None = None  # the previous batch's commit
        self.busy: set[str] = set()  # messages of batches read and not yet committed
        self._status_at = float("-inf")
        self._status_due = True

    @property
    def provider(self) -> str:
        return self.route.provider or self.route.kind

    # ---- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Own the route and send until `stop`; a hot standby while another process owns it."""
        while not stop.is_set():
            own = await self._acquire(stop)
            if own is None:
                break
            await self._serve(own, stop)
        log.info("mailer route=%s stopped: %s", self.route.id, dict(self.stats))

    async def _acquire(self, stop: asyncio.Event) -> Ownership | None:
        got = await acquire_or_stand_by(self.owners, self.key, self.owner, self.clock, self.lease_s, stop,
                                        f"mailer route={self.route.id}")
        if got is None:
            return None
        own, self.lease_deadline = got
        return own

    async def _serve(self, own: Ownership, stop: asyncio.Event) -> None:
        self.own, self.lost = own, asyncio.Event()
        self.reader.forget_positions()
        self.busy = set()
        unresolved = await unresolved_ranges(self.owners, own, self.clock, stop, f"mailer route={self.route.id}",
                                             self.route.on_unknown_outcome.value)
        if unresolved is None:
            return
        self.unresolved = unresolved
        transport = self.make_transport(self.route)
        renew = asyncio.create_task(self._renew_loop())
        log.info("mailer route=%s holder=%s: owning %s (epoch %d), %s to %s:%d, pool %d", self.route.id, self.owner,
                 self.key, own.epoch, self.provider, self.route.host, self.route.port, self.route.pool)
        try:
            await self._loop(transport, stop)
        finally:
            renew.cancel()
            await asyncio.gather(renew, return_exceptions=True)
            await transport.close()
            if not self.lost.is_set():
                with contextlib.suppress(StoreUnavailable):
                    await self._set_status(RouteStatus.DOWN, "mailer stopped")
                await self.owners.release(own, self.clock())
            self.own = None

    async def _loop(self, transport: Transport, stop: asyncio.Event) -> None:
        ahead: asyncio.Task[Prepared | None] | None = None  # the next batch, read while this one sends
        try:
            while not stop.is_set() and not self.lost.is_set():
                await self._heartbeat()
                try:
                    reading, ahead = ahead, None
                    job = await (reading if reading is not None else self._read())
                    if job is None:
                        await self._settle()
                        await sleep_or_stop(stop, POLL_S)
                        continue
                    await self._attempt(job)
                    ahead = asyncio.create_task(self._read(), name=f"mailer-read-{self.route.id}")
                    await self._send_and_commit(job, transport)
                except (Fenced, CheckpointMoved) as e:
                    self._lose(f"fenced: {e}")
                    return
                except StoreUnavailable as e:
                    log.warning("mailer route=%s: store unavailable: %s", self.route.id, e)
                    await sleep_or_stop(stop, 1.0)
        finally:
            await self._drop(ahead)
            with contextlib.suppress(Fenced, CheckpointMoved):
                await self._settle()

    async def _settle(self) -> None:
        """Wait for the previous batch's commit (it retries store outages itself while we own)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            await pending

    async def _drop(self, ahead: asyncio.Task[Prepared | None] | None) -> None:
        """A batch read ahead and not attempted: nothing of it was sent, so it is just read again."""
        if ahead is None:
            return
        ahead.cancel()
        with contextlib.suppress(asyncio.CancelledError, StoreUnavailable, Fenced, CheckpointMoved):
            job = await ahead
            if job is not None:
                self._forget(job)

    def _lose(self, why: str) -> None:
        if not self.lost.is_set():
            self.stats["lost"] += 1
            self.lost.set()
            log.warning("mailer route=%s holder=%s: ownership of %s lost (%s); standing by", self.route.id,
                        self.owner, self.key, why)

    async def _renew_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.lost.is_set() and self.own is not None:
            await asyncio.sleep(self.lease_s / 3)
            if loop.time() >= self.lease_deadline:
                self._lose("the lease ran out without a renewal")
                return
            try:
                self.own, self.lease_deadline = await renew(self.owners, self.own, self.clock, self.lease_s)
            except Fenced:
                self._lose("fenced at renewal")
                return
            except StoreUnavailable as e:
                log.warning("mailer route=%s: lease renewal failed: %s", self.route.id, e)

    def _may_send(self) -> bool:
        if self.lost.is_set():
            return False
        if asyncio.get_running_loop().time() >= self.lease_deadline:
            self._lose("the lease ran out without a renewal")
            return False
        return True

    # ---- status and breaker -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        if not self._status_due and loop.time() - self._status_at < HEARTBEAT_S:
            return
        state = self.breaker.state_at(self.clock())
        try:
            await self._set_status(BREAKER_STATUS[state], f"breaker {state.value}")
        except StoreUnavailable as e:
            log.warning("mailer route=%s: could not record the route's status: %s", self.route.id, e)
            return
        self._status_at, self._status_due = loop.time(), False

    async def _set_status(self, status: RouteStatus, detail: str) -> None:
        try:
            await self.routes.set_status(self.route.id, status, self.clock(), detail)
        except StoreUnavailable:
            raise
        except TRANSIENT_ERRORS as e:  # RouteStore lets driver errors through: translated here, like smsc's `side`
            raise StoreUnavailable(str(e)) from e

    def _note(self, change: Transition | None, message_id: str) -> None:
        if change is None:
            return
        self.transitions.append(change)
        self.stats[f"breaker_{change.after.value}"] += 1
        self._status_due = True
        log.warning("mailer %s (message=%s)", change.describe(), message_id)

    # ---- one batch --------------------------------------------------------------------------------

    async def _read(self) -> Prepared | None:
        """Read a batch and decide what to send (before sending: canceled, held, expired, suspended)."""
        batch = await self.reader.read(self.batch_size)
        if not batch:
            return None
        try:
            busy = set(self.busy)  # taken BEFORE the messages are loaded: see core/workers/mailer_batch.py
            docs = await self.log.load_many([e["message_id"] for e in batch.entries])
            job = decide_batch(batch, docs, route=self.route, book=self.reader.book, unresolved=self.unresolved,
                               busy=busy, now=self.clock(), stats=self.stats)
        except BaseException:
            self.reader.rewind(batch.ranges)
            raise
        self.busy |= job.ids
        return job

    def _forget(self, job: Prepared) -> None:
        """A batch that will not be committed by us: read again from its first position."""
        self.reader.rewind(job.batch.ranges)
        self.busy -= job.ids

    async def _attempt(self, job: Prepared) -> None:
        """One attempt document per batch, BEFORE any provider call: a crash from here on leaves an
        open attempt for the next owner's policy."""
        own = self.own
        assert own is not None
        try:
            if job.items:
                await self.owners.record_attempt(own, job.batch.ranges, [i.state.message_id for i in job.items],
                                                 self.clock())
        except BaseException:
            self._forget(job)
            raise
        self.stats["batches"] += 1

    async def _send_and_commit(self, job: Prepared, transport: Transport) -> None:
        """Send; then, once the previous batch's commit is done (commits in read order), start this one's."""
        own = self.own
        assert own is not None
        await self._send_all(job.items, transport)
        if self._status_due:
            await self._heartbeat()
        try:
            await self._settle()
        finally:
            if self.lost.is_set():
                self._forget(job)
        if self.lost.is_set():
            return
        now = self.clock()
        job.writes.extend(outcome_write(i, self.route.id, self.provider, now) for i in job.items)
        self.pending = asyncio.create_task(self._commit(job, own, now), name=f"mailer-commit-{self.route.id}")

    async def _send_all(self, items: list[MailItem], transport: Transport) -> None:
        """Send through `route.pool` workers: few connections, many messages each."""
        queue = collections.deque(items)

        async def worker() -> None:
            while queue and self._may_send():
                await self._send_one(queue.popleft(), transport)

        await asyncio.gather(*(worker() for _ in range(min(self.route.pool, len(items)))))

    async def _send_one(self, item: MailItem, transport: Transport) -> None:
        s = item.state
        now = self.clock()
        allowed, change = self.breaker.allow(now)
        self._note(change, s.message_id)
        if not allowed:
            state = self.breaker.state_at(now).value
            item.attempt, item.breaker = s.attempts, state  # nothing was attempted
            item.result = MailResult(error=f"circuit breaker {state}")
            item.decision = circuit_open_decision(state, self.rng)
            self.stats["circuit_open"] += 1
            return
        # An earlier owner's open attempt counts: this resend is the message's next attempt after it.
        item.attempt = s.attempts + (2 if item.duplicate else 1)
        mime = build_mime(item.content, s.message_id, now)
        item.message_id_header = mime.message_id_header
        result = await transport.send(item.content, mime)
        self._note(self.breaker.record(self.clock(), result.route_failed), s.message_id)
        item.result, item.breaker = result, self.breaker.state_at(self.clock()).value
        item.decision = decide_mail(result, policy=self.route.on_unknown_outcome.value, attempt=item.attempt,
                                    rng=self.rng)
        self.stats[item.decision.verdict.value] += 1
        ids = f"message={s.message_id} tenant={s.tenant_id} route={self.route.id}"
        if item.decision.verdict == "sent":
            log.debug("mailer %s: sent, provider id %s", ids, result.provider_id)
        else:
            log.info("mailer %s: %s %s %s (breaker %s)", ids, item.decision.verdict.value, item.decision.error_name,
                     item.decision.reason, item.breaker)

    async def _commit(self, job: Prepared, own: Ownership, now: datetime) -> None:
        """One transaction for the batch, fenced by our epoch; store errors retried while we own.
        Runs while the next batch is sent: a fence found here stops that sending at once."""
        delay = 0.05
        writes, batch = job.writes, job.batch
        while not self.lost.is_set():
            try:
                await self.log.commit(writes, moves=batch.moves, fence=own.fence, redecide=_moved_on,
                                      extra=lambda ws: [("tenants", spend_updates(billed_amounts(list(ws)), now)),
                                                        (PROVIDER_IDS, provider_id_inserts(ws, now))])
                self.busy -= job.ids
                return
            except (Fenced, CheckpointMoved) as e:
                self._lose(f"fenced at commit: {e}")
            except StoreUnavailable as e:
                delay = min(COMMIT_BACKOFF_CAP_S, delay * 2)
                log.warning("mailer route=%s: store unavailable, keeping a batch of %d in memory; retry in %.1fs: %s",
                            self.route.id, len(writes), delay, e)
                await sleep_or_stop(self.lost, delay)
        self._forget(job)


async def _moved_on(ids: list[str]) -> list[Write]:
    """Messages whose next seq was taken meanwhile: whoever appended it owns what comes next."""
    return []
