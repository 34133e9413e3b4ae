"""How an accepted message enters the pipeline: its `accepted` event handed to the router's topic
of its lane, or, when it is scheduled for later (`send_at`), to a timer that hands it over then.

Every entry point (the messages API, campaign uploads, any later one) builds its writes here."""

from __future__ import annotations

from datetime import datetime

from core.domain.events import Event
from core.domain.message import lane_of, route_topic, state_of_accepted
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
