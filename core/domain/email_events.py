"""An e-mail provider's later events (SendGrid's Event Webhook) and what they mean for a message. Pure:
parsing, the signed content, the mapping to msgcore events and the suppressions they cause. The ECDSA
check itself needs a crypto library, which the domain may not import: core/email_signatures.py.

SendGrid posts a JSON array of events; each has `event`, `email`, `timestamp` (unix seconds),
`sg_event_id` (unique per event: our exactly-once key) and `sg_message_id`, whose part before the
first "." is the `X-Message-Id` the provider answered when it took the mail, i.e. the
`provider_message_id` of the message's `sent` event. The Signed Event Webhook signs
`<X-Twilio-Email-Event-Webhook-Timestamp header><raw body>` with ECDSA P-256 / SHA-256; the signature
(base64 DER) is in `X-Twilio-Email-Event-Webhook-Signature`; the route holds the public key.

Mapping (msgcore event, data in core/domain/events.py):

    delivered                          -> delivered
    bounce, type "bounce" (or none)    -> bounced, bounce_type "hard"  (suppresses the address)
    bounce, type "blocked"             -> bounced, bounce_type "soft"  (the receiving side refused for
                                          now: reputation, content; not the address)
    dropped, reason about the address  -> bounced, bounce_type "hard"  (SendGrid will not send to it)
    dropped, another reason            -> bounced, bounce_type "soft"
    spamreport                         -> complained                   (suppresses the address)
    processed, deferred, open, click, unsubscribe, group_(un|re)subscribe -> not recorded (counted)

An event is applied only where the lifecycle allows it (`ALLOWED_FROM` in core/domain/message.py);
one that no longer fits (a `delivered` after a bounce, a second complaint) is `stale`: counted, not
written, so a provider's retry of it is judged the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.domain.events import EventType
from core.domain.message import ALLOWED_FROM, MessageState

SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
MAX_EVENTS = 5000  # per POST (SendGrid batches far fewer); more is refused whole
HARD, SOFT = "hard", "soft"
# `dropped` reasons that are about the address itself (SendGrid's own lists): as final as a bounce.
ADDRESS_DROP_REASONS = frozenset({"bounced address", "unsubscribed address", "spam reporting address", "invalid"})
IGNORED_EVENTS = frozenset({"processed", "deferred", "open", "click", "unsubscribe", "group_unsubscribe",
                            "group_resubscribe"})


class InvalidEvents(ValueError):
    """The body is not a SendGrid event batch at all: `code` "invalid_json" (not JSON) or
    "invalid_events" (not an array, too many events)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ProviderEvent:
    """One provider event, as msgcore reads it. `kind` is the msgcore event type it maps to
    ("delivered" | "bounced" | "complained") or "ignored"."""

    event_id: str
    kind: str
    provider_event: str
    provider_message_id: str
    email: str
    at: datetime | None
    bounce_type: str = ""
    status: str = ""
    reason: str = ""
    response: str = ""

    @property
    def suppresses(self) -> bool:
        """A hard bounce or a complaint puts the address on the tenant's suppression list."""
        return (self.kind == "bounced" and self.bounce_type == HARD) or self.kind == "complained"


@dataclass(frozen=True)
class ParsedBatch:
    events: list[ProviderEvent]
    malformed: list[str]  # why each unusable item was skipped (no id, no message id, not an object)


def signed_content(timestamp: str, body: bytes) -> bytes:
    """What SendGrid signs: the timestamp header's value followed by the raw body, byte for byte."""
    return timestamp.encode() + body


def provider_message_id(sg_message_id: str) -> str:
    """The X-Message-Id part of an `sg_message_id` ("<id>.filter...-0.0" -> "<id>")."""
    return sg_message_id.split(".", 1)[0].strip()


def parse_sendgrid(body: bytes) -> ParsedBatch:
    """The events of a SendGrid Event Webhook body. Raises InvalidEvents when the body is no JSON
    array or holds more than MAX_EVENTS items; an unusable item is skipped and named in `malformed`."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidEvents("invalid_json", f"request body is not valid JSON: {e}") from e
    if not isinstance(raw, list):
        raise InvalidEvents("invalid_events", "not a JSON array of events")
    if len(raw) > MAX_EVENTS:
        raise InvalidEvents("invalid_events", f"{len(raw)} events in one request, at most {MAX_EVENTS}")
    events: list[ProviderEvent] = []
    malformed: list[str] = []
    for i, item in enumerate(raw):
        event = _parse_one(item)
        if isinstance(event, str):
            malformed.append(f"item {i}: {event}")
        else:
            events.append(event)
    return ParsedBatch(events, malformed)


def _text(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    return "" if value is None else str(value)[:1000]


def _parse_one(item: object) -> ProviderEvent | str:
    """The event, or why it cannot be used."""
    if not isinstance(item, dict):
        return "not an object"
    name, event_id = _text(item, "event"), _text(item, "sg_event_id")
    if not event_id:
        return f"event {name!r} without sg_event_id"
    pmid = provider_message_id(_text(item, "sg_message_id"))
    kind, bounce_type = _kind(name, _text(item, "type"), _text(item, "reason"))
    if not pmid and kind != "ignored":
        return f"event {event_id} ({name}) without sg_message_id"
    return ProviderEvent(event_id=event_id, kind=kind, provider_event=name, provider_message_id=pmid,
                         email=_text(item, "email").strip(), at=_time(item.get("timestamp")),
                         bounce_type=bounce_type, status=_text(item, "status"), reason=_text(item, "reason"),
                         response=_text(item, "response"))


def _kind(name: str, bounce_kind: str, reason: str) -> tuple[str, str]:
    if name == "delivered":
        return "delivered", ""
    if name == "bounce":
        return "bounced", SOFT if bounce_kind == "blocked" else HARD
    if name == "dropped":
        about_address = reason.strip().rstrip(".").lower() in ADDRESS_DROP_REASONS
        return "bounced", HARD if about_address else SOFT
    if name == "spamreport":
        return "complained", ""
    return "ignored", ""


def _time(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def applicable(state: MessageState, event: ProviderEvent) -> bool:
    """Whether `event` may follow the message's current state (else it is stale)."""
    if event.kind == "ignored" or state.channel != "email":
        return False
    return state.state in ALLOWED_FROM[EventType(event.kind)]


def event_data(event: ProviderEvent, route_id: str) -> dict[str, Any]:
    """The `data` of the msgcore event a provider event becomes (shapes in core/domain/events.py)."""
    data: dict[str, Any] = {"route_id": route_id, "provider_event_id": event.event_id,
                            "provider_message_id": event.provider_message_id, "provider_event": event.provider_event}
    if event.kind == "delivered":
        data.update(done_at=event.at, response=event.response)
    elif event.kind == "bounced":
        data.update(bounce_type=event.bounce_type, code=event.status, reason=event.reason, bounced_at=event.at)
    else:
        data.update(complained_at=event.at)
    return data
