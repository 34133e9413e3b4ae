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
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pydantic

from core.domain.events import Event


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

_PARTS_TYPES = frozenset({"accepted", "sent", "billed"})
_BILLED_KEYS = ("parts", "price_per_part", "amount", "currency")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return str(value)  # ObjectId and friends: keep the audit copy readable rather than fail


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


def event_row(doc: Mapping[str, Any]) -> tuple[Any, ...]:
    """The temp-table row (columns `ROW_COLUMNS`) for one event document.

    Raises UnprojectableEvent (naming message_id and seq) when the document does not match the
    shape documented in `core.domain.events`.
    """
    try:
        ev = Event.from_doc(dict(doc))
        data = ev.data
        kind = ev.type.value
        route_id = ev.route_id if ev.route_id is not None else _str_or_none(data, "route_id")
        smsc_ids = data.get("smsc_message_ids") or []
        smsc_id = str(smsc_ids[0]) if kind == "sent" and smsc_ids else _str_or_none(data, "smsc_message_id")
        if kind == "billed":
            missing = [k for k in _BILLED_KEYS if data.get(k) is None]
            if missing:
                raise ValueError(f"billed event lacks data.{', data.'.join(missing)} (needed by billing_ledger)")
        data_json = json.dumps(data, default=_json_default, separators=(",", ":"))
        if "\\u0000" in data_json:
            raise ValueError("data contains a NUL character, which PostgreSQL jsonb rejects")
        return (
            ev.message_id, ev.seq, kind, ev.at, ev.tenant_id, route_id, ev.channel, data_json,
            _str_or_none(data, "campaign_id") if kind == "accepted" else None,
            _str_or_none(data, "to") if kind == "accepted" else None,
            _str_or_none(data, "sender") if kind == "accepted" else None,
            _str_or_none(data, "encoding") if kind == "accepted" else None,
            _int_or_none(data, "parts") if kind in _PARTS_TYPES else None,
            _int_or_none(data, "price_per_part") if kind in ("routed", "billed") else None,
            _str_or_none(data, "currency") if kind in ("routed", "billed") else None,
            _int_or_none(data, "amount") if kind == "billed" else None,
            smsc_id,
            _int_or_none(data, "error_code") if kind in ("retry", "failed") else None,
            _int_or_none(data, "attempt") if kind in ("sent", "retry", "failed") else None,
        )  # fmt: skip
    except (pydantic.ValidationError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UnprojectableEvent(doc.get("message_id"), doc.get("seq"), str(e)) from e


def dedupe_rows(rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with one entry per (message_id, seq), first one kept.

    Needed because a duplicate inside one batch would be inserted once but marked fresh twice.
    """
    seen: dict[tuple[str, int], tuple[Any, ...]] = {}
    for row in rows:
        seen.setdefault((row[0], row[1]), row)
    return list(seen.values())
