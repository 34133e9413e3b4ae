"""The SMSC connector of one route: claims routed messages, sends submit_sm, records the outcome,
turns delivery receipts into `delivered` / `undelivered` and MO messages into `inbound`.

Ordering that keeps the guarantees:
- The claim (lease + attempt count) is committed before any submit_sm: after a crash the log shows an
  attempt without an outcome. Policy `resend` (the default, at-least-once): the next claim sends it
  again and its `sent` event says `possible_duplicate`, so every possible duplicate is visible.
- A deliver_sm is acknowledged only after its event is committed (or, for an id we do not know,
  after it is stored in `orphan_receipts`). A receipt that overtakes our own commit of `sent` is held
  until that commit lands, never dropped.
- Outcomes and receipts are committed in batches: one transaction per flush, not per message.

Binds: `route.binds` transceivers, or (bind_type `transmitter_receiver`) that many transmitter and
receiver pairs; submits go over the transmitters, deliver_sm come over the receivers. Each bind is
kept up by its own task, reconnecting with exponential back-off and jitter. The route's TPS limit is
one token bucket shared by every bind; ESME_RTHROTTLED / ESME_RMSGQFUL pause the whole route with an
exponential back-off that resets on the next accepted submit_sm.

Receipts of long messages (one SMSC id per part): the final state is recorded once every part's
final receipt is in (`delivered` if all say DELIVRD, else `undelivered` with the first failing
part's stat), in ONE event whose `parts` lists each part's stat/err, so a long message costs no more
head writes than a short one. Until then the part receipts are held in memory, unacknowledged (a
crash makes the SMSC resend them). A part receipt held longer than `PART_HOLD_S` is written to
`part_receipts` (`_id` = SMSC id) and acknowledged, so that an SMSC with a small deliver window is
not blocked by receipts waiting for a sibling; the final decision then reads them back. If a part's
receipt never comes, the scheduler expires the message after its validity; a receipt arriving after
that still records the outcome (`expired` -> `delivered` / `undelivered` is allowed by the domain).
Intermediate stats (ENROUTE, ACCEPTD) are acknowledged and change nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pymongo import ReplaceOne
from pymongo.errors import ConnectionFailure, OperationFailure

from core.aio import sleep_or_stop, wait_and_clear
from core.domain.encoding import encode_text, make_udh
from core.domain.events import EventType
from core.domain.message import MessageState, evolve, next_event
from core.domain.retry import backoff_s
from core.domain.routing import BindType, Route, RouteStatus, UnknownOutcomePolicy
from core.store.eventstore import Claimed, EventStore, Transition
from core.store.lanes import LaneBook, LaneClaimer
from core.store.routes import RouteStore
from smsc.inbound import InboundRecorder, ensure_inbound_indexes
from smsc.pdu import ReceiptFields
from smsc.session import DeliverSm, SessionError, SmppSession
from smsc.status import THROTTLING, describe, is_temporary, status_name
from smsc.throttle import TokenBucket

log = logging.getLogger(__name__)

FLUSH_S = 0.02
HEARTBEAT_S = 2.0
RECEIPT_HOLD_S = 60.0
PART_HOLD_S = 10.0  # a part receipt waits this long in memory for its siblings, then goes to `part_receipts`
PART_FORGET_S = 3600.0  # persisted part progress is dropped from memory after this (it stays in the collection)
THROTTLE_BASE_S = 0.5
THROTTLE_CAP_S = 10.0  # below the lease: a claimed message waiting out a throttle must not lose its lease
PART_THROTTLE_RETRIES = 5
# Claim no more than the route's TPS lets out in this long: a claimed message waits for its token in
# claim order, so a one-time password arriving during a campaign waits behind at most this much bulk.
CLAIM_AHEAD_S = 0.5
MIN_CLAIM_AHEAD = 10
# Transactional claims may exceed the claim-ahead by this much: an OTP arriving while bulk fills the
# connector is claimed at once (it still queues behind at most CLAIM_AHEAD_S of bulk to be sent).
TRANSACTIONAL_RESERVE = 20
HOLD_S = 5.0  # a suspended tenant's claimed message is given back, due again this much later
BIND_STABLE_S = 2.0  # a bind lost after living this long reconnects at once (after a little jitter)
RELINK_CAP_S = 5.0  # cap of the back-off between a lost bind and its next try while it keeps flapping
UNDELIVERED_STATS = {"UNDELIV", "EXPIRED", "REJECTD", "DELETED", "UNKNOWN"}
FINAL_STATS = UNDELIVERED_STATS | {"DELIVRD"}
INTERMEDIATE_STATS = {"ENROUTE", "ACCEPTD"}
STAT_ALIASES = {"DELIVERED": "DELIVRD", "UNDELIVERABLE": "UNDELIV", "REJECTED": "REJECTD", "ACCEPTED": "ACCEPTD",
                "DELETD": "DELETED"}

Pdus = list[tuple[DeliverSm, SmppSession]]


def normal_stat(stat: str) -> str:
    """The SMPP v3.4 appendix B spelling of a receipt's stat (some SMSCs spell them out)."""
    stat = stat.strip().upper()
    return STAT_ALIASES.get(stat, stat)


@dataclass
class Outcome:
    claim: Claimed
    smsc_ids: list[str]
    status: int  # first non-zero part status, or 0
    error: str = ""  # set when no response came (connection lost, time-out, no bind up)
    maybe_sent: bool = False  # a submit_sm may have reached the SMSC without our seeing the answer
    held: bool = False  # not sent: an earlier attempt's outcome is unknown and the policy is `hold`
    too_late: bool = False  # not sent: its validity passed while it waited for this route
    nack: bool = False  # the SMSC answered a submit_sm with generic_nack


@dataclass
class PartReceipt:
    """The final receipt of one part of a sent message, waiting for the other parts' receipts.
    `pdu`/`session` are None once it was acknowledged (after being written to `part_receipts`)."""

    receipt: ReceiptFields
    stat: str
    pdu: DeliverSm | None
    session: SmppSession | None
    since: datetime


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
        self.lanes = LaneClaimer(store, self.queue, LaneBook(store.db))
        self.sessions: list[SmppSession] = []
        self.bucket = TokenBucket(route.tps)
        self.inbound = InboundRecorder(store, route.id)
        self.outcomes: list[Outcome] = []
        self.receipts: Pdus = []  # deliver_sm received, not yet handled: receipts and MO
        # Receipts whose smsc id matched no `sent` yet (they overtook its commit), by smsc id.
        self.held: dict[str, tuple[Pdus, datetime]] = {}
        # Final part receipts of long messages waiting for their siblings: message id -> smsc id -> part.
        self.parts: dict[str, dict[str, PartReceipt]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.awaiting_commit: set[str] = set()  # smsc ids whose `sent` is not committed yet
        self.in_flight = 0
        self._done_at: collections.deque[float] = collections.deque(maxlen=100_000)  # submit completions
        self.wake = asyncio.Event()
        self.throttled_until = 0.0
        self.throttle_level = 0
        self.stats = {"sent": 0, "failed": 0, "retried": 0, "receipts": 0, "orphan_receipts": 0,
                      "possible_duplicates": 0, "throttled": 0, "held_unknown": 0, "generic_nacks": 0,
                      "receipts_intermediate": 0, "receipts_duplicate": 0, "part_receipts_persisted": 0, "mo": 0,
                      "mo_unassigned": 0, "malformed_pdus": 0, "reconnects": 0}

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return sum(s.window for s in self.sessions if s.is_up and s.can_submit)

    def _bind_plan(self) -> list[tuple[int, str]]:
        kinds = ["transmitter", "receiver"] if self.route.bind_type == BindType.TRANSMITTER_RECEIVER else [
            "transceiver"]
        return [(i, kind) for i in range(self.route.binds) for kind in kinds]

    async def run(self, stop: asyncio.Event, grace_s: float = 10.0) -> None:
        try:
            await ensure_inbound_indexes(self.store.db)
        except (ConnectionFailure, OperationFailure) as e:  # MO still works, only slower
            log.warning("connector route=%s: could not create the inbound indexes: %s", self.route.id, e)
        binds = [asyncio.create_task(self._keep_bound(i, kind, stop)) for i, kind in self._bind_plan()]
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
            self.stats["malformed_pdus"] += sum(s.malformed for s in self.sessions)
            # Unacknowledged receipts (held parts, early receipts) are resent by the SMSC on a later bind.
            await asyncio.gather(*(s.close() for s in self.sessions), return_exceptions=True)
            with contextlib.suppress(ConnectionFailure, OperationFailure):
                await self.routes.set_status(self.route.id, RouteStatus.DOWN, self.clock(), "connector stopped")
            log.info("connector route=%s stopped: %s", self.route.id, self.stats)

    async def _keep_bound(self, index: int, kind: str, stop: asyncio.Event) -> None:
        """Keep bind `index` of `kind` open: reconnect with exponential back-off and jitter. A bind that
        drops soon after it came up (a flapping link, an SMSC sending garbage) keeps the back-off growing."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while not stop.is_set():
            holder: list[SmppSession] = []
            session = SmppSession(self.route.host, self.route.port, system_id=self.route.system_id,
                                  password=self.route.password, system_type=self.route.system_type,
                                  window=self.route.window, bind=kind,
                                  on_deliver=lambda p, h=holder: self._on_deliver(p, h[0]))
            holder.append(session)
            try:
                await session.open()
            except (SessionError, OSError) as e:
                attempt += 1
                delay = backoff_s(attempt, base_s=0.5, cap_s=30.0)
                log.warning("connector route=%s bind=%d/%s failed (%s); retry in %.1fs", self.route.id, index, kind,
                            e, delay)
                await sleep_or_stop(stop, delay)
                continue
            up_at = loop.time()
            self.sessions.append(session)
            log.info("connector route=%s bind=%d/%s up %s:%d", self.route.id, index, kind, self.route.host,
                     self.route.port)
            self.wake.set()
            while session.is_up and not stop.is_set():
                await asyncio.sleep(0.2)
            await session.close()  # still listed meanwhile: if we are cancelled here, run() closes it
            self.sessions.remove(session)
            self.stats["malformed_pdus"] += session.malformed
            if stop.is_set():
                return
            attempt = 0 if loop.time() - up_at > BIND_STABLE_S else attempt + 1
            delay = backoff_s(attempt, base_s=0.2, cap_s=RELINK_CAP_S) if attempt else random.uniform(0.0, 0.2)
            self.stats["reconnects"] += 1
            log.warning("connector route=%s bind=%d/%s lost its connection%s; reconnect in %.1fs", self.route.id,
                        index, kind, " (malformed PDU)" if session.malformed else "", delay)
            await sleep_or_stop(stop, delay)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            up = [s for s in self.sessions if s.is_up and s.can_submit]
            status = RouteStatus.DOWN if not up else (
                RouteStatus.BUSY if all(s.in_flight >= s.window for s in up) else RouteStatus.UP)
            receivers = sum(1 for s in self.sessions if s.is_up and s.can_receive)
            try:
                await self.routes.set_status(self.route.id, status, self.clock(),
                                             f"{len(up)} transmitting, {receivers} receiving binds up")
            except (ConnectionFailure, OperationFailure) as e:
                log.warning("connector route=%s: could not record route status: %s", self.route.id, e)
            await sleep_or_stop(stop, HEARTBEAT_S)

    # ---- sending --------------------------------------------------------------------------------

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            room = self._claim_room() - self.in_flight
            if room + TRANSACTIONAL_RESERVE <= 0 or loop.time() < self.throttled_until:
                await wait_and_clear(self.wake, 0.05)
                continue
            now = self.clock()
            try:
                claims = await self.lanes.claim(now, min(room + TRANSACTIONAL_RESERVE, self.batch_size), self.owner,
                                                self.lease_s, bulk_limit=max(0, min(room, self.batch_size)))
                claims = await self._hold_suspended(claims, now)
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

    def _claim_room(self) -> int:
        """How many messages may be claimed and not yet answered: two windows, and no more than the
        route sends in CLAIM_AHEAD_S (at its TPS limit, or at the rate it achieved in the last two
        seconds when the store or the SMSC is slower than that)."""
        room = self.capacity * 2
        if self.route.tps:
            room = min(room, max(1, int(self.route.tps * CLAIM_AHEAD_S)))
        horizon = asyncio.get_running_loop().time() - 2.0
        while self._done_at and self._done_at[0] < horizon:
            self._done_at.popleft()
        return min(room, max(MIN_CLAIM_AHEAD, int(len(self._done_at) / 2.0 * CLAIM_AHEAD_S)))

    async def _hold_suspended(self, claims: list[Claimed], now: datetime) -> list[Claimed]:
        """Give back, untouched, the claims of tenants suspended meanwhile: held, not lost."""
        suspended = self.lanes.book.suspended
        held = [c for c in claims if c.state.tenant_id in suspended]
        if held:
            await self.store.release(held, now + timedelta(seconds=HOLD_S))
            log.info("connector route=%s: %d messages of suspended tenants held (e.g. message=%s tenant=%s)",
                     self.route.id, len(held), held[0].state.message_id, held[0].state.tenant_id)
        return [c for c in claims if c.state.tenant_id not in suspended] if held else claims

    def _source_ton_npi(self, sender: str) -> tuple[int, int]:
        """TON/NPI of the source address: the route's when set, else derived from the sender
        (alphanumeric 5/0, numeric international 1/1)."""
        numeric = sender.lstrip("+").isdigit()
        ton = self.route.source_ton if self.route.source_ton is not None else (1 if numeric else 5)
        npi = self.route.source_npi if self.route.source_npi is not None else (1 if numeric else 0)
        return ton, npi

    async def _send(self, claim: Claimed) -> None:
        state = claim.state
        encoded = encode_text(state.text)
        ref = random.randrange(256)
        smsc_ids: list[str] = []
        status, error, maybe_sent, nack = 0, "", False, False
        source_ton, source_npi = self._source_ton_npi(state.sender)
        # Waiting out throttles must end well inside the lease, or a peer could claim and resend it.
        patience_until = asyncio.get_running_loop().time() + self.lease_s / 2
        try:
            for index, payload in enumerate(encoded.parts, start=1):
                udh = make_udh(ref, encoded.part_count, index) if encoded.part_count > 1 else b""
                for tries in range(PART_THROTTLE_RETRIES + 1):
                    if not smsc_ids and self._throttle_left() > 0:
                        status = THROTTLED_BEFORE_SEND  # nothing sent yet: give the message back
                        break
                    await self._wait_throttle()
                    await self.bucket.take()
                    session = self._pick_session()
                    result = await session.submit(
                        source=state.sender, destination=state.to.lstrip("+"), short_message=udh + payload,
                        data_coding=encoded.data_coding, esm_class=0x40 if udh else 0, source_ton=source_ton,
                        source_npi=source_npi, dest_ton=self.route.dest_ton, dest_npi=self.route.dest_npi)
                    status, nack = result.status, result.generic_nack
                    if status in THROTTLING and not nack:
                        self._throttled(state.message_id, status)
                        # A later part is retried here after the pause: the earlier parts are out already.
                        if smsc_ids and tries < PART_THROTTLE_RETRIES and \
                                self.throttled_until < patience_until:
                            continue
                    break
                if status != 0 or nack:
                    if nack:
                        self.stats["generic_nacks"] += 1
                        log.warning("connector message=%s route=%s: generic_nack 0x%02x for part %d", state.message_id,
                                    self.route.id, status, index)
                    break
                self.throttle_level = 0
                if result.message_id:
                    smsc_ids.append(result.message_id)
                    self.awaiting_commit.add(result.message_id)
        except (SessionError, OSError) as e:
            error, maybe_sent = f"{type(e).__name__}: {e}", True
        except LookupError as e:  # no bind was up: nothing left this process
            error = str(e)
        finally:
            self.in_flight -= 1
            self._done_at.append(asyncio.get_running_loop().time())
        self.outcomes.append(Outcome(claim, smsc_ids, status, error, maybe_sent, nack=nack))
        self.wake.set()

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

    def _pick_session(self) -> SmppSession:
        up = [s for s in self.sessions if s.is_up and s.can_submit]
        if not up:
            raise LookupError(f"route {self.route.id}: no transmitting bind is up")
        return min(up, key=lambda s: s.in_flight / s.window)

    # ---- recording outcomes ---------------------------------------------------------------------

    def _on_deliver(self, pdu: DeliverSm, session: SmppSession) -> None:
        self.receipts.append((pdu, session))
        self.wake.set()

    async def _flush_loop(self, stop: asyncio.Event) -> None:
        backoff = FLUSH_S
        while not stop.is_set():
            await asyncio.sleep(backoff)
            if not (self.outcomes or self.receipts or self.held or self.parts):
                continue
            try:
                await self._flush()
                backoff = FLUSH_S
            except (ConnectionFailure, OperationFailure) as e:
                backoff = min(5.0, backoff * 2)
                log.warning("connector route=%s: store unavailable, keeping %d outcomes and %d receipts in memory; "
                            "retry in %.1fs: %s", self.route.id, len(self.outcomes), len(self.receipts), backoff, e)

    async def _flush(self) -> None:
        """Record outcomes, MO messages and receipts. If the store fails, they go back in the buffers,
        untouched, for the next try: an outcome is dropped only once it is in the log."""
        now = self.clock()
        outcomes, self.outcomes = self.outcomes, []
        try:
            if outcomes:
                await self._record_outcomes(outcomes, now)
        except BaseException:
            self.outcomes = outcomes + self.outcomes
            raise
        fresh, self.receipts = self.receipts, []
        mo = [r for r in fresh if r[0].receipt is None]
        dlr = [r for r in fresh if r[0].receipt is not None]
        try:
            if mo:
                await self._record_mo(mo, now)
        except BaseException:
            self.receipts = fresh + self.receipts
            raise
        try:
            if dlr or self.held or self.parts:
                await self._record_receipts(dlr, now)
        except BaseException:
            self.receipts = dlr + self.receipts
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
            # Throttled before anything was sent: give the message back untouched, after the pause.
            pause = max(1.0, self._throttle_left())
            await self.store.release(release, now + timedelta(seconds=pause))
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
        elif o.status == 0 and not o.error and not o.nack:
            data: dict[str, Any] = {"route_id": self.route.id, "smsc_message_ids": o.smsc_ids, "attempt": s.attempts,
                                    "parts": len(o.smsc_ids)}
            if o.claim.prior_lease:
                data["possible_duplicate"] = True
                self.stats["possible_duplicates"] += 1
            event = next_event(s, EventType.SENT, now, data)
            self.stats["sent"] += 1
        elif o.status in (*THROTTLING, THROTTLED_BEFORE_SEND) and not o.smsc_ids and not o.nack:
            return None
        elif o.error or o.nack or is_temporary(o.status):
            return self._retry_transition(o, now, ids)
        else:
            event = next_event(s, EventType.FAILED, now, {
                "route_id": self.route.id, "attempt": s.attempts, "error_code": o.status,
                "error_name": status_name(o.status), "reason": describe(o.status)})
            self.stats["failed"] += 1
            log.info("connector %s: failed permanently: %s", ids, status_name(o.status))
        return Transition(s.version, [event], evolve(s, event), lease_token=o.claim.token)

    def _retry_transition(self, o: Outcome, now: datetime, ids: dict[str, str]) -> Transition:
        s = o.claim.state
        retry_at = now + timedelta(seconds=backoff_s(s.attempts))
        if o.nack:
            name, reason = "GENERIC_NACK", f"generic_nack for submit_sm ({status_name(o.status)})"
        elif o.status:
            name, reason = status_name(o.status), describe(o.status)
        else:
            name, reason = ("OUTCOME_UNKNOWN" if o.maybe_sent else "NOT_SENT"), o.error
        event = next_event(s, EventType.RETRY, now, {
            "route_id": self.route.id, "attempt": s.attempts, "error_code": o.status or None, "error_name": name,
            "reason": o.error or reason, "next_at": retry_at, "exclude_route": bool(o.status or o.nack),
            "smsc_message_ids": o.smsc_ids})
        self.stats["retried"] += 1
        log.info("connector %s: retry at %s: %s", ids, retry_at.isoformat(), event.data["reason"])
        return Transition(s.version, [event], evolve(s, event), due_at=retry_at, lease_token=o.claim.token)

    # ---- MO -------------------------------------------------------------------------------------

    async def _record_mo(self, mo: Pdus, now: datetime) -> None:
        result = await self.inbound.record([p for p, _ in mo], now)
        self.stats["mo"] += len(result.committed)
        self.stats["mo_unassigned"] += result.unassigned
        for p, session in mo:
            _ack(session, p)

    # ---- receipts -------------------------------------------------------------------------------

    async def _record_receipts(self, fresh: Pdus, now: datetime) -> None:
        pending: dict[str, Pdus] = {k: list(v) for k, (v, _) in self.held.items()}
        for p, session in fresh:
            assert p.receipt is not None
            pending.setdefault(p.receipt.id, []).append((p, session))
        if pending:
            heads = await self.store.heads_by_smsc_ids(self.route.id, list(pending))
            matched, lost = await self._apply_receipts(heads, pending, now)
            await self._settle_unmatched(pending, matched, now)
            for smsc_id, pdus in lost.items():  # decided again on the next flush, against the new head
                self.held[smsc_id] = (pdus, now)
        await self._persist_waiting_parts(now)

    async def _apply_receipts(self, heads: list[MessageState], pending: dict[str, Pdus],
                              now: datetime) -> tuple[set[str], dict[str, Pdus]]:
        """Fold the receipts into each message's part progress; commit the messages now complete.
        Returns the smsc ids that matched a message (held early receipts among them), and the
        unacknowledged part receipts of messages whose commit lost a race, by smsc id."""
        matched: set[str] = set()
        acks: Pdus = []
        open_heads: list[MessageState] = []
        for s in heads:
            hits = [i for i in s.smsc_message_ids if i in pending]
            matched.update(hits)
            live = s.state in ("sent", "expired")
            for i in hits:
                for p, session in pending[i]:
                    assert p.receipt is not None
                    stat = normal_stat(p.receipt.stat)
                    if stat in FINAL_STATS and live:
                        self._add_part(s.message_id, i, p, session, stat, now, acks)
                        continue
                    if stat not in FINAL_STATS and stat not in INTERMEDIATE_STATS:
                        log.warning("connector message=%s route=%s: receipt with unknown stat %r for smsc id %s "
                                    "taken as intermediate", s.message_id, self.route.id, p.receipt.stat, i)
                    key = "receipts_intermediate" if stat not in FINAL_STATS else "receipts_duplicate"
                    self.stats[key] += 1
                    acks.append((p, session))
            if live and hits:
                open_heads.append(s)
            elif not live:
                self.parts.pop(s.message_id, None)
        await self._load_persisted_parts([s for s in open_heads if len(s.smsc_message_ids) > 1])
        complete = [s for s in open_heads if set(s.smsc_message_ids) <= set(self.parts.get(s.message_id, ()))]
        lost = await self._commit_final(complete, now, acks) if complete else {}
        for p, session in acks:
            _ack(session, p)
        return matched, lost

    def _add_part(self, message_id: str, smsc_id: str, p: DeliverSm, session: SmppSession, stat: str,
                  now: datetime, acks: Pdus) -> None:
        progress = self.parts.setdefault(message_id, {})
        previous = progress.get(smsc_id)
        if previous is not None and previous.pdu is p:
            return  # the same deliver_sm again (a flush that failed is being retried)
        if previous is not None and previous.pdu is not None:
            acks.append((previous.pdu, previous.session))  # type: ignore[arg-type]  # superseded by a resend
        progress[smsc_id] = PartReceipt(p.receipt, stat, p, session, previous.since if previous else now)  # type: ignore[arg-type]

    async def _commit_final(self, complete: list[MessageState], now: datetime, acks: Pdus) -> dict[str, Pdus]:
        """Commit the final event of each complete message; queue its receipts for acknowledgement.
        Returns the receipts of the messages whose head moved on meanwhile (the expirer, a peer)."""
        transitions = [self._final_transition(s, now) for s in complete]
        result = await self.store.commit(transitions, now)
        conflicts = set(result.conflicts)
        lost: dict[str, Pdus] = {}
        persisted: list[str] = []
        for s in complete:
            progress = self.parts.pop(s.message_id, {})
            if s.message_id in conflicts:
                for smsc_id, part in progress.items():
                    if part.pdu is not None and part.session is not None:
                        lost[smsc_id] = [(part.pdu, part.session)]
                continue
            self.stats["receipts"] += len(progress)
            acks.extend((part.pdu, part.session) for part in progress.values()
                        if part.pdu is not None and part.session is not None)
            if any(part.pdu is None for part in progress.values()):
                persisted.append(s.message_id)
        if persisted:  # housekeeping only: a leftover is ignored once the message has its outcome
            with contextlib.suppress(ConnectionFailure, OperationFailure):
                await self.store.db["part_receipts"].delete_many({"message_id": {"$in": persisted}})
        return lost

    def _final_transition(self, s: MessageState, now: datetime) -> Transition:
        progress = self.parts[s.message_id]
        results = [progress[i] for i in s.smsc_message_ids]
        failing = next((r for r in results if r.stat != "DELIVRD"), None)
        chosen = failing or results[-1]
        kind = EventType.DELIVERED if failing is None else EventType.UNDELIVERED
        data: dict[str, Any] = {"route_id": self.route.id, "smsc_message_id": chosen.receipt.id, "stat": chosen.stat,
                                "err": chosen.receipt.err, "done_at": chosen.receipt.done_date}
        if len(results) > 1:
            data["parts"] = [{"smsc_message_id": r.receipt.id, "stat": r.stat, "err": r.receipt.err,
                              "done_at": r.receipt.done_date} for r in results]
        event = next_event(s, kind, now, data)
        log.debug("connector message=%s route=%s: %s (%s)", s.message_id, self.route.id, kind.value, chosen.stat)
        return Transition(s.version, [event], evolve(s, event))

    async def _persist_waiting_parts(self, now: datetime) -> None:
        """Part receipts that waited `PART_HOLD_S` for their siblings go to `part_receipts`, then are
        acknowledged: the SMSC's deliver window must not fill with receipts we are sitting on."""
        waiting = [(mid, sid, part) for mid, progress in self.parts.items() for sid, part in progress.items()
                   if part.pdu is not None and (now - part.since).total_seconds() >= PART_HOLD_S]
        if waiting:
            docs = [{"_id": sid, "message_id": mid, "route_id": self.route.id, "stat": part.stat,
                     "err": part.receipt.err, "done_at": part.receipt.done_date, "at": now}
                    for mid, sid, part in waiting]
            writes = [ReplaceOne({"_id": d["_id"]}, d, upsert=True) for d in docs]
            await self.store.db["part_receipts"].bulk_write(writes, ordered=False)
            for mid, _, part in waiting:
                if part.session is not None and part.pdu is not None:
                    _ack(part.session, part.pdu)
                part.pdu, part.session = None, None
                log.info("connector message=%s route=%s: part receipt kept in part_receipts while the other parts' "
                         "receipts are awaited", mid, self.route.id)
            self.stats["part_receipts_persisted"] += len(waiting)
        forget = [mid for mid, progress in self.parts.items()
                  if all(p.pdu is None and (now - p.since).total_seconds() >= PART_FORGET_S for p in progress.values())]
        for mid in forget:
            del self.parts[mid]

    async def _load_persisted_parts(self, heads: list[MessageState]) -> None:
        """Fill in part receipts written to `part_receipts` earlier (by us before a restart, or after
        `PART_HOLD_S`) for the long messages whose progress in memory is incomplete."""
        incomplete = [s for s in heads if not set(s.smsc_message_ids) <= set(self.parts.get(s.message_id, ()))]
        if not incomplete:
            return
        ids = [s.message_id for s in incomplete]
        async for d in self.store.db["part_receipts"].find({"message_id": {"$in": ids}}):
            progress = self.parts.setdefault(d["message_id"], {})
            if d["_id"] not in progress:
                at = d["at"]
                progress[d["_id"]] = PartReceipt(ReceiptFields(id=d["_id"], stat=d["stat"], err=d.get("err"),
                                                               done_date=d.get("done_at")), d["stat"], None, None, at)

    async def _settle_unmatched(self, pending: dict[str, Pdus], matched: set[str], now: datetime) -> None:
        orphans: Pdus = []
        for smsc_id, pdus in pending.items():
            held_since = self.held.get(smsc_id, ([], now))[1]
            if smsc_id in matched:
                self.held.pop(smsc_id, None)
            elif smsc_id in self.awaiting_commit or now - held_since < timedelta(seconds=RECEIPT_HOLD_S):
                # The receipt overtook our own commit of `sent`, or a peer's: hold it until that lands.
                self.held[smsc_id] = (pdus, held_since)
            else:
                self.held.pop(smsc_id, None)
                orphans.extend(pdus)
        if orphans:
            await self.store.db["orphan_receipts"].insert_many([_orphan_doc(p, now, "unknown_id") for p, _ in orphans])
            self.stats["orphan_receipts"] += len(orphans)
            log.warning("connector route=%s: %d receipts for unknown smsc ids (e.g. %s)", self.route.id,
                        len(orphans), orphans[0][0].receipted_message_id)
            for p, session in orphans:
                _ack(session, p)


# A submit_sm was not even tried: the route is pausing for throttling (released, not counted).
THROTTLED_BEFORE_SEND = -1


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
