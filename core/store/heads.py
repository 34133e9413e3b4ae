"""Mapping between the domain's MessageState and the head document in `streams`.

The head is derived data (`msgcore heads rebuild` recreates it from `events`); besides the fold it
holds the queue fields the stages claim by: `queue`, `due_at`, and the lease (`lease_owner`,
`lease_token`, `lease_until`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from core.domain.message import MessageState, queue_for, stage_of

# A lease_until in the past means "not leased"; a fixed value keeps the claim filter a simple range.
NOT_LEASED = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_VALIDITY = timedelta(hours=48)


def due_at_for(
    state: MessageState, queue: str | None, now: datetime, retry_at: datetime | None = None
) -> datetime | None:
    """When the stage owning `queue` should pick the message up."""
    if queue is None:
        return None
    if stage_of(queue) == "route":
        if state.state == "retry" and retry_at is not None:
            return retry_at
        return max(now, state.send_at) if state.send_at else now
    if queue == "receipt":
        return state.expires_at or now + DEFAULT_VALIDITY
    return now


def head_doc(state: MessageState, *, now: datetime, due_at: datetime | None = None,
             queue: str | None = None, keep_queue: bool = False, **extra: Any) -> dict[str, Any]:
    """The full head document for `state`, lease released."""
    q = queue if keep_queue else queue_for(state)
    return {
        "_id": state.message_id,
        "tenant_id": state.tenant_id,
        "state": state.state,
        "version": state.version,
        "queue": q,
        "due_at": due_at if due_at is not None else due_at_for(state, q, now),
        "lease_owner": None,
        "lease_token": None,
        "lease_until": NOT_LEASED,
        "attempts": state.attempts,
        "channel": state.channel,
        "route_id": state.route_id,
        "excluded_routes": list(state.excluded_routes),
        "priority": state.priority,
        "campaign_id": state.campaign_id,
        "msg": {
            "to": state.to,
            "sender": state.sender,
            "text": state.text,
            "encoding": state.encoding,
            "parts": state.parts,
            "validity_s": state.validity_s,
            "send_at": state.send_at,
            "accepted_at": state.accepted_at,
        },
        "price_per_part": state.price_per_part,
        "currency": state.currency,
        "smsc_ids": list(state.smsc_message_ids),
        "sent_at": state.sent_at,
        "billed": state.billed,
        "updated_at": now,
        **extra,
    }


def state_from_head(doc: dict[str, Any]) -> MessageState:
    msg = doc.get("msg", {})
    return MessageState(
        message_id=doc["_id"],
        tenant_id=doc["tenant_id"],
        state=doc["state"],
        version=doc["version"],
        channel=doc.get("channel", "sms"),
        to=msg.get("to", ""),
        sender=msg.get("sender", ""),
        text=msg.get("text", ""),
        encoding=msg.get("encoding", "gsm7"),
        parts=msg.get("parts", 1),
        priority=doc.get("priority", 0),
        validity_s=msg.get("validity_s", 0),
        accepted_at=msg.get("accepted_at"),
        send_at=msg.get("send_at"),
        campaign_id=doc.get("campaign_id"),
        route_id=doc.get("route_id"),
        price_per_part=doc.get("price_per_part", 0),
        currency=doc.get("currency", "EUR"),
        excluded_routes=tuple(doc.get("excluded_routes", ())),
        attempts=doc.get("attempts", 0),
        smsc_message_ids=tuple(doc.get("smsc_ids", ())),
        sent_at=doc.get("sent_at"),
        billed=doc.get("billed", False),
    )
