"""The events a mailer batch commits for each e-mail, as `Write`s (decisions: core/domain/email.py and
core/domain/outcomes.py; the commit: core/workers/mailer.py).

- sent: `sent` + `billed` in one write (an e-mail is billed when its provider takes it; no topic: no
  receipt is awaited, so no expiry either);
- retry: `retry` and its timer back to the router's topic of the message's lane (the router avoids
  the route when `exclude_route`);
- failed / unknown / canceled / expired: one event, no topic;
- a suspended tenant's e-mail: a timer back to its send topic, no event.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from core.domain.email import EmailContent, MailResult
from core.domain.events import EventType
from core.domain.message import MessageState, event_doc, lane_of, route_topic
from core.domain.outcomes import Before, SubmitDecision, Verdict, billed_data
from core.store.timers import HOLD_S, timer_doc
from core.store.topics import Write


@dataclass(eq=False, slots=True)
class MailItem:
    """One e-mail of a batch, and what came back."""

    state: MessageState
    content: EmailContent
    duplicate: bool  # an earlier owner's open attempt may have sent it (policy resend)
    result: MailResult | None = None
    decision: SubmitDecision | None = None
    attempt: int = 0
    message_id_header: str = ""
    breaker: str = "closed"  # the route's breaker state once this e-mail's outcome was recorded


def outcome_write(item: MailItem, route_id: str, provider: str, now: datetime) -> Write:
    """The write of a sent, retried, failed or unknown e-mail (item.decision is set)."""
    s, d = item.state, item.decision
    assert d is not None and item.result is not None
    if d.verdict == Verdict.SENT:
        data: dict[str, Any] = {
            "route_id": route_id, "smsc_message_ids": [], "provider_message_id": item.result.provider_id,
            "message_id_header": item.message_id_header, "provider": provider, "attempt": item.attempt,
            "parts": 1, "price_per_part": s.price_per_part, "currency": s.currency, "breaker": item.breaker}
        if item.duplicate:
            data["possible_duplicate"] = True
        sent = event_doc(s, EventType.SENT, now, data)
        after = replace(s, state="sent", version=sent["seq"])
        billed = event_doc(after, EventType.BILLED, now, billed_data(route_id, 1, s.price_per_part, s.currency))
        return Write(s.message_id, [sent, billed])
    if d.verdict == Verdict.RETRY:
        return retry_write(s, d, item, route_id, now)
    if d.verdict == Verdict.UNKNOWN:
        return Write(s.message_id, [event_doc(s, EventType.UNKNOWN, now, {
            "route_id": route_id, "attempt": item.attempt, "reason": d.reason, "smsc_message_ids": []})])
    return Write(s.message_id, [event_doc(s, EventType.FAILED, now, {
        "route_id": route_id, "attempt": item.attempt, "error_code": d.error_code, "error_name": d.error_name,
        "reason": d.reason, "breaker": item.breaker})])


def retry_write(s: MessageState, d: SubmitDecision, item: MailItem, route_id: str, now: datetime) -> Write:
    next_at = now + timedelta(seconds=d.retry_in_s)
    data: dict[str, Any] = {"route_id": route_id, "attempt": item.attempt, "error_code": d.error_code,
                            "error_name": d.error_name, "reason": d.reason, "next_at": next_at,
                            "exclude_route": d.exclude_route, "smsc_message_ids": [], "breaker": item.breaker}
    if d.possible_duplicate or item.duplicate:
        data["possible_duplicate"] = True
    doc = event_doc(s, EventType.RETRY, now, data)
    lane = lane_of(s)
    return Write(s.message_id, [doc], timer=timer_doc(
        message_id=s.message_id, tenant_id=s.tenant_id, topic=route_topic(lane), seq=doc["seq"], due_at=next_at,
        reason="retry", lane=lane, campaign_id=s.campaign_id, channel=s.channel))


def unsent_write(what: Before, s: MessageState, topic: str, route_id: str, now: datetime) -> Write:
    """An entry decided before sending: canceled, held (unknown), expired, or a suspended tenant's."""
    if what == Before.CANCEL:
        reason = f"campaign {s.campaign_id} canceled" if s.campaign_id else "lane canceled"
        return Write(s.message_id, [event_doc(s, EventType.CANCELED, now, {"reason": reason, "attempted": False})])
    if what == Before.UNKNOWN:
        return Write(s.message_id, [event_doc(s, EventType.UNKNOWN, now, {
            "route_id": route_id, "attempt": s.attempts + 1, "smsc_message_ids": [],
            "reason": "an earlier attempt's lease expired without an outcome (owner taken over)"})])
    if what == Before.EXPIRE:
        return Write(s.message_id, [event_doc(s, EventType.EXPIRED, now,
                                              {"reason": "validity passed before it could be sent"})])
    lane = lane_of(s)
    return Write(s.message_id, [], timer=timer_doc(
        message_id=s.message_id, tenant_id=s.tenant_id, topic=topic, seq=s.version,
        due_at=now + timedelta(seconds=HOLD_S), reason="tenant_suspended", lane=lane,
        campaign_id=s.campaign_id, channel=s.channel))


def billed_amounts(writes: list[Write]) -> dict[str, int]:
    """Tenant -> amount billed by these writes (for the tenants' spend, in the same commit)."""
    out: dict[str, int] = {}
    for w in writes:
        for e in w.events:
            if e["type"] == "billed":
                out[e["tenant_id"]] = out.get(e["tenant_id"], 0) + int(e["data"]["amount"])
    return out
