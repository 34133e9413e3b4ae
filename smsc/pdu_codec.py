"""The PDUs of the hot path, encoded and decoded with `struct` instead of smpplib's generic classes.

smpplib builds an object per PDU, walks every optional parameter of its command on each encode and
parses through several layers; per message that was about a quarter of the connector's CPU. The
binds (bind_*, unbind, enquire_link we send) stay on smpplib; what crosses the wire per message is
here: submit_sm and deliver_sm_resp (plus enquire_link_resp and generic_nack) out; submit_sm_resp,
generic_nack, deliver_sm and enquire_link(_resp) in. Encodings are byte-for-byte smpplib's
(tests/unit/test_pdu_codec.py).

Decoding never trusts a length: anything that overruns its PDU raises `CodecError` (the session turns
it into its MalformedPdu semantics: the PDU is skipped whole, the bind stays up).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from smsc.pdu import ESM_CLASS_RECEIPT, ReceiptFields, parse_receipt, receipt_from_tlvs

HEADER = struct.Struct(">LLLL")
HEADER_LEN = 16

GENERIC_NACK = 0x80000000
SUBMIT_SM = 0x00000004
SUBMIT_SM_RESP = 0x80000004
DELIVER_SM = 0x00000005
DELIVER_SM_RESP = 0x80000005
ENQUIRE_LINK = 0x00000015
ENQUIRE_LINK_RESP = 0x80000015

# What the fast decoder handles; every other command goes through smpplib (rare: binds, unbind).
FAST_COMMANDS = {GENERIC_NACK: "generic_nack", SUBMIT_SM_RESP: "submit_sm_resp", DELIVER_SM: "deliver_sm",
                 ENQUIRE_LINK: "enquire_link", ENQUIRE_LINK_RESP: "enquire_link_resp"}

TAG_RECEIPTED_MESSAGE_ID = 0x001E
TAG_MESSAGE_STATE = 0x0427
TAG_MESSAGE_PAYLOAD = 0x0424

# smpplib cuts C-strings to max - 1 characters (the field's max includes the NUL).
_SERVICE_TYPE_MAX, _ADDR_MAX, _TIME_MAX = 6, 21, 17
_SUBMIT_FLAGS = struct.Struct(">BBB")  # esm_class, protocol_id, priority_flag


class CodecError(ValueError):
    """The bytes are not a valid PDU of their command (a field runs past the end, a broken TLV)."""


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded PDU with no body we keep: responses, enquire_link, generic_nack."""

    command: str
    command_id: int
    status: int
    sequence: int
    message_id: str | None = None  # submit_sm_resp only

    def is_request(self) -> bool:
        return not self.command_id & 0x80000000


@dataclass(frozen=True)
class DeliverSm:
    """A deliver_sm as received: a delivery receipt (`receipt` set) or an MO message."""

    sequence: int
    source: str
    destination: str
    esm_class: int
    data_coding: int
    short_message: bytes
    receipted_message_id: str | None
    message_state: int | None
    receipt: ReceiptFields | None
    message_payload: bytes | None = None  # the TLV, used by SMSCs for texts longer than short_message


# ---- encoding ---------------------------------------------------------------------------------------


def _cstr(value: str | None, max_len: int) -> bytes:
    if not value:
        return b"\x00"
    return value[: max_len - 1].encode("latin-1") + b"\x00"


def submit_sm(sequence: int, *, source: str, destination: str, short_message: bytes, data_coding: int,
              esm_class: int = 0, registered_delivery: int = 1, source_ton: int = 5, source_npi: int = 0,
              dest_ton: int = 1, dest_npi: int = 1, validity_period: str | None = None) -> bytes:
    """submit_sm with service_type "", no schedule, protocol_id/priority/replace/default id 0, no TLVs."""
    body = b"".join((
        b"\x00", bytes((source_ton & 0xFF, source_npi & 0xFF)), _cstr(source, _ADDR_MAX),
        bytes((dest_ton & 0xFF, dest_npi & 0xFF)), _cstr(destination, _ADDR_MAX),
        _SUBMIT_FLAGS.pack(esm_class, 0, 0), b"\x00", _cstr(validity_period, _TIME_MAX),
        bytes((registered_delivery & 0xFF, 0, data_coding & 0xFF, 0, len(short_message))), short_message,
    ))
    return HEADER.pack(HEADER_LEN + len(body), SUBMIT_SM, 0, sequence) + body


def deliver_sm_resp(sequence: int, status: int = 0) -> bytes:
    """deliver_sm_resp with an empty message_id (one NUL), as smpplib sends it."""
    return HEADER.pack(HEADER_LEN + 1, DELIVER_SM_RESP, status, sequence) + b"\x00"


def header_only(command_id: int, sequence: int, status: int = 0) -> bytes:
    """A body-less PDU: enquire_link(_resp), generic_nack, unbind_resp."""
    return HEADER.pack(HEADER_LEN, command_id, status, sequence)


# ---- decoding ---------------------------------------------------------------------------------------


def decode(raw: bytes) -> Header | DeliverSm:
    """One whole PDU (header included) of a command in FAST_COMMANDS. Raises CodecError."""
    length, command_id, status, sequence = HEADER.unpack_from(raw)
    if length != len(raw):
        raise CodecError(f"command_length {length} but {len(raw)} bytes")
    if command_id == DELIVER_SM:
        return decode_deliver_sm(raw, sequence)
    message_id = None
    if command_id == SUBMIT_SM_RESP and length > HEADER_LEN:
        end = raw.find(b"\x00", HEADER_LEN)
        message_id = raw[HEADER_LEN: length if end < 0 else end].decode("ascii", errors="replace")
    return Header(FAST_COMMANDS[command_id], command_id, status, sequence, message_id)


def _cstring(raw: bytes, pos: int) -> tuple[str, int]:
    end = raw.find(b"\x00", pos)
    if end < 0:
        raise CodecError(f"C-string at {pos} has no terminator")
    return raw[pos:end].decode("ascii", errors="replace"), end + 1


def _byte(raw: bytes, pos: int) -> int:
    if pos >= len(raw):
        raise CodecError(f"PDU ends at {len(raw)} before byte {pos}")
    return raw[pos]


def decode_deliver_sm(raw: bytes, sequence: int) -> DeliverSm:
    """The fields msgcore reads from a deliver_sm, its receipt parsed. Raises CodecError."""
    _, pos = _cstring(raw, HEADER_LEN)  # service_type
    pos += 2  # source ton, npi
    source, pos = _cstring(raw, pos)
    pos += 2
    destination, pos = _cstring(raw, pos)
    esm_class = _byte(raw, pos)
    _, pos = _cstring(raw, pos + 3)  # after esm_class, protocol_id, priority_flag: schedule_delivery_time
    _, pos = _cstring(raw, pos)  # validity_period
    data_coding = _byte(raw, pos + 2)  # after registered_delivery, replace_if_present_flag
    sm_length = _byte(raw, pos + 4)  # after sm_default_msg_id
    pos += 5
    if pos + sm_length > len(raw):
        raise CodecError(f"short_message of {sm_length} bytes runs past the PDU")
    short_message = raw[pos: pos + sm_length]
    receipted, state, payload = _tlvs(raw, pos + sm_length)
    receipt: ReceiptFields | None = None
    if esm_class & ESM_CLASS_RECEIPT or receipted:
        receipt = parse_receipt(short_message.decode("ascii", errors="replace"))
        if receipt is None and receipted:
            receipt = receipt_from_tlvs(receipted, state)
    return DeliverSm(sequence, source, destination, esm_class, data_coding, short_message, receipted or None,
                     state, receipt, payload)


def _tlvs(raw: bytes, pos: int) -> tuple[str | None, int | None, bytes | None]:
    """(receipted_message_id, message_state, message_payload) from the optional part; others skipped."""
    receipted: str | None = None
    state: int | None = None
    payload: bytes | None = None
    end = len(raw)
    while pos < end:
        if pos + 4 > end:
            raise CodecError(f"TLV header at {pos} runs past the PDU")
        tag, size = struct.unpack_from(">HH", raw, pos)
        pos += 4
        if pos + size > end:
            raise CodecError(f"TLV 0x{tag:04x} of {size} bytes runs past the PDU")
        value = raw[pos: pos + size]
        pos += size
        if tag == TAG_RECEIPTED_MESSAGE_ID:
            receipted = value[:-1].decode("ascii", errors="replace") if size else ""
        elif tag == TAG_MESSAGE_STATE:
            if size != 1:
                raise CodecError(f"message_state TLV of {size} bytes")
            state = value[0]
        elif tag == TAG_MESSAGE_PAYLOAD:
            payload = value
    return receipted, state, payload
