"""Event document -> reporting row: the one place that reads the shape of an event document.

`event_row` turns a document of the `events` collection (shape in `core.domain.events`) into one row
of the writer's temp table (columns `ROW_COLUMNS`); `projections.writer` turns batches of such rows
into the reporting tables. Pure: no I/O.

Only the documented fields are read. Fields the event log adds for its own bookkeeping (`_id`, and
`topic` / `pos`, an event's position in the input topic of the stage it hands work to) are not facts
about the message: they are neither required nor copied into `message_events.data`.

An event whose type is unknown, or whose data lacks what a reporting table needs, raises
`UnprojectableEvent`: the projector stops loudly rather than skip a fact.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from core.domain.events import SCHEMA_VERSION, EventType


class UnprojectableEvent(ValueError):
    """An event document that cannot be projected; the projector stops rather than skip it."""

    def __init__(self, message_id: object, seq: object, reason: str) -> None:
        super().__init__(f"event message_id={message_id!r} seq={seq!r} cannot be projected: {reason}")
        self.message_id = message_id
        self.seq = seq
        self.reason = reason


# Columns of the writer's per-connection temp table, in the order `event_row` produces them.
ROW_COLUMNS = (
    "message_id", "seq", "type", "at", "tenant_id", "route_id", "channel", "data",
    "campaign_id", "to_number", "sender", "encoding", "parts", "price_per_part", "currency",
    "amount", "smsc_message_id", "error_code", "attempt",
)  # fmt: skip

_EVENT_TYPES = frozenset(t.value for t in EventType)
_PARTS_TYPES = frozenset({"accepted", "sent", "billed"})
_PRICED_TYPES = frozenset({"routed", "billed"})
_ERROR_TYPES = frozenset({"retry", "failed"})
_ATTEMPT_TYPES = frozenset({"sent", "retry", "failed"})
_BILLED_KEYS = ("parts", "price_per_part", "amount", "currency")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return str(value)  # ObjectId and friends: keep the audit copy readable rather than fail


_dumps = json.JSONEncoder(default=_json_default, separators=(",", ":")).encode


def _int_or_none(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"data.{key} must be an integer, got {value!r}")
    return value


def _str_or_none(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else str(value)


def _header(doc: Mapping[str, Any]) -> tuple[str, int, str, datetime, str, str | None, str, dict[str, Any]]:
    """The top-level fields, checked as `core.domain.events.Event` declares them (without pydantic:
    this runs for every event; the log holds what `Event.to_doc` wrote, so no coercion is needed)."""
    message_id, seq, kind, at, tenant_id = doc["message_id"], doc["seq"], doc["type"], doc["at"], doc["tenant_id"]
    route_id, channel, data = doc.get("route_id"), doc.get("channel", "sms"), doc.get("data", {})
    version = doc.get("v", SCHEMA_VERSION)
    if type(message_id) is not str or type(tenant_id) is not str or type(channel) is not str:
        raise TypeError("message_id, tenant_id and channel must be strings")
    if type(seq) is not int or seq < 1:
        raise ValueError(f"seq must be an integer >= 1, got {seq!r}")
    if kind not in _EVENT_TYPES:
        raise ValueError(f"unknown event type {kind!r}")
    if not isinstance(at, datetime):
        raise TypeError(f"at must be a datetime, got {at!r}")
    if at.tzinfo is None:  # BSON dates come back naive unless the client is tz_aware
        at = at.replace(tzinfo=UTC)
    if route_id is not None and type(route_id) is not str:
        raise TypeError(f"route_id must be a string or null, got {route_id!r}")
    if type(version) is not int:
        raise TypeError(f"v must be an integer, got {version!r}")
    if not isinstance(data, dict):
        raise TypeError(f"data must be a document, got {data!r}")
    return message_id, seq, str(kind), at, tenant_id, route_id, channel, data


def event_row(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    """The temp-table row (columns `ROW_COLUMNS`) for one event document.

    Raises UnprojectableEvent (naming message_id and seq) when the document does not match the
    shape documented in `core.domain.events`.
    """
    try:
        message_id, seq, kind, at, tenant_id, route_id, channel, data = _header(doc)
        if route_id is None:
            route_id = _str_or_none(data, "route_id")
        smsc_ids = data.get("smsc_message_ids") or []
        smsc_id = str(smsc_ids[0]) if kind == "sent" and smsc_ids else _str_or_none(data, "smsc_message_id")
        if kind == "billed":
            missing = [k for k in _BILLED_KEYS if data.get(k) is None]
            if missing:
                raise ValueError(f"billed event lacks data.{', data.'.join(missing)} (needed by billing_ledger)")
        data_json = _dumps(data)
        if "\\u0000" in data_json:
            raise ValueError("data contains a NUL character, which PostgreSQL jsonb rejects")
        accepted, priced = kind == "accepted", kind in _PRICED_TYPES
        return (
            message_id, seq, kind, at, tenant_id, route_id, channel, data_json,
            _str_or_none(data, "campaign_id") if accepted else None,
            _str_or_none(data, "to") if accepted else None,
            _str_or_none(data, "sender") if accepted else None,
            _str_or_none(data, "encoding") if accepted else None,
            _int_or_none(data, "parts") if kind in _PARTS_TYPES else None,
            _int_or_none(data, "price_per_part") if priced else None,
            _str_or_none(data, "currency") if priced else None,
            _int_or_none(data, "amount") if kind == "billed" else None,
            smsc_id,
            _int_or_none(data, "error_code") if kind in _ERROR_TYPES else None,
            _int_or_none(data, "attempt") if kind in _ATTEMPT_TYPES else None,
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UnprojectableEvent(doc.get("message_id"), doc.get("seq"), str(e)) from e


def dedupe_rows(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with one entry per (message_id, seq), first one kept.

    Needed because a duplicate inside one batch would be inserted once but marked fresh twice.
    """
    seen: dict[tuple[str, int], tuple[Any, ...]] = {}
    for row in rows:
        seen.setdefault((row[0], row[1]), row)
    return list(seen.values())
