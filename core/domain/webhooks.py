"""Status webhooks, the pure part: which events an endpoint wants, the payload and its signature, the
retry schedule, and which target addresses are forbidden (SSRF guard). No I/O: the store
(core/store/webhooks.py) and the workers (core/workers/webhooks_*.py) do that.

Signature (what a receiver checks): `Msgcore-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<raw body>")>`; `Msgcore-Event-Id` is `<message_id>:<seq>`, the same on every retry and replay,
so a receiver can drop duplicates (delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

ALL_EVENTS = "*"
# What a registration may ask for, and what "*" means: the types of core/domain/events.py that are
# facts of a MESSAGE. Facts of other streams in the log (a suppression entry's opted_out / opted_in)
# are not message webhooks.
EVENT_TYPES = frozenset({"accepted", "routed", "sent", "delivered", "undelivered", "failed", "retry", "expired",
                         "rejected", "canceled", "dead_lettered", "billed", "inbound", "requeued", "unknown",
                         "released", "bounced", "complained"})
SIGNATURE_HEADER = "Msgcore-Signature"
EVENT_ID_HEADER = "Msgcore-Event-Id"
MAX_URL_CHARS = 2048

# Cloud instance-metadata endpoints that are not link-local (169.254.169.254 and fd00:ec2::254 are
# covered by the link-local and private checks; these are listed so the reason is explicit).
METADATA_ADDRESSES = frozenset({ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "192.0.0.192", "fd00:ec2::254")})


class AddressClass(StrEnum):
    PUBLIC = "public"
    LOOPBACK = "loopback"
    PRIVATE = "private"
    LINK_LOCAL = "link_local"
    METADATA = "metadata"
    RESERVED = "reserved"  # unspecified, multicast, reserved ranges: never a webhook receiver


class InvalidWebhookUrl(ValueError):
    """The URL cannot be a webhook target at all (scheme, host, length)."""


def classify_address(address: str) -> AddressClass:
    """The class of one IP address (v4 or v6; an IPv4-mapped IPv6 address is judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return AddressClass.METADATA
    if ip.is_loopback:
        return AddressClass.LOOPBACK
    if ip.is_link_local:
        return AddressClass.LINK_LOCAL
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return AddressClass.RESERVED
    if ip.is_private or (isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10")):
        return AddressClass.PRIVATE
    return AddressClass.PUBLIC


def forbidden_addresses(addresses: Iterable[str], allow_loopback: bool) -> dict[str, AddressClass]:
    """The addresses a request must not go to (address -> class); empty means all are allowed.
    A host is refused if ANY of its addresses is forbidden: the client may connect to any of them."""
    out: dict[str, AddressClass] = {}
    for a in addresses:
        cls = classify_address(a)
        if cls is AddressClass.PUBLIC or (cls is AddressClass.LOOPBACK and allow_loopback):
            continue
        out[a] = cls
    return out


def wants(event_types: Sequence[str], event_type: str) -> bool:
    """Whether a registration for `event_types` (or ["*"]: every message event type) receives an event
    of `event_type`."""
    if ALL_EVENTS in event_types:
        return event_type in EVENT_TYPES
    return event_type in event_types


def event_id(message_id: str, seq: int) -> str:
    return f"{message_id}:{seq}"


def payload(event: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of one event: `{"id", "message_id", "type", "seq", "at", "data"}` (JSON-able:
    datetimes as ISO 8601 UTC text)."""
    return {"id": event_id(event["message_id"], int(event["seq"])), "message_id": event["message_id"],
            "type": event["type"], "seq": int(event["seq"]), "at": _jsonable(event["at"]),
            "data": _jsonable(event.get("data") or {})}


def body_bytes(item: Mapping[str, Any]) -> bytes:
    """The raw body sent (and signed): compact JSON."""
    return json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Msgcore-Signature` header value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def backoff_s(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Seconds to wait before retry number `attempt` (1 = first retry): exponential, capped, with
    full jitter in [half, whole] so that many failing deliveries do not retry in lock step."""
    ceiling = min(cap_s, base_s * float(2 ** min(max(attempt - 1, 0), 40)))
    return ceiling / 2 + rng.random() * ceiling / 2


def gives_up(first_try_at: datetime, now: datetime, max_age_s: float) -> bool:
    """Whether a delivery first tried at `first_try_at` is out of time: recorded as `webhook_failed`."""
    return (now - first_try_at).total_seconds() >= max_age_s


def succeeded(status: int | None) -> bool:
    return status is not None and 200 <= status < 300


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)  # an ObjectId or Decimal in data: its text
