"""A submit_sm as msgcore understands it: addresses normalised from TON/NPI, text decoded from
data_coding, SMPP times read, and the checks of the REST API (E.164 destination, sender id, part
count) applied through the same functions. Pure apart from reading the PDU object smpplib built.

Refusals raise `SubmitRefused(status)`: the status the submit_sm_resp carries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from core.domain.encoding import MessageTooLong, count_parts, decode_short_message, split_udh
from core.domain.esme_receipts import wants_notify
from core.domain.recipients import normalize_phone
from core.domain.submission_rules import E164, MAX_VALIDITY_S, MIN_VALIDITY_S, SENDER_ID
from core.store.smpp_accounts import SmppAccount
from core.store.submission import Submission
from smsc.pdu import (
    ESME_RINVDCS,
    ESME_RINVDSTADR,
    ESME_RINVESMCLASS,
    ESME_RINVEXPIRY,
    ESME_RINVMSGLEN,
    ESME_RINVSCHED,
    ESME_RINVSRCADR,
    as_str,
)

TON_INTERNATIONAL, TON_NATIONAL, TON_ALPHANUMERIC = 1, 2, 5
DC_DEFAULT, DC_ASCII, DC_LATIN1, DC_BINARY, DC_BINARY_8, DC_UCS2 = 0, 1, 3, 2, 4, 8
SUPPORTED_CODINGS = frozenset({DC_DEFAULT, DC_ASCII, DC_LATIN1, DC_UCS2})
_E164 = re.compile(E164)
_SENDER = re.compile(SENDER_ID)
_SMPP_TIME = re.compile(r"^(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})(\d)(\d{2})([+\-R])$")


class SubmitRefused(Exception):
    """The submit_sm is refused with `status`; nothing was accepted."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Segment:
    """Where a part sits in a concatenated message (UDH or SAR); `ref` is scoped by the caller."""

    ref: int
    total: int
    index: int


@dataclass(frozen=True)
class SubmitRequest:
    """One submit_sm, decoded. `segment` is set for a part of a longer message."""

    sequence: int
    source: str
    source_ton: int
    source_npi: int
    destination: str
    dest_ton: int
    dest_npi: int
    esm_class: int
    data_coding: int
    registered_delivery: int
    priority_flag: int
    body: bytes  # the payload without UDH; decoded once the parts are joined (a pair may span two)
    segment: Segment | None
    validity: str
    schedule: str


def parse_submit(pdu: Any, account: SmppAccount) -> SubmitRequest:
    """The request of a submit_sm PDU (smpplib's object); SubmitRefused for a bad data_coding or text."""
    esm_class, data_coding = int(pdu.esm_class or 0), int(pdu.data_coding or 0)
    payload: bytes = pdu.short_message or b""
    if pdu.message_payload:
        if payload:
            raise SubmitRefused(ESME_RINVMSGLEN, "both short_message and message_payload given")
        payload = bytes(pdu.message_payload)
    if data_coding not in SUPPORTED_CODINGS:
        decode_text(b"", data_coding, account.alphabet)  # raises the refusal that names the coding
    udh, body = split_udh(payload, esm_class)
    segment = _udh_segment(udh) if udh is not None else _sar_segment(pdu)
    return SubmitRequest(
        sequence=pdu.sequence, source=as_str(pdu.source_addr) or "", source_ton=int(pdu.source_addr_ton or 0),
        source_npi=int(pdu.source_addr_npi or 0), destination=as_str(pdu.destination_addr) or "",
        dest_ton=int(pdu.dest_addr_ton or 0), dest_npi=int(pdu.dest_addr_npi or 0), esm_class=esm_class,
        data_coding=data_coding, registered_delivery=int(pdu.registered_delivery or 0),
        priority_flag=int(pdu.priority_flag or 0), body=body,
        segment=segment, validity=as_str(pdu.validity_period) or "", schedule=as_str(pdu.schedule_delivery_time) or "")


def decode_text(body: bytes, data_coding: int, alphabet: str) -> str:
    """The text of a payload: data_coding 0 is the account's alphabet (GSM 03.38 or Latin-1), 1 ASCII,
    3 Latin-1, 8 UCS-2. Binary (2, 4) and anything else are refused: the pipeline carries text."""
    if data_coding == DC_DEFAULT:
        return body.decode("latin-1") if alphabet == "latin1" else decode_short_message(body, DC_DEFAULT)
    if data_coding == DC_ASCII:
        if any(b > 0x7F for b in body):
            raise SubmitRefused(ESME_RINVDCS, "data_coding 1 (IA5) with bytes above 0x7F")
        return body.decode("ascii")
    if data_coding == DC_LATIN1:
        return body.decode("latin-1")
    if data_coding == DC_UCS2:
        try:
            return body.decode("utf-16-be")
        except UnicodeDecodeError as e:  # an odd length or a lone surrogate: not storable text
            raise SubmitRefused(ESME_RINVMSGLEN, f"invalid UCS-2 payload: {e.reason}") from e
    if data_coding in (DC_BINARY, DC_BINARY_8):
        raise SubmitRefused(ESME_RINVDCS, "binary messages (data_coding 2, 4) are not supported")
    raise SubmitRefused(ESME_RINVDCS, f"data_coding {data_coding} is not supported (0, 1, 3, 8 are)")


def _udh_segment(udh: bytes) -> Segment | None:
    """The concatenation element of a UDH (IEI 0 with an 8-bit reference, IEI 8 with 16 bits)."""
    pos, end = 1, len(udh)
    while pos + 2 <= end:
        iei, size = udh[pos], udh[pos + 1]
        value = udh[pos + 2: pos + 2 + size]
        if iei == 0x00 and size == 3 and len(value) == 3:
            return _segment(value[0], value[1], value[2])
        if iei == 0x08 and size == 4 and len(value) == 4:
            return _segment((value[0] << 8) | value[1], value[2], value[3])
        pos += 2 + size
    return None


def _sar_segment(pdu: Any) -> Segment | None:
    if pdu.sar_msg_ref_num is None or pdu.sar_total_segments is None or pdu.sar_segment_seqnum is None:
        return None
    return _segment(int(pdu.sar_msg_ref_num), int(pdu.sar_total_segments), int(pdu.sar_segment_seqnum))


def _segment(ref: int, total: int, index: int) -> Segment | None:
    if not 1 <= index <= total:
        raise SubmitRefused(ESME_RINVESMCLASS, f"segment {index} of {total}")
    return None if total == 1 else Segment(ref, total, index)


def destination_e164(number: str, ton: int) -> str:
    """The destination as E.164: international (TON 1) digits get their `+`; an unknown TON takes a
    `+` or `00` prefix; a national number is refused (its country is not known)."""
    if ton == TON_INTERNATIONAL and number.isdigit():
        number = "+" + number
    elif ton == TON_NATIONAL:
        raise SubmitRefused(ESME_RINVDSTADR, "national destination numbers (TON 2) are not accepted: send E.164")
    normalised = normalize_phone(number)
    if normalised is None or not _E164.match(normalised):
        raise SubmitRefused(ESME_RINVDSTADR, f"destination {number!r} is not an E.164 number")
    return normalised


def sender_id(source: str, ton: int) -> str:
    """The sender as the REST API takes it: up to 11 letters/digits, or up to 16 digits (with + when
    international)."""
    sender = "+" + source if ton == TON_INTERNATIONAL and source.isdigit() else source
    if not _SENDER.match(sender):
        raise SubmitRefused(ESME_RINVSRCADR, f"source address {source!r} is not a valid sender id")
    return sender


def smpp_time(value: str, now: datetime, status: int) -> datetime | None:
    """An SMPP absolute or relative time (`YYMMDDhhmmsstnnp`) as UTC; None when empty."""
    if not value:
        return None
    m = _SMPP_TIME.match(value)
    if m is None:
        raise SubmitRefused(status, f"{value!r} is not an SMPP time")
    yy, mo, dd, hh, mi, ss, tenth, nn, p = m.groups()
    try:
        if p == "R":
            return now + timedelta(days=365 * int(yy) + 30 * int(mo) + int(dd), hours=int(hh), minutes=int(mi),
                                   seconds=int(ss))
        local = datetime(2000 + int(yy), int(mo), int(dd), int(hh), int(mi), int(ss), int(tenth) * 100_000, tzinfo=UTC)
    except ValueError as e:
        raise SubmitRefused(status, f"{value!r}: {e}") from e
    offset = timedelta(minutes=15 * int(nn))
    return local - offset if p == "+" else local + offset


def to_submission(req: SubmitRequest, account: SmppAccount, now: datetime, max_parts: int,
                  default_validity_s: int) -> Submission:
    """The Submission of a whole message (parts already joined); SubmitRefused on any invalid field."""
    to = destination_e164(req.destination, req.dest_ton)
    sender = sender_id(req.source, req.source_ton)
    text = decode_text(req.body, req.data_coding, account.alphabet)
    if not text.strip():
        raise SubmitRefused(ESME_RINVMSGLEN, "empty message")
    try:
        encoding, parts = count_parts(text)
    except MessageTooLong as e:
        raise SubmitRefused(ESME_RINVMSGLEN, str(e)) from e
    if parts > max_parts:
        raise SubmitRefused(ESME_RINVMSGLEN, f"{parts} parts, at most {max_parts}")
    send_at = smpp_time(req.schedule, now, ESME_RINVSCHED)
    expires = smpp_time(req.validity, send_at or now, ESME_RINVEXPIRY)
    validity_s = default_validity_s
    if expires is not None:
        validity_s = int((expires - (send_at or now)).total_seconds())
        validity_s = min(MAX_VALIDITY_S, max(MIN_VALIDITY_S, validity_s))
    return Submission(
        to=to, sender=sender, text=text, encoding=encoding, parts=parts,
        transactional=account.transactional or req.priority_flag >= 1, validity_s=validity_s,
        send_at=send_at if send_at is not None and send_at > now else None,
        notify=account.notify_topic if wants_notify(req.registered_delivery) else None,
        origin={"smpp": {"account": account.system_id, "sequence": req.sequence,
                         "registered_delivery": req.registered_delivery, "source": req.source,
                         "source_ton": req.source_ton, "source_npi": req.source_npi, "destination": req.destination,
                         "dest_ton": req.dest_ton, "dest_npi": req.dest_npi, "esm_class": req.esm_class,
                         "data_coding": req.data_coding}})


def joined(parts: list[SubmitRequest]) -> SubmitRequest:
    """One request of the parts of a concatenated message, in index order (the first part's fields)."""
    ordered = sorted(parts, key=lambda p: p.segment.index if p.segment else 0)
    return replace(ordered[0], body=b"".join(p.body for p in ordered), segment=None)
