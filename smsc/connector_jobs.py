"""The connector's in-memory batches (`Job` of `Item`) and the events their outcomes become: decided by
core/domain/outcomes.py, written here as `Write`s for the connector's one commit per batch
(smsc/connector.py)."""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.domain.events import EventType
from core.domain.message import (
    MessageState,
    await_topic,
    event_doc,
    lane_of,
    route_topic,
)
from core.domain.outcomes import (
    Before,
    SubmitDecision,
    SubmitReport,
    Verdict,
    decide_submit,
    sent_expires_at,
)
from core.store.lanes import Batch
from core.store.timers import HOLD_S, timer_doc
from core.store.topics import Write
from smsc.status import describe, status_name

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Item:
    """One message of a batch to send, and what came back."""

    job: Job
    state: MessageState
    duplicate: bool  # an earlier owner's attempt may have sent it (policy resend)
    smsc_ids: list[str] = field(default_factory=list)
    status: int = 0
    nack: bool = False
    error: str = ""
    maybe_sent: bool = False
    submitted_at: float = 0.0  # loop time the SMSC took the first part (metrics: accepted -> submit_sm)


@dataclass(eq=False)
class Job:
    """One batch: read, decided, sent, then committed in read order."""

    batch: Batch
    epoch: int
    writes: list[Write]  # decided before sending (canceled, expired, unknown, suspended timers)
    items: list[Item]
    left: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def finish_one(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.done.set()


class Lost(Exception):
    """Our ownership ended (fenced, or the lease ran out locally)."""



class OutcomeWrites:
    """The writes of a batch's messages; mixed into `Connector` (uses its `route`, `default_validity_s`)."""

    def _unsent_write(self, what: Before, state: MessageState, entry: dict[str, Any], lane: str, earlier: bool,
                      now: datetime, job: Job) -> Write:
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

    def _outcome_write(self, item: Item, now: datetime, job: Job) -> Write:
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

    def _retry_write(self, s: MessageState, d: SubmitDecision, item: Item, attempt: int, now: datetime, job: Job,
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


def _names(status: int) -> tuple[str, str]:
    return status_name(status), describe(status)

