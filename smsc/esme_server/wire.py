"""Bytes on the wire for the ESME server: PDU framing, responses through smpplib, and the commands
smpplib has no class for (cancel_sm). Nothing here does I/O."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from smpplib import smpp

from smsc.pdu import ESME_ROK, SequenceCounter

HEADER = struct.Struct(">LLLL")
HEADER_LEN = 16
MAX_PDU_LEN = 64 * 1024

GENERIC_NACK = 0x80000000
QUERY_SM, SUBMIT_SM, DELIVER_SM, UNBIND, CANCEL_SM = 0x03, 0x04, 0x05, 0x06, 0x08
BIND_RECEIVER, BIND_TRANSMITTER, BIND_TRANSCEIVER = 0x01, 0x02, 0x09
ENQUIRE_LINK = 0x15
CANCEL_SM_RESP = 0x80000008
RESPONSE_BIT = 0x80000000
BIND_MODES = {BIND_TRANSMITTER: "tx", BIND_RECEIVER: "rx", BIND_TRANSCEIVER: "trx"}

# A stand-in `client` for smpplib's PDU constructors: responses carry the request's sequence anyway.
_NO_CLIENT = SequenceCounter()


def response(name: str, sequence: int, status: int = ESME_ROK, **fields: Any) -> bytes:
    """A response PDU (`<command>_resp`, generic_nack) with the request's sequence number."""
    pdu = smpp.make_pdu(name, client=_NO_CLIENT, status=status, **fields)
    pdu.sequence = sequence
    return bytes(pdu.generate())


def header_only(command_id: int, sequence: int, status: int = ESME_ROK) -> bytes:
    return HEADER.pack(HEADER_LEN, command_id, status, sequence)


def request(name: str, sequence: int, **fields: Any) -> bytes:
    """A request PDU we send (deliver_sm, enquire_link, unbind) with our sequence number."""
    pdu = smpp.make_pdu(name, client=_NO_CLIENT, **fields)
    pdu.sequence = sequence
    return bytes(pdu.generate())


@dataclass(frozen=True)
class CancelSm:
    message_id: str
    source: str
    destination: str


def _cstring(raw: bytes, pos: int) -> tuple[str, int]:
    end = raw.find(b"\x00", pos)
    if end < 0:
        raise ValueError(f"C-string at {pos} has no terminator")
    return raw[pos:end].decode("ascii", errors="replace"), end + 1


def decode_cancel_sm(raw: bytes) -> CancelSm:
    """cancel_sm: service_type, message_id, source ton/npi/addr, dest ton/npi/addr. ValueError if broken."""
    _, pos = _cstring(raw, HEADER_LEN)
    message_id, pos = _cstring(raw, pos)
    source, pos = _cstring(raw, pos + 2)
    destination, pos = _cstring(raw, pos + 2)
    if pos != len(raw):
        raise ValueError(f"cancel_sm of {len(raw)} bytes, fields end at {pos}")
    return CancelSm(message_id, source, destination)
