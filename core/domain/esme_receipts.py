"""Which notifications an ESME asked for with `registered_delivery` (SMPP v3.4 section 5.2.17).

    bits 0-1  SMSC delivery receipt: 0 none, 1 on the final outcome (success or failure), 2 on failure
              only, 3 reserved (read as 1: an ESME that set both bits wants receipts)
    bits 2-3  SME originated acknowledgement: not supported, ignored
    bit 4     intermediate notification: here, when the upstream SMSC accepted the message (`sent`),
              a deliver_sm with esm_class 0x20 and message_state ENROUTE

Pure: the SMPP server records `registered_delivery` in the accepted event's origin
(`origin.smpp.registered_delivery`) and decides from it, per event, with these functions.
"""

from __future__ import annotations

from typing import Any

RECEIPT_BITS = 0x03
ON_FINAL, ON_FAILURE = 1, 2
INTERMEDIATE_BIT = 0x10
# The events that end a message and are a success: the only ones an "on failure only" ESME skips.
SUCCESS_TYPES = frozenset({"delivered"})


def receipt_mode(registered_delivery: int) -> int:
    """0 (no receipt), ON_FINAL or ON_FAILURE."""
    bits = registered_delivery & RECEIPT_BITS
    return ON_FINAL if bits == 3 else bits


def wants_intermediate(registered_delivery: int) -> bool:
    return bool(registered_delivery & INTERMEDIATE_BIT)


def wants_notify(registered_delivery: int) -> bool:
    """Whether the message must report to the account's topic at all (a final receipt or an
    intermediate notification was asked for)."""
    return receipt_mode(registered_delivery) != 0 or wants_intermediate(registered_delivery)


def final_receipt_wanted(registered_delivery: int, event_type: str) -> bool:
    """Whether the final event `event_type` goes back as a delivery receipt."""
    mode = receipt_mode(registered_delivery)
    if mode == ON_FAILURE:
        return event_type not in SUCCESS_TYPES
    return mode == ON_FINAL


def intermediate_wanted(registered_delivery: int, event_type: str) -> bool:
    """Whether `event_type` goes back as an intermediate notification: a `sent` (the upstream SMSC
    took the message, ENROUTE) when bit 4 was set."""
    return event_type == "sent" and wants_intermediate(registered_delivery)


def registered_delivery_of(accepted: dict[str, Any]) -> int:
    """`registered_delivery` of an SMPP submit from its accepted event document (0 for others)."""
    origin = accepted.get("data", {}).get("origin") or {}
    smpp = origin.get("smpp") or {}
    try:
        return int(smpp.get("registered_delivery", 0))
    except (TypeError, ValueError):
        return 0
