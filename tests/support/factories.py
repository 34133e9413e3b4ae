"""Builders for test data: accepted messages with unique ids, written through the real store."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from core.domain.events import Event, EventType
from core.domain.message import evolve
from core.ids import new_message_id
from core.store.heads import head_doc


def accepted(
    tenant_id: str, now: datetime, to: str = "+4915112345678", text: str = "hello", **data: Any
) -> tuple[Event, dict[str, Any]]:
    """An `accepted` event and its head document, ready for EventStore.accept."""
    body = {"to": to, "sender": "msgcore", "text": text, "encoding": "gsm7", "parts": 1, "priority": 10,
            "validity_s": 3600, "send_at": None, "campaign_id": None, "client_ref": None, **data}
    event = Event(message_id=new_message_id(), seq=1, type=EventType.ACCEPTED, at=now, tenant_id=tenant_id, data=body)
    return event, head_doc(evolve(None, event), now=now)
