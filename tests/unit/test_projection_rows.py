"""Event document -> reporting row (projections.rows): pure, no servers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from projections.rows import ROW_COLUMNS, UnprojectableEvent, event_row

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def doc(kind: str, data: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"message_id": "m1", "seq": 3, "type": kind, "at": AT, "tenant_id": "t1", "route_id": "r1",
            "channel": "sms", "v": 1, "data": data, **top}  # fmt: skip


def column(row: tuple[Any, ...], name: str) -> Any:
    return row[ROW_COLUMNS.index(name)]


def test_topic_and_pos_of_the_log_are_neither_required_nor_copied() -> None:
    data = {"route_id": "r1", "smsc_message_ids": ["s1"], "attempt": 1, "parts": 1}
    plain = event_row(doc("sent", data))
    positioned = event_row(doc("sent", data, topic="await:r1", pos=41))
    assert positioned == plain
    assert json.loads(column(positioned, "data")) == data


def test_released_is_known_and_keeps_its_data() -> None:
    row = event_row(doc("released", {"reason": "retry", "topic": "route~c:42"}, topic="route~c:42", pos=7))
    assert column(row, "type") == "released"
    assert json.loads(column(row, "data")) == {"reason": "retry", "topic": "route~c:42"}
    # No column that would move a messages field beyond route_id (which the merge ignores for it).
    for name in ("campaign_id", "to_number", "parts", "price_per_part", "amount", "error_code", "attempt"):
        assert column(row, name) is None


def test_an_unknown_type_is_refused_with_its_ids() -> None:
    with pytest.raises(UnprojectableEvent) as err:
        event_row(doc("teleported", {}))
    assert (err.value.message_id, err.value.seq) == ("m1", 3)
