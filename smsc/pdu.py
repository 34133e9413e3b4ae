"""Small SMPP helpers shared by the client session and the simulator.

Command statuses we act on, delivery-receipt text (build and parse), message_state values, and a
stand-in for the `client` object smpplib's PDU classes consult for sequence numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

# Command statuses (SMPP v3.4 section 5.1.3) that msgcore acts on.
ESME_ROK = 0x00
ESME_RINVMSGLEN = 0x01
ESME_RINVCMDLEN = 0x02
ESME_RINVCMDID = 0x03
ESME_RINVBNDSTS = 0x04
ESME_RALYBND = 0x05
ESME_RSYSERR = 0x08
ESME_RINVSRCADR = 0x0A
ESME_RINVDSTADR = 0x0B
ESME_RINVMSGID = 0x0C
ESME_RBINDFAIL = 0x0D
ESME_RINVPASWD = 0x0E
ESME_RINVSYSID = 0x0F
ESME_RCANCELFAIL = 0x11
ESME_RMSGQFUL = 0x14
ESME_RINVESMCLASS = 0x43
ESME_RSUBMITFAIL = 0x45
ESME_RTHROTTLED = 0x58
ESME_RINVSCHED = 0x61
ESME_RINVEXPIRY = 0x62
ESME_RQUERYFAIL = 0x67
ESME_RUNKNOWNERR = 0xFF
ESME_RINVDCS = 0x104  # SMPP v5.0's code for an unsupported data_coding (v3.4 has none); ESMEs know it

# esm_class bits.
ESM_CLASS_RECEIPT = 0x04  # message type: SMSC delivery receipt (deliver_sm)
ESM_CLASS_UDHI = 0x40

# message_state TLV values (SMPP v3.4 section 5.2.28) and their receipt `stat` names.
MESSAGE_STATES: dict[str, int] = {
    "ENROUTE": 1,
    "DELIVRD": 2,
    "EXPIRED": 3,
    "DELETED": 4,
    "UNDELIV": 5,
    "ACCEPTD": 6,
    "UNKNOWN": 7,
    "REJECTD": 8,
}
STAT_BY_STATE: dict[int, str] = {v: k for k, v in MESSAGE_STATES.items()}

RECEIPT_DATE_FORMAT = "%y%m%d%H%M"


class SequenceCounter:
    """Stand-in for smpplib's `client` argument: PDU constructors call `next_sequence()`.

    Not thread-safe; the simulator uses it from its event loop only.
    """

    MAX = 0x7FFFFFFF

    def __init__(self) -> None:
        self.sequence = 0

    def next_sequence(self) -> int:
        self.sequence = 1 if self.sequence >= self.MAX else self.sequence + 1
        return self.sequence


@dataclass(frozen=True, slots=True)
class ReceiptFields:
    """The fields of a delivery-receipt text. Dates are UTC (receipts carry no zone; SMSCs we use run UTC)."""

    id: str
    stat: str
    sub: str | None = None
    dlvrd: str | None = None
    submit_date: datetime | None = None
    done_date: datetime | None = None
    err: str | None = None
    text: str | None = None


def format_receipt_date(when: datetime) -> str:
    """YYMMDDhhmm in UTC; `when` must be timezone-aware."""
    if when.tzinfo is None:
        raise ValueError("receipt dates must be timezone-aware")
    return when.astimezone(UTC).strftime(RECEIPT_DATE_FORMAT)


def build_receipt_text(
    message_id: str,
    submitted_at: datetime,
    done_at: datetime,
    *,
    stat: str = "DELIVRD",
    err: str = "000",
    text: str = "",
    sub: str = "001",
    dlvrd: str | None = None,
) -> str:
    """The de-facto standard receipt text (SMPP v3.4 appendix B), `text` cut to its first 20 chars.

    `dlvrd` defaults to "001" for DELIVRD and "000" otherwise.
    """
    if dlvrd is None:
        dlvrd = "001" if stat == "DELIVRD" else "000"
    return (
        f"id:{message_id} sub:{sub} dlvrd:{dlvrd} submit date:{format_receipt_date(submitted_at)} "
        f"done date:{format_receipt_date(done_at)} stat:{stat} err:{err} text:{text[:20]}"
    )


_KEY = r"(id|sub|dlvrd|submit[ _]date|done[ _]date|stat|err|text)"
_MARKER = re.compile(rf"(?:^|(?<=\s)){_KEY}\s*:", re.IGNORECASE)
_TEXT_MARKER = re.compile(r"(?:^|(?<=\s))text\s*:", re.IGNORECASE)


def _parse_date(value: str | None) -> datetime | None:
    """YYMMDDhhmm or YYMMDDhhmmss as UTC; None when absent or malformed.

    Sliced by hand: strptime cost more than the rest of the receipt parse on the hot path.
    """
    if not value or not value.isdigit() or len(value) not in (10, 12):
        return None
    try:
        return datetime(
            2000 + int(value[0:2]),
            int(value[2:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[8:10]),
            int(value[10:12] or 0),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _fields(text: str) -> dict[str, str]:
    """key -> value for every `key:` marker, the value running to the next marker."""
    markers = list(_MARKER.finditer(text))
    found: dict[str, str] = {}
    for i, m in enumerate(markers):
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        key = m.group(1).lower().replace(" ", "_")
        found.setdefault(key, text[m.end() : end].strip())
    return found


def parse_receipt(text: str) -> ReceiptFields | None:
    """Fields of a receipt text, or None if it has no `id` and `stat` (then it is not a receipt).

    Tolerant of key case, field order, `submit_date` vs `submit date`, and missing optional fields.
    The free `text:` field runs to the end of the string when it comes last, so a `stat:` inside the
    quoted message text does not confuse the parse.
    """
    head, tail = text, ""
    m = _TEXT_MARKER.search(text)
    if m is not None:
        head, tail = text[: m.start()], text[m.end() :]
    fields = _fields(head)
    if "id" not in fields or "stat" not in fields:
        # `text:` was not last; fall back to treating every marker alike.
        fields = _fields(text)
        tail = fields.get("text", "")
    if not fields.get("id") or not fields.get("stat"):
        return None
    return ReceiptFields(
        id=fields["id"],
        stat=fields["stat"].upper(),
        sub=fields.get("sub"),
        dlvrd=fields.get("dlvrd"),
        submit_date=_parse_date(fields.get("submit_date")),
        done_date=_parse_date(fields.get("done_date")),
        err=fields.get("err"),
        text=tail.strip() if m is not None else None,
    )


def receipt_from_tlvs(receipted_message_id: str, message_state: int | None) -> ReceiptFields:
    """A receipt built from TLVs alone, for SMSCs that send an empty or unparsable short_message."""
    stat = STAT_BY_STATE.get(message_state or 0, "UNKNOWN")
    return ReceiptFields(id=receipted_message_id, stat=stat)


def as_str(value: bytes | str | None) -> str | None:
    """smpplib returns parsed C-strings as bytes; SMPP addresses and ids are ASCII."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return value
