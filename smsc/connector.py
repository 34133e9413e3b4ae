"""The SMSC connector of one route: claims routed messages, sends submit_sm, records the outcome,
and turns delivery receipts into `delivered` / `undelivered`.

Ordering that keeps the guarantees:
- The claim (lease + attempt count) is committed before any submit_sm: after a crash the log shows an
  attempt without an outcome. Policy `resend` (the default, at-least-once): the next claim sends it
  again and its `sent` event says `possible_duplicate`, so every possible duplicate is visible.
- A deliver_sm is acknowledged only after its event is committed (or, for an id we do not know,
  after it is stored in `orphan_receipts`). A receipt that overtakes our own commit of `sent` is held
  until that commit lands, never dropped.
- Outcomes and receipts are committed in batches: one transaction per flush, not per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from pymongo.errors import ConnectionFailure, OperationFailure

from core.aio import sleep_or_stop, wait_and_clear
from core.domain.encoding import encode_text, make_udh
from core.domain.events import EventType
from core.domain.message import evolve, next_event
from core.domain.retry import backoff_s
from core.domain.routing import Route, RouteStatus, UnknownOutcomePolicy
from core.store.cursor import QueueCursor
from core.store.eventstore import Claimed, EventStore, Transition
from core.store.routes import RouteStore
from smsc.session import DeliverSm, SessionError, SmppSession
from smsc.status import THROTTLING, describe, is_temporary, status_name
from smsc.throttle import TokenBucket

log = logging.getLogger(__name__)

FLUSH_S = 0.02
HEARTBEAT_S = 2.0
RECEIPT_HOLD_S = 60.0
UNDELIVERED_STATS = {"UNDELIV", "EXPIRED", "REJECTD", "DELETED", "UNKNOWN"}
FINAL_STATS = UNDELIVERED_STATS | {"DELIVRD"}


@dataclass
class Outcome:
    claim: Claimed
    smsc_ids: list[str]
    status: int  # first non-zero part status, or 0
    error: str = ""  # set when no response came (connection lost, time-out, no bind up)
    maybe_sent: bool = False  # a submit_sm may have reached the SMSC without our seeing the answer
    held: bool = False  # not sent: an earlier attempt's outcome is unknown and the policy is `hold`
    too_late: bool = False  # not sent: its validity passed while it waited for this route


class Connector:
    def __init__(self, store: EventStore, routes: RouteStore, route: Route, clock: Callable[[], datetime], *,
                 owner: str, lease_s: float = 30.0, batch_size: int = 500, max_attempts: int = 5) -> None:
        self.store = store
        self.routes = routes
        self.route = route
        self.clock = clock
        self.owner = owner
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.queue = f"send:{route.id}"
        self.cursor = QueueCursor()
        self.sessions: list[SmppSession] = []
        self.bucket = TokenBucket(route.tps)
        self.outcomes: list[Outcome] = []
        self.receipts: list[tuple[DeliverSm, SmppSession]] = []
        self.held: dict[str, tuple[DeliverSm, SmppSession, datetime]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.awaiting_commit: set[str] = set()  # smsc ids whose `sent` is not committed yet
        self.in_flight = 0
        self.wake = asyncio.Event()
        self.throttled_until = 0.0
        self.stats = {"sent": 0, "failed": 0, "retried": 0, "receipts": 0, "orphan_receipts": 0,
                      "possible_duplicates": 0, "throttled": 0, "held_unknown": 0}

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return sum(s.window for s in self.sessions if s.is_up)

    async def run(self, stop: asyncio.Event, grace_s: float = 10.0) -> None:
        binds = [asyncio.create_task(self._keep_bound(i, stop)) for i in range(self.route.binds)]
        flusher = asyncio.create_task(self._flush_loop(stop))
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        try:
            await self._claim_loop(stop)
        finally:
            # Graceful shutdown: stop claiming, let in-flight submits finish, record their outcomes.
            deadline = asyncio.get_running_loop().time() + grace_s
            while self.in_flight and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            for _ in range(20):  # the store may be briefly away; do not drop recorded outcomes lightly
                try:
                    await self._flush()
                    break
                except (ConnectionFailure, OperationFailure) as e:
                    log.warning("connector route=%s: final flush failed, retrying: %s", self.route.id, e)
                    await asyncio.sleep(0.5)
            if self.outcomes:
                log.error("connector route=%s: %d outcomes not recorded at shutdown; their leases will expire and "
                          "the messages be resent as possible duplicates: %s", self.route.id, len(self.outcomes),
                          [o.claim.state.message_id for o in self.outcomes[:10]])
            flusher.cancel()
            heartbeat.cancel()
            for t in binds:
                t.cancel()
            await asyncio.gather(flusher, heartbeat, *binds, return_exceptions=True)
            await asyncio.gather(*(s.close() for s in self.sessions), return_exceptions=True)
            with contextlib.suppress(ConnectionFailure, OperationFailure):
                await self.routes.set_status(self.route.id, RouteStatus.DOWN, self.clock(), "connector stopped")
            log.info("connector route=%s stopped: %s", self.route.id, self.stats)

    async def _keep_bound(self, index: int, stop: asyncio.Event) -> None:
        """Keep bind `index` open: reconnect with exponential back-off and jitter."""
        attempt = 0
        while not stop.is_set():
            holder: list[SmppSession] = []
            session = SmppSession(self.route.host, self.route.port, system_id=self.route.system_id,
                                  password=self.route.password, system_type=self.route.system_type,
                                  window=self.route.window, on_deliver=lambda p, h=holder: self._on_deliver(p, h[0]))
            holder.append(session)
            try:
                await session.open()
            except (SessionError, OSError) as e:
                attempt += 1
                delay = backoff_s(attempt, base_s=0.5, cap_s=30.0)
                log.warning("connector route=%s bind=%d failed (%s); retry in %.1fs", self.route.id, index, e, delay)
                await sleep_or_stop(stop, delay)
                continue
            attempt = 0
            self.sessions.append(session)
            log.info("connector route=%s bind=%d up %s:%d", self.route.id, index, self.route.host, self.route.port)
            self.wake.set()
            while session.is_up and not stop.is_set():
                await asyncio.sleep(0.2)
            self.sessions.remove(session)
            if not stop.is_set():
                log.warning("connector route=%s bind=%d lost its connection", self.route.id, index)
            await session.close()

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            up = [s for s in self.sessions if s.is_up]
            status = RouteStatus.DOWN if not up else (
                RouteStatus.BUSY if all(s.in_flight >= s.window for s in up) else RouteStatus.UP)
            try:
                await self.routes.set_status(self.route.id, status, self.clock(), f"{len(up)} binds up")
            except (ConnectionFailure, OperationFailure) as e:
                log.warning("connector route=%s: could not record route status: %s", self.route.id, e)
            await sleep_or_stop(stop, HEARTBEAT_S)

    # ---- sending --------------------------------------------------------------------------------

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            room = self.capacity * 2 - self.in_flight
            if room <= 0 or loop.time() < self.throttled_until:
                await wait_and_clear(self.wake, 0.05)
                continue
            now = self.clock()
            try:
                claims = await self.store.claim(self.queue, now, min(room, self.batch_size), self.owner, self.lease_s,
                                                self.cursor)
            except (ConnectionFailure, OperationFailure) as e:
                log.warning("connector route=%s: claim failed, store unavailable: %s", self.route.id, e)
                await sleep_or_stop(stop, 1.0)
                continue
            if not claims:
                await wait_and_clear(self.wake, 0.05)
                continue
            for claim in claims:
                expires_at = claim.state.expires_at
                if expires_at is not None and now >= expires_at:
                    self.outcomes.append(Outcome(claim, [], 0, too_late=True))
                    continue
                if claim.prior_lease and self.route.on_unknown_outcome == UnknownOutcomePolicy.HOLD:
                    self.outcomes.append(Outcome(claim, [], 0, held=True))
                    continue
                self.in_flight += 1
                task = asyncio.create_task(self._send(claim))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, claim: Claimed) -> None:
        state = claim.state
        encoded = encode_text(state.text)
        ref = random.randrange(256)
        smsc_ids: list[str] = []
        status, error, maybe_sent = 0, "", False
        try:
            for index, payload in enumerate(encoded.parts, start=1):
                await self.bucket.take()
                session = self._pick_session()
                udh = make_udh(ref, encoded.part_count, index) if encoded.part_count > 1 else b""
                result = await session.submit(
                    source=state.sender, destination=state.to.lstrip("+"), short_message=udh + payload,
                    data_coding=encoded.data_coding, esm_class=0x40 if udh else 0,
                    source_ton=5 if not state.sender.lstrip("+").isdigit() else 1,
                    source_npi=0 if not state.sender.lstrip("+").isdigit() else 1,
                )
                if result.status != 0:
                    status = result.status
                    break
                if result.message_id:
                    smsc_ids.append(result.message_id)
                    self.awaiting_commit.add(result.message_id)
        except (SessionError, OSError) as e:
            error, maybe_sent = f"{type(e).__name__}: {e}", True
        except LookupError as e:  # no bind was up: nothing left this process
            error = str(e)
        finally:
            self.in_flight -= 1
        self.outcomes.append(Outcome(claim, smsc_ids, status, error, maybe_sent))
        if status in THROTTLING:
            self.stats["throttled"] += 1
            self.throttled_until = asyncio.get_running_loop().time() + 1.0
        self.wake.set()

    def _pick_session(self) -> SmppSession:
        up = [s for s in self.sessions if s.is_up]
        if not up:
            raise LookupError(f"route {self.route.id}: no bind is up")
        return min(up, key=lambda s: s.in_flight / s.window)

    # ---- recording ------------------------------------------------------------------------------

    def _on_deliver(self, pdu: DeliverSm, session: SmppSession) -> None:
        self.receipts.append((pdu, session))
        self.wake.set()

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        backoff = FLUSH_S
        while not stop.is_set():
            await asyncio.sleep(backoff)
            if not (self.outcomes or self.receipts or self.held):
                continue
            try:
                await self._flush()
                backoff = FLUSH_S
            except (ConnectionFailure, OperationFailure) as e:
                backoff = min(5.0, backoff * 2)
                log.warning("connector route=%s: store unavailable, keeping %d outcomes and %d receipts in memory; "
                            "retry in %.1fs: %s", self.route.id, len(self.outcomes), len(self.receipts), backoff, e)

    async def _flush(self) -> None:
        """Record outcomes and receipts. If the store fails, they go back in the buffers, untouched,
        for the next try: an outcome is dropped only once it is in the log."""
        now = self.clock()
        outcomes, self.outcomes = self.outcomes, []
        try:
            if outcomes:
                await self._record_outcomes(outcomes, now)
        except BaseException:
            self.outcomes = outcomes + self.outcomes
            raise
        receipts, self.receipts = self.receipts, []
        try:
            if receipts or self.held:
                await self._record_receipts(receipts, now)
        except BaseException:
            self.receipts = receipts + self.receipts
            raise

    async def _record_outcomes(self, outcomes: list[Outcome], now: datetime) -> None:
        transitions, release = [], []
        for o in outcomes:
            t = self._outcome_transition(o, now)
            if t is None:
                release.append(o.claim)
            else:
                transitions.append(t)
        if release:
            # Throttled before anything was sent: give the message back untouched, a bit later.
            await self.store.release(release, now + timedelta(seconds=1))
        if transitions:
            result = await self.store.commit(transitions, now)
            if result.conflicts:
                log.warning("connector route=%s lost the lease of %d messages (e.g. %s): another connector owns them",
                            self.route.id, len(result.conflicts), result.conflicts[:3])
        for o in outcomes:
            self.awaiting_commit.difference_update(o.smsc_ids)

    def _outcome_transition(self, o: Outcome, now: datetime) -> Transition | None:
        s = o.claim.state
        ids = {"message": s.message_id, "tenant": s.tenant_id, "route": self.route.id}
        hold = self.route.on_unknown_outcome == UnknownOutcomePolicy.HOLD
        if o.too_late:
            event = next_event(s, EventType.EXPIRED, now, {"reason": "validity passed before it could be sent"})
        elif o.held or (o.maybe_sent and hold):
            reason = ("an earlier attempt's lease expired without an outcome" if o.held
                      else f"no answer to submit_sm: {o.error}")
            event = next_event(s, EventType.UNKNOWN, now, {"route_id": self.route.id, "attempt": s.attempts,
                                                            "reason": reason, "smsc_message_ids": o.smsc_ids})
            self.stats["held_unknown"] += 1
            log.warning("connector %s: outcome unknown, held for the operator (policy hold): %s", ids, reason)
        elif o.status == 0 and not o.error:
            data = {"route_id": self.route.id, "smsc_message_ids": o.smsc_ids, "attempt": s.attempts,
                    "parts": len(o.smsc_ids)}
            if o.claim.prior_lease:
                data["possible_duplicate"] = True
                self.stats["possible_duplicates"] += 1
            event = next_event(s, EventType.SENT, now, data)
            self.stats["sent"] += 1
        elif o.status in THROTTLING and not o.smsc_ids:
            return None
        elif o.error or is_temporary(o.status):
            retry_at = now + timedelta(seconds=backoff_s(s.attempts))
            event = next_event(s, EventType.RETRY, now, {
                "route_id": self.route.id, "attempt": s.attempts, "error_code": o.status or None,
                "error_name": status_name(o.status) if o.status else (
                    "OUTCOME_UNKNOWN" if o.maybe_sent else "NOT_SENT"),
                "reason": o.error or describe(o.status), "next_at": retry_at,
                "exclude_route": bool(o.status), "smsc_message_ids": o.smsc_ids})
            self.stats["retried"] += 1
            log.info("connector %s: retry at %s: %s", ids, retry_at.isoformat(), event.data["reason"])
            return Transition(s.version, [event], evolve(s, event), due_at=retry_at, lease_token=o.claim.token)
        else:
            event = next_event(s, EventType.FAILED, now, {
                "route_id": self.route.id, "attempt": s.attempts, "error_code": o.status,
                "error_name": status_name(o.status), "reason": describe(o.status)})
            self.stats["failed"] += 1
            log.info("connector %s: failed permanently: %s", ids, status_name(o.status))
        return Transition(s.version, [event], evolve(s, event), lease_token=o.claim.token)

    async def _record_receipts(self, fresh: list[tuple[DeliverSm, SmppSession]], now: datetime) -> None:
        pending: dict[str, tuple[DeliverSm, SmppSession]] = {k: (p, s) for k, (p, s, _) in self.held.items()}
        for p, session in fresh:
            if p.receipt is None:
                # MO messages get their own path in issue 3; keep a copy and acknowledge, so the SMSC
                # does not resend it forever.
                await self.store.db["orphan_receipts"].insert_one(_orphan_doc(p, now, "mo"))
                _ack(session, p)
            else:
                pending[p.receipt.id] = (p, session)
        if not pending:
            return
        heads = await self.store.heads_by_smsc_ids(self.route.id, list(pending))
        transitions, matched = [], set()
        for s in heads:
            hits = [i for i in s.smsc_message_ids if i in pending]
            matched.update(hits)
            final = [pending[i][0].receipt for i in hits if pending[i][0].receipt.stat.upper() in FINAL_STATS]
            if s.state != "sent" or not final:
                continue  # a later part's receipt, or an intermediate state (ENROUTE, ACCEPTD)
            receipt = final[0]
            stat = receipt.stat.upper()
            kind = EventType.DELIVERED if stat == "DELIVRD" else EventType.UNDELIVERED
            event = next_event(s, kind, now, {"route_id": self.route.id, "smsc_message_id": receipt.id,
                                              "stat": stat, "err": receipt.err, "done_at": receipt.done_date})
            transitions.append(Transition(s.version, [event], evolve(s, event)))
        if transitions:
            # A conflict means another receipt or the expirer moved the message on first; the log
            # has its outcome either way, so the receipt is acknowledged.
            await self.store.commit(transitions, now)
        await self._settle_unmatched(pending, matched, now)

    async def _settle_unmatched(self, pending: dict[str, tuple[DeliverSm, SmppSession]], matched: set[str],
                                now: datetime) -> None:
        orphans = []
        for smsc_id, (p, session) in pending.items():
            held_since = self.held.get(smsc_id, (None, None, now))[2]
            if smsc_id in matched:
                self.held.pop(smsc_id, None)
                self.stats["receipts"] += 1
                _ack(session, p)
            elif smsc_id in self.awaiting_commit or now - held_since < timedelta(seconds=RECEIPT_HOLD_S):
                # The receipt overtook our own commit of `sent`, or a peer's: hold it until that lands.
                self.held[smsc_id] = (p, session, held_since)
            else:
                self.held.pop(smsc_id, None)
                orphans.append((p, session))
        if orphans:
            await self.store.db["orphan_receipts"].insert_many([_orphan_doc(p, now, "unknown_id") for p, _ in orphans])
            self.stats["orphan_receipts"] += len(orphans)
            log.warning("connector route=%s: %d receipts for unknown smsc ids (e.g. %s)", self.route.id,
                        len(orphans), orphans[0][0].receipted_message_id)
            for p, session in orphans:
                _ack(session, p)


def _ack(session: SmppSession, pdu: DeliverSm) -> None:
    """Acknowledge on the bind the deliver_sm came in on (sequence numbers are per bind)."""
    if session.is_up:
        try:
            session.respond_deliver(pdu.sequence)
        except SessionError as e:
            log.warning("could not acknowledge deliver_sm seq=%d: %s (the SMSC will resend)", pdu.sequence, e)


def _orphan_doc(p: DeliverSm, now: datetime, kind: str) -> dict[str, object]:
    return {"at": now, "kind": kind, "smsc_message_id": p.receipt.id if p.receipt else p.receipted_message_id,
            "source": p.source, "destination": p.destination, "esm_class": p.esm_class,
            "short_message": p.short_message, "stat": p.receipt.stat if p.receipt else None}
