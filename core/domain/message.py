"""The message lifecycle as two pure functions: `evolve(state, event)` and the `decide_*` functions.

A message's head in MongoDB is `fold(events)`, cached. Every stage of the pipeline works on heads in
one *queue* (the stage that must act next); the queue follows from the state alone.

    accepted ─route─> routed ─submit_sm─> sent ─receipt─> delivered | undelivered ─> (billed)
       │ ▲              │                   └─validity─> expired ─────────────────> (billed)
       │ └──── retry <──┤ (temporary error: back to the router, avoiding that route)
       └──> failed <────┘ (permanent error, no route, attempts exhausted -> dead_lettered)

    failed | dead_lettered ─requeued (operator)─> retry (attempts 0, no excluded routes) ─> router

`billed` does not change the delivery state; it sets `billed` and empties the queue.

Lanes: the two stages whose capacity is shared (the router and each route's connector) read one queue
per *lane*, so that bulk work never stands in front of a one-time password. The shared lane (`""`)
holds every transactional message submitted one by one or in API batches; a campaign has its own lane
(`c:<campaign id>`), and a tenant's marketing messages submitted through the API share that tenant's
lane (`t:<tenant id>`). The queue name is the stage plus the lane: `route`, `route~c:42`,
`send:sim~t:acme`. Which lanes are claimed, and in which proportion, is decided by
`core.domain.fairness`; the lane itself follows from the accepted event, so a rebuilt head lands in
the same queue.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from core.domain.errors import InvalidTransition
from core.domain.events import SCHEMA_VERSION, Event, EventType

# Which states each event may follow (None = a new stream).
ALLOWED_FROM: dict[EventType, frozenset[str | None]] = {
    EventType.ACCEPTED: frozenset({None}),
    EventType.INBOUND: frozenset({None}),
    EventType.ROUTED: frozenset({"accepted", "retry"}),
    EventType.SENT: frozenset({"routed"}),
    EventType.RETRY: frozenset({"routed", "sent"}),
    EventType.FAILED: frozenset({"accepted", "retry", "routed"}),
    EventType.DELIVERED: frozenset({"sent", "expired"}),
    EventType.UNDELIVERED: frozenset({"sent", "expired"}),
    EventType.EXPIRED: frozenset({"accepted", "retry", "routed", "sent"}),
    EventType.BILLED: frozenset({"delivered", "undelivered", "expired"}),
    EventType.REJECTED: frozenset({"accepted", "retry"}),
    EventType.CANCELED: frozenset({"accepted", "retry", "routed"}),
    EventType.DEAD_LETTERED: frozenset({"accepted", "retry", "routed", "sent"}),
    EventType.REQUEUED: frozenset({"dead_lettered", "failed", "unknown"}),
    EventType.UNKNOWN: frozenset({"routed"}),
    EventType.RELEASED: frozenset({"accepted", "retry", "routed"}),
    # A suppression entry's stream (core/domain/consent.py): out and in, alternately.
    EventType.OPTED_OUT: frozenset({None, "opted_in"}),
    EventType.OPTED_IN: frozenset({"opted_out"}),
    # An e-mail provider's later events (core/domain/email_events.py): a bounce may follow `delivered`.
    EventType.BOUNCED: frozenset({"sent", "delivered"}),
    EventType.COMPLAINED: frozenset({"sent", "delivered"}),
}

TERMINAL_STATES = frozenset(
    {"delivered", "undelivered", "expired", "failed", "rejected", "canceled", "dead_lettered", "inbound", "unknown",
     "opted_out", "opted_in",  # these two: a suppression entry's stream, which no stage acts on
     "bounced", "complained"}
)


@dataclass(frozen=True)
class MessageState:
    """The fold of one message's events: what every stage needs to decide."""

    message_id: str
    tenant_id: str
    state: str
    version: int
    channel: str = "sms"
    to: str = ""
    sender: str = ""
    text: str = ""
    encoding: str = "gsm7"
    parts: int = 1
    priority: int = 0
    validity_s: int = 0
    accepted_at: datetime | None = None
    send_at: datetime | None = None
    campaign_id: str | None = None
    route_id: str | None = None
    price_per_part: int = 0
    currency: str = "EUR"
    excluded_routes: tuple[str, ...] = ()
    attempts: int = 0
    smsc_message_ids: tuple[str, ...] = ()
    sent_at: datetime | None = None
    billed: bool = False
    notify: str | None = None  # the topic its outcome is reported to (Event.notify)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def expires_at(self) -> datetime | None:
        start = self.send_at or self.accepted_at
        if start is None or not self.validity_s:
            return None
        return start + timedelta(seconds=self.validity_s)


TRANSACTIONAL_PRIORITY = 10  # `priority` of transactional traffic; marketing is 0
LANE_SEPARATOR = "~"


def lane_of(state: MessageState) -> str:
    """The lane a message waits in at the router and the connector ("" = the shared lane)."""
    if state.campaign_id:
        return campaign_lane(state.campaign_id)
    if state.priority < TRANSACTIONAL_PRIORITY:
        return tenant_lane(state.tenant_id)
    return ""


def campaign_lane(campaign_id: str) -> str:
    return f"c:{campaign_id}"


def tenant_lane(tenant_id: str) -> str:
    return f"t:{tenant_id}"


def queue_name(stage: str, lane: str) -> str:
    """`stage` ("route" or "send:<route id>") in `lane`."""
    return f"{stage}{LANE_SEPARATOR}{lane}" if lane else stage


def route_topic(lane: str) -> str:
    """The router's input topic of `lane`."""
    return queue_name("route", lane)


PARTITION_SEPARATOR = "#"
# The events that end a message (its outcome): a message submitted with `notify` (e.g. an SMPP
# account's receipts topic, "dlr:<account>") has each of them handed to that topic.
NOTIFY_TYPES = frozenset({"delivered", "undelivered", "expired", "failed", "rejected", "canceled", "dead_lettered"})


def notify_topic(doc: dict[str, Any]) -> str | None:
    """The topic an event document is reported to: its `notify`, when it is an outcome."""
    notify: str | None = doc.get("notify")
    return notify if notify is not None and doc["type"] in NOTIFY_TYPES else None



def partition_of(message_id: str, partitions: int) -> int | None:
    """The partition of a route's send topics a message goes to: CRC-32 of its id modulo
    `partitions` (stable across processes and restarts, unlike `hash`); None for an unpartitioned
    route (partitions == 1)."""
    if partitions <= 1:
        return None
    return zlib.crc32(message_id.encode()) % partitions


def send_stage(route_id: str, partition: int | None = None) -> str:
    """The connector stage of a route, or of one partition of it: "send:sim", "send:sim#3"."""
    return f"send:{route_id}" if partition is None else f"send:{route_id}{PARTITION_SEPARATOR}{partition}"


def send_topic(route_id: str, lane: str, partition: int | None = None) -> str:
    """The input topic of route `route_id`'s connector (of `partition`, for a partitioned route) for
    `lane`: "send:sim~c:42", "send:sim#3~c:42"."""
    return queue_name(send_stage(route_id, partition), lane)


def send_topics(route_id: str, lane: str, partitions: int) -> list[str]:
    """Every send topic of a route for `lane`: one, or one per partition."""
    if partitions <= 1:
        return [send_topic(route_id, lane)]
    return [send_topic(route_id, lane, p) for p in range(partitions)]


def await_topic(route_id: str) -> str:
    """The topic of `sent` events of a route: read, one validity period behind, by the expirer."""
    return f"await:{route_id}"


def lane_of_topic(topic: str) -> str:
    """The lane part of a topic name: "send:sim~c:42" -> "c:42"; "route" -> ""."""
    return topic.split(LANE_SEPARATOR, 1)[1] if LANE_SEPARATOR in topic else ""


def stage_of(queue: str) -> str:
    """The stage part of a queue name: "send:sim~c:42" -> "send:sim"."""
    return queue.split(LANE_SEPARATOR, 1)[0]


def queue_for(state: MessageState) -> str | None:
    """The stage that must act next on a message in this state, or None when nothing must."""
    if state.state in ("accepted", "retry"):
        return queue_name("route", lane_of(state))
    if state.state == "routed":
        return queue_name(f"send:{state.route_id}", lane_of(state))
    if state.state == "sent":
        return "receipt"
    if state.state in ("delivered", "undelivered", "expired") and not state.billed and state.sent_at is not None:
        return "bill"
    return None


def check_allowed(state: MessageState | None, event_type: EventType, message_id: str) -> None:
    current = state.state if state is not None else None
    if event_type == EventType.BILLED and state is not None and state.billed:
        raise InvalidTransition(message_id, "billed", event_type.value)
    if event_type == EventType.BILLED and state is not None and state.state == "sent" and state.channel == "email":
        return  # an e-mail is billed when its provider takes it (core/workers/mailer.py)
    if current not in ALLOWED_FROM[event_type]:
        raise InvalidTransition(message_id, current, event_type.value)


def evolve(state: MessageState | None, event: Event) -> MessageState:
    """Apply one event. Raises InvalidTransition if the event does not fit the state."""
    check_allowed(state, event.type, event.message_id)
    d = event.data
    if state is None:
        return _new_stream(event)
    s = replace(state, version=event.seq)
    match event.type:
        case EventType.ROUTED:
            return replace(s, state="routed", route_id=d["route_id"], price_per_part=d.get("price_per_part", 0),
                           currency=d.get("currency", s.currency))
        case EventType.SENT:
            return replace(s, state="sent", sent_at=event.at, attempts=d.get("attempt", s.attempts),
                           smsc_message_ids=tuple(d.get("smsc_message_ids", ())))
        case EventType.RETRY:
            excluded = s.excluded_routes
            if d.get("exclude_route") and s.route_id and s.route_id not in excluded:
                excluded = (*excluded, s.route_id)
            return replace(s, state="retry", attempts=d.get("attempt", s.attempts), excluded_routes=excluded)
        case EventType.BILLED:
            return replace(s, billed=True)
        case EventType.RELEASED:
            return s  # a timer fell due: the message goes on from the same state
        case EventType.REJECTED:
            return replace(s, state="rejected", extra={**s.extra, "reason": d.get("reason")})
        case EventType.REQUEUED:
            # An operator's retry: a fresh attempt budget, every route allowed again.
            return replace(s, state="retry", attempts=0, excluded_routes=())
        case _:
            return replace(s, state=event.type.value)


def _new_stream(event: Event) -> MessageState:
    d = event.data
    if event.type == EventType.INBOUND:
        return MessageState(message_id=event.message_id, tenant_id=event.tenant_id, state="inbound",
                            version=event.seq, channel=event.channel, to=d.get("to", ""),
                            sender=d.get("from", ""), text=d.get("text", ""))
    if event.type == EventType.OPTED_OUT:  # a suppression entry: `to` is its address, `sender` its scope
        return MessageState(message_id=event.message_id, tenant_id=event.tenant_id, state="opted_out",
                            version=event.seq, channel=event.channel, to=d.get("address", ""),
                            sender=d.get("scope", ""))
    return MessageState(
        message_id=event.message_id,
        tenant_id=event.tenant_id,
        state="accepted",
        version=event.seq,
        channel=event.channel,
        to=d["to"],
        sender=d["sender"],
        text=d["text"],
        encoding=d.get("encoding", "gsm7"),
        parts=d.get("parts", 1),
        priority=d.get("priority", 0),
        validity_s=d.get("validity_s", 0),
        accepted_at=event.at,
        send_at=d.get("send_at"),
        campaign_id=d.get("campaign_id"),
        notify=event.notify,
    )


def fold(events: list[Event]) -> MessageState | None:
    state: MessageState | None = None
    for event in events:
        state = evolve(state, event)
    return state


def next_event(state: MessageState, event_type: EventType, at: datetime, data: dict[str, Any],
               route_id: str | None = None) -> Event:
    """Build the event that follows `state`, after checking the transition is allowed."""
    check_allowed(state, event_type, state.message_id)
    return Event(
        message_id=state.message_id,
        seq=state.version + 1,
        type=event_type,
        at=at,
        tenant_id=state.tenant_id,
        route_id=route_id if route_id is not None else state.route_id,
        channel=state.channel,
        data=data,
    )


# ---- the hot path: plain documents, no pydantic --------------------------------------------------

def event_doc(state: MessageState, event_type: EventType, at: datetime, data: dict[str, Any],
              route_id: str | None = None, seq: int | None = None) -> dict[str, Any]:
    """The document of the event that follows `state` (seq = version + 1 unless given), after
    checking the transition is allowed. Same shape as `Event.to_doc()`, without building a model."""
    check_allowed(state, event_type, state.message_id)
    doc = {"message_id": state.message_id, "seq": state.version + 1 if seq is None else seq,
           "type": event_type.value, "at": at, "tenant_id": state.tenant_id,
           "route_id": route_id if route_id is not None else state.route_id, "channel": state.channel,
           "v": SCHEMA_VERSION, "data": data}
    if state.notify is not None:
        doc["notify"] = state.notify
    return doc


def state_of_accepted(doc: dict[str, Any]) -> MessageState:
    """The state right after an `accepted` event document (its fold, without a model per event)."""
    d = doc["data"]
    return MessageState(
        message_id=doc["message_id"], tenant_id=doc["tenant_id"], state="accepted", version=doc["seq"],
        channel=doc.get("channel", "sms"), to=d["to"], sender=d["sender"], text=d["text"],
        encoding=d.get("encoding", "gsm7"), parts=d.get("parts", 1), priority=d.get("priority", 0),
        validity_s=d.get("validity_s", 0), accepted_at=doc["at"], send_at=d.get("send_at"),
        campaign_id=d.get("campaign_id"), notify=doc.get("notify"))


def routed_message(state: MessageState) -> dict[str, Any]:
    """What the connector needs of a message, copied into its `routed` event so that the connector's
    hot path reads no other event."""
    return {"to": state.to, "sender": state.sender, "text": state.text, "encoding": state.encoding,
            "parts": state.parts, "priority": state.priority, "campaign_id": state.campaign_id,
            "attempt": state.attempts, "expires_at": state.expires_at, "accepted_at": state.accepted_at}


def state_of_routed(doc: dict[str, Any]) -> MessageState:
    """The state right after a `routed` event document written with `routed_message` in its data."""
    d = doc["data"]
    m = d["message"]
    accepted_at = m.get("accepted_at")
    expires_at = m.get("expires_at")
    validity_s = int((expires_at - accepted_at).total_seconds()) if expires_at and accepted_at else 0
    return MessageState(
        message_id=doc["message_id"], tenant_id=doc["tenant_id"], state="routed", version=doc["seq"],
        channel=doc.get("channel", "sms"), to=m["to"], sender=m["sender"], text=m["text"],
        encoding=m.get("encoding", "gsm7"), parts=m.get("parts", 1), priority=m.get("priority", 0),
        validity_s=validity_s, accepted_at=accepted_at, campaign_id=m.get("campaign_id"),
        route_id=d["route_id"], price_per_part=d.get("price_per_part", 0), currency=d.get("currency", "EUR"),
        attempts=m.get("attempt", 0), notify=doc.get("notify"))
