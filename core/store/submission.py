"""How an accepted message enters the pipeline: its `accepted` event handed to the router's topic
of its lane, or, when it is scheduled for later (`send_at`), to a timer that hands it over then.

Every entry point (the messages API through core/submission_service.py, campaign uploads, any later
one) describes a new message as a `Submission` and builds its write with `accepted`.

A transactional message whose route is UP may skip the router: `routed_at_acceptance` appends its
`routed` event (seq 2, into the route's send topic) to the same write, so both commit in the
acceptance transaction (DESIGN.md, "folding that keeps the five facts"). A one-time password then
costs one transaction and one stage hop less on its way to the SMSC; everything else (campaigns,
marketing, scheduled messages, no route, a route that is BUSY or DOWN) goes through the router,
which keeps its decisions: strategies, holds, expiry, dead letters.

A message to a number on the tenant's suppression list (core/store/suppressions.py) is accepted and
`rejected` (reason `opted_out`) in the same write (`rejected_at_acceptance`): it takes no position in
any stage's topic nor a timer, so it is never routed, sent or billed; its outcome still reaches its
`notify` topic."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.domain.errors import NoRoute
from core.domain.events import Event, EventType
from core.domain.message import TRANSACTIONAL_PRIORITY, event_doc, lane_of, route_topic, state_of_accepted
from core.domain.routing import Route, RouteStatus, choose_route, routed_event
from core.store.timers import timer_doc
from core.store.topics import Write


def accepted_write(event: Event, now: datetime) -> Write:
    """The write of a new message's `accepted` event (seq 1)."""
    doc = event.to_doc()
    state = state_of_accepted(doc)
    lane = lane_of(state)
    topic = route_topic(lane)
    if state.send_at is not None and state.send_at > now:
        return Write(state.message_id, [doc], [None], timer=timer_doc(
            message_id=state.message_id, tenant_id=state.tenant_id, topic=topic, seq=1, due_at=state.send_at,
            reason="send_at", lane=lane, campaign_id=state.campaign_id, channel=state.channel))
    return Write(state.message_id, [doc], [topic])


@dataclass(frozen=True)
class Submission:
    """One new message. A campaign's messages carry `campaign_id` and `campaign_row` and no send_at
    or validity of their own (validity_s 0): the campaign's lane holds them until it runs."""

    to: str
    sender: str
    text: str
    encoding: str  # "gsm7" | "ucs2"
    parts: int
    transactional: bool = True
    validity_s: int = 0
    send_at: datetime | None = None
    client_ref: str | None = None
    campaign_id: str | None = None
    campaign_row: int | None = None
    channel: str = "sms"
    # The topic its outcome is reported to (e.g. "dlr:<smpp account>": the SMPP server's receipts);
    # None: nobody is told but the API's status and the reporting tables.
    notify: str | None = None
    # Extra fields of the `accepted` data an entry point records (e.g. the SMPP submit's
    # registered_delivery and source TON/NPI); never read by the pipeline.
    origin: dict[str, Any] | None = None
    # An e-mail's own fields of its `accepted` data (core.domain.email.EmailContent.accepted_fields).
    email: dict[str, Any] | None = None


def accepted(message_id: str, tenant_id: str, s: Submission, now: datetime) -> Write:
    """The write of the message's `accepted` event (data as documented in core/domain/events.py)."""
    data: dict[str, Any] = {
        "to": s.to, "sender": s.sender, "text": s.text, "encoding": s.encoding, "parts": s.parts,
        "priority": TRANSACTIONAL_PRIORITY if s.transactional else 0, "validity_s": s.validity_s,
        "send_at": s.send_at, "campaign_id": s.campaign_id, "client_ref": s.client_ref,
    }
    if s.campaign_row is not None:
        data["campaign_row"] = s.campaign_row
    if s.origin:
        data["origin"] = dict(s.origin)
    if s.email:
        data.update(s.email)
    event = Event(message_id=message_id, seq=1, type=EventType.ACCEPTED, at=now, tenant_id=tenant_id,
                  channel=s.channel, data=data, notify=s.notify)
    return accepted_write(event, now)


SHARED_ROUTE_TOPIC = route_topic("")


def routed_at_acceptance(write: Write, routes: Sequence[Route], status: Mapping[str, RouteStatus],
                         rng: random.Random, now: datetime) -> Write:
    """`write` (an `accepted` write) with the message's `routed` event added when the message is
    transactional, due now, and the strategies pick a route that is UP; otherwise `write` unchanged
    (the router decides)."""
    if write.timer is not None or write.topics != [SHARED_ROUTE_TOPIC]:
        return write
    state = state_of_accepted(write.events[0])
    try:
        route = choose_route(routes, state.to, status, (), rng, channel=state.channel)
    except NoRoute:
        return write
    if status.get(route.id) != RouteStatus.UP:
        return write
    doc, topic = routed_event(state, route, now)
    return Write(write.message_id, [write.events[0], doc], [None, topic])



def rejected_at_acceptance(write: Write, now: datetime, reason: str, data: Mapping[str, Any] | None = None) -> Write:
    """`write` (an `accepted` write) as `accepted` + `rejected` (seq 2) with `reason`: no topic, no
    timer (the `rejected` event still goes to the message's notify topic, core.domain.message)."""
    doc = write.events[0]
    rejected = event_doc(state_of_accepted(doc), EventType.REJECTED, now, {"reason": reason, **(data or {})})
    return Write(write.message_id, [doc, rejected], [None, None])
