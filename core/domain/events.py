"""Lifecycle events: immutable, past-tense facts about one message, stored as documents in `events`.

Document shape in MongoDB (collection `events`, unique index on (message_id, seq)):

    {message_id: str, seq: int (1, 2, 3 ... per message), type: str, at: datetime (UTC),
     tenant_id: str, route_id: str | None, channel: "sms" | "email", v: int (schema version),
     data: {...}, topic: str (optional), pos: int (optional)}

An event that hands work to the next stage carries `topic` (that stage's input topic) and `pos` (its
dense position there); see core/store/topics.py.

`data` per type (all keys present unless marked optional):

    accepted      to, sender, text, encoding ("gsm7"|"ucs2"), parts, priority (10 transactional,
                  0 marketing), validity_s, send_at (datetime|None), campaign_id (None), client_ref
                  (None); campaign messages also campaign_row (the CSV row they came from) and have no
                  send_at or validity of their own (the campaign's lane holds them until it runs);
                  an e-mail (channel "email", core/domain/email.py): to and sender are addresses
                  (normalised), text the plain body ("" when html only), encoding "utf-8", parts 1,
                  and also subject, html ("" when text only), from_name (""), reply_to ("")
    routed        route_id, price_per_part (int, minor units), currency, strategy
    sent          route_id, smsc_message_ids (list[str], one per part), attempt, parts; an e-mail
                  (core/workers/mailer.py): smsc_message_ids [], provider_message_id (the provider's
                  queue/message id), message_id_header (its Message-ID), provider ("smtp"|"sendgrid"),
                  breaker (the route's breaker state), possible_duplicate (optional); `billed` follows
                  in the same commit (an e-mail is billed when its provider takes it)
    retry         route_id, attempt, error_code (int), error_name, next_at (datetime); an e-mail's
                  also breaker (the route's breaker state after this outcome: "closed" | "open" |
                  "half_open"), error_name e.g. "SMTP_451", "HTTP_503", "CIRCUIT_OPEN", "NOT_SENT"
    failed        route_id (or None), attempt, error_code (int|None), error_name, reason (an
                  e-mail: the provider's code, e.g. 550, and text)
    delivered     route_id, smsc_message_id, stat, err, done_at (datetime|None); for a long message
                  (optional) parts: [{smsc_message_id, stat, err, done_at}, ...] one per part in
                  order, recorded once every part's receipt is in
                  an e-mail's (from its provider's event webhook, core/domain/email_events.py): route_id,
                  provider_event_id (e.g. SendGrid's sg_event_id: applied once), provider_message_id,
                  provider_event ("delivered"), done_at (the provider's time, or None), response
    undelivered   route_id, smsc_message_id, stat, err, done_at (datetime|None), parts (optional, as
                  above); smsc_message_id/stat/err are those of the first part that was not DELIVRD
    bounced       an e-mail the provider could not deliver: route_id, provider_event_id, provider_message_id,
                  provider_event ("bounce" | "dropped"), bounce_type ("hard": the address is bad, it goes on
                  the tenant's suppression list for e-mail; "soft": refused for now), code (e.g. "5.1.1"),
                  reason (the provider's text), bounced_at (datetime|None); follows sent or delivered
    complained    the recipient reported the e-mail as spam: route_id, provider_event_id, provider_message_id,
                  provider_event ("spamreport"), complained_at (datetime|None); the address goes on the
                  tenant's suppression list for e-mail; follows sent or delivered
    expired       reason
    billed        route_id, parts, price_per_part, amount (int, minor units), currency
    rejected      reason ("opted_out": the recipient is on the tenant's suppression list; then also
                  scope, the entry's sender id or "*"; an e-mail's reason is "suppressed"); written in the
                  acceptance transaction
    canceled      reason; attempted (bool, campaign cancel: an earlier attempt's lease had expired
                  without an outcome, so the SMSC may have it)
    dead_lettered reason, attempts
    unknown       route_id, attempt, reason, smsc_message_ids (of the attempt, if any): an attempt's
                  outcome is unknown (the connector died or lost its bind mid-submit) and the route's
                  policy is `hold`: the message waits for an operator (`msgcore dead-letters requeue
                  --state unknown`) instead of being sent again
    requeued      reason (str, the operator's), actor (str, who requeued: e.g. "cli:alice", "admin-api"),
                  previous_state ("dead_lettered" | "failed"); an operator's retry: the message goes
                  back to `retry` (queue "route") with its attempt budget reset and no excluded routes
    released      reason (why it waited: "retry", "send_at", "tenant_suspended"), topic (the stage's
                  topic it was handed back to): a timer fell due; the state does not change
    inbound       from, to, text, smsc_message_id (optional), reply_to (message id, optional),
                  udh (optional: {ref, total, index} when the MO is one part of a concatenated text),
                  consent (optional: the keyword's action, "stop" | "stop_all" | "start", when the text
                  was an opt-out keyword; the list changes are `opted_out` / `opted_in` events)

Consent (core/domain/consent.py): a suppression entry (tenant, channel, address, scope) is a stream of
its own, `message_id` "sup:<tenant>:<channel>:<address>:<scope>" (no topic, no position), whose fold
is the entry's state; core/store/suppressions.py keeps it as a document written in the same
transaction:

    opted_out     address, scope (a sender id, or "*" for every sender), source ("keyword" | "api" |
                  "import" | "cli" | "bounce" | "complaint": an e-mail's provider event), actor (who:
                  "mo:<inbound id>", "api:<key prefix>", "provider:<route id>:<provider event id>", ...), reason,
                  keyword (optional, for source "keyword"), inbound_id (optional)
    opted_in      as opted_out: the entry no longer blocks

Money is integer minor units (e.g. 1 = 0.01 EUR); times are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


class EventType(StrEnum):
    ACCEPTED = "accepted"
    ROUTED = "routed"
    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    EXPIRED = "expired"
    BILLED = "billed"
    REJECTED = "rejected"
    CANCELED = "canceled"
    DEAD_LETTERED = "dead_lettered"
    INBOUND = "inbound"
    REQUEUED = "requeued"
    UNKNOWN = "unknown"
    RELEASED = "released"
    OPTED_OUT = "opted_out"
    OPTED_IN = "opted_in"
    BOUNCED = "bounced"
    COMPLAINED = "complained"


class Event(BaseModel):
    """One fact in a message's life. `seq` is its position in the message's stream (1-based)."""

    model_config = ConfigDict(frozen=True)

    message_id: str
    seq: int = Field(ge=1)
    type: EventType
    at: datetime
    tenant_id: str
    route_id: str | None = None
    channel: str = "sms"
    v: int = SCHEMA_VERSION
    data: dict[str, Any] = Field(default_factory=dict)
    # Where the message's outcome is reported to its submitter (e.g. "dlr:<smpp account>"): set on
    # every event of such a message; its final events take a position in that topic (NOTIFY_TYPES).
    notify: str | None = None

    def to_doc(self) -> dict[str, Any]:
        doc = {
            "message_id": self.message_id,
            "seq": self.seq,
            "type": self.type.value,
            "at": self.at,
            "tenant_id": self.tenant_id,
            "route_id": self.route_id,
            "channel": self.channel,
            "v": self.v,
            "data": self.data,
        }
        if self.notify is not None:
            doc["notify"] = self.notify
        return doc

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Event:
        at = doc["at"]
        if at.tzinfo is None:  # BSON dates come back naive unless the client is tz_aware
            at = at.replace(tzinfo=UTC)
        return cls(
            message_id=doc["message_id"],
            seq=doc["seq"],
            type=EventType(doc["type"]),
            at=at,
            tenant_id=doc["tenant_id"],
            route_id=doc.get("route_id"),
            channel=doc.get("channel", "sms"),
            v=doc.get("v", SCHEMA_VERSION),
            data=doc.get("data", {}),
            notify=doc.get("notify"),
        )


def utcnow() -> datetime:
    """Now in UTC, truncated to milliseconds: BSON dates keep milliseconds, so a time read back from
    the log equals the one the domain decided with."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
