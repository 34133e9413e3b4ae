"""registered_delivery decisions (core/domain/esme_receipts.py) and the deliver_sm they make
(smsc/esme_server/receipts.py receipt_of): pure, no servers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from core.domain.esme_receipts import (
    final_receipt_wanted,
    intermediate_wanted,
    receipt_mode,
    registered_delivery_of,
    wants_notify,
)
from smsc.esme_server.receipts import receipt_of

FINALS = ["delivered", "undelivered", "expired", "failed", "rejected", "canceled", "dead_lettered"]
AT = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("event_type", FINALS)
def test_final_receipts_by_mode(event_type: str) -> None:
    assert not final_receipt_wanted(0x00, event_type)
    assert final_receipt_wanted(0x01, event_type)
    assert final_receipt_wanted(0x11, event_type)
    assert final_receipt_wanted(0x03, event_type)  # reserved: read as "every outcome"
    assert final_receipt_wanted(0x02, event_type) == (event_type != "delivered")  # failures only
    assert not final_receipt_wanted(0x10, event_type)  # intermediate only


def test_intermediate_only_for_sent_with_bit_4() -> None:
    assert intermediate_wanted(0x10, "sent") and intermediate_wanted(0x11, "sent") and intermediate_wanted(0x12, "sent")
    assert not intermediate_wanted(0x01, "sent") and not intermediate_wanted(0x00, "sent")
    assert not any(intermediate_wanted(0x11, t) for t in FINALS)


def test_which_submits_report_to_the_account() -> None:
    assert [wants_notify(v) for v in (0x00, 0x01, 0x02, 0x10, 0x0C)] == [False, True, True, True, False]
    assert [receipt_mode(v) for v in (0x00, 0x01, 0x02, 0x03, 0x1C)] == [0, 1, 2, 1, 0]


def test_registered_delivery_of_an_accepted_event() -> None:
    assert registered_delivery_of(_accepted(0x11)) == 0x11
    assert registered_delivery_of({"data": {"origin": None}}) == 0  # submitted over REST
    assert registered_delivery_of({"data": {}}) == 0


def _accepted(registered_delivery: int) -> dict[str, Any]:
    return {"message_id": "m1", "seq": 1, "type": "accepted", "at": AT, "data": {
        "to": "+4915112345678", "text": "hello", "origin": {"smpp": {
            "registered_delivery": registered_delivery, "source": "acme", "source_ton": 5, "source_npi": 0,
            "destination": "4915112345678", "dest_ton": 1, "dest_npi": 1}}}}


def _event(event_type: str, **data: Any) -> dict[str, Any]:
    return {"message_id": "m1", "seq": 3, "type": event_type, "at": AT, "data": data}


def test_a_sent_becomes_an_intermediate_notification() -> None:
    r = receipt_of(_event("sent", route_id="sim"), _accepted(0x11))
    assert r is not None
    assert r.fields["esm_class"] == 0x20 and r.fields["message_state"] == 1
    assert r.fields["receipted_message_id"] == "m1"
    assert b"stat:ENROUTE err:000" in r.fields["short_message"]
    assert r.fields["destination_addr"] == "acme" and r.fields["source_addr"] == "4915112345678"
    assert receipt_of(_event("sent"), _accepted(0x01)) is None


def test_failures_only_skips_a_delivered_but_not_an_undelivered() -> None:
    assert receipt_of(_event("delivered", stat="DELIVRD", err="000"), _accepted(0x02)) is None
    r = receipt_of(_event("undelivered", stat="UNDELIV", err="011"), _accepted(0x02))
    assert r is not None and r.fields["esm_class"] == 0x04 and r.fields["message_state"] == 5
    assert b"stat:UNDELIV err:011" in r.fields["short_message"]
