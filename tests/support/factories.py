"""Builders for test data: accepted messages with unique ids, written through the real store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core.domain.events import Event, EventType
from core.ids import new_message_id
from core.store.submission import accepted_write
from core.store.topics import Write


def accepted(
    tenant_id: str, now: datetime, to: str = "+4915112345678", text: str = "hello", **data: Any
) -> tuple[Event, Write]:
    """An `accepted` event and its write (into the router's topic of its lane, or a `send_at`
    timer), ready for `EventStore.accept([write, ...])`."""
    body = {"to": to, "sender": "msgcore", "text": text, "encoding": "gsm7", "parts": 1, "priority": 10,
            "validity_s": 3600, "send_at": None, "campaign_id": None, "client_ref": None, **data}
    event = Event(message_id=new_message_id(), seq=1, type=EventType.ACCEPTED, at=now, tenant_id=tenant_id, data=body)
    return event, accepted_write(event, now)
