"""smsc/pdu_codec.py against smpplib: the same bytes out, the same fields in."""

from __future__ import annotations

import pytest
from smpplib import smpp

from smsc import pdu_codec as codec
from smsc.pdu import ESM_CLASS_RECEIPT, SequenceCounter, build_receipt_text
from smsc.sim.faults import build_malformed

SUBMITS = [
    dict(source="Acme", destination="491701234567", short_message=b"hello", data_coding=0, source_ton=5,
         source_npi=0, dest_ton=1, dest_npi=1, esm_class=0),
    dict(source="+4915112345", destination="4917000", short_message=b"\x05\x00\x03\x2a\x02\x01" + b"x" * 134,
         data_coding=8, esm_class=0x40, source_ton=1, source_npi=1, dest_ton=1, dest_npi=1),
    dict(source="A" * 30, destination="1" * 30, short_message=b"", data_coding=3, registered_delivery=0,
         validity_period="000001000000000R"),
    dict(source="", destination="49", short_message=bytes(range(160)), data_coding=4, registered_delivery=1,
         source_ton=0, source_npi=0, dest_ton=0, dest_npi=0),
]


def _smpplib_submit(seq: int, f: dict[str, object]) -> bytes:
    pdu = smpp.make_pdu("submit_sm", client=SequenceCounter(), service_type="",
                        source_addr_ton=f.get("source_ton", 5), source_addr_npi=f.get("source_npi", 0),
                        source_addr=f["source"], dest_addr_ton=f.get("dest_ton", 1),
                        dest_addr_npi=f.get("dest_npi", 1), destination_addr=f["destination"],
                        esm_class=f.get("esm_class", 0), registered_delivery=f.get("registered_delivery", 1),
                        data_coding=f["data_coding"], short_message=f["short_message"],
                        validity_period=f.get("validity_period"))
    pdu.sequence = seq
    return bytes(pdu.generate())


@pytest.mark.parametrize("fields", SUBMITS)
def test_submit_sm_is_byte_for_byte_smpplib(fields: dict[str, object]) -> None:
    assert codec.submit_sm(4711, **fields) == _smpplib_submit(4711, fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("name,ours", [
    ("deliver_sm_resp", codec.deliver_sm_resp(99)),
    ("enquire_link_resp", codec.header_only(codec.ENQUIRE_LINK_RESP, 99)),
])
def test_responses_are_byte_for_byte_smpplib(name: str, ours: bytes) -> None:
    pdu = smpp.make_pdu(name, client=SequenceCounter())
    pdu.sequence = 99
    assert ours == bytes(pdu.generate())


def test_generic_nack_and_status() -> None:
    pdu = smpp.make_pdu("generic_nack", client=SequenceCounter(), status=3)
    pdu.sequence = 5
    assert codec.header_only(codec.GENERIC_NACK, 5, 3) == bytes(pdu.generate())
    nack = codec.decode(bytes(pdu.generate()))
    assert isinstance(nack, codec.Header) and (nack.command, nack.status, nack.sequence) == ("generic_nack", 3, 5)


def test_submit_sm_resp_is_decoded() -> None:
    pdu = smpp.make_pdu("submit_sm_resp", client=SequenceCounter(), message_id="abc-123")
    pdu.sequence = 42
    got = codec.decode(bytes(pdu.generate()))
    assert isinstance(got, codec.Header)
    assert (got.command, got.status, got.sequence, got.message_id) == ("submit_sm_resp", 0, 42, "abc-123")
    bare = codec.decode(codec.header_only(codec.SUBMIT_SM_RESP, 43, 0x58))
    assert isinstance(bare, codec.Header) and bare.message_id is None and bare.status == 0x58


def _deliver(**fields: object) -> bytes:
    pdu = smpp.make_pdu("deliver_sm", client=SequenceCounter(), **fields)
    pdu.sequence = 7
    return bytes(pdu.generate())


def test_receipt_with_tlvs_round_trips() -> None:
    from datetime import UTC, datetime
    at = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    text = build_receipt_text("m-1", at, at, stat="UNDELIV", err="005")
    raw = _deliver(source_addr="4917", destination_addr="Acme", esm_class=ESM_CLASS_RECEIPT,
                   short_message=text.encode(), receipted_message_id="m-1", message_state=5)
    d = codec.decode(raw)
    assert isinstance(d, codec.DeliverSm)
    assert (d.sequence, d.source, d.destination, d.esm_class, d.data_coding) == (7, "4917", "Acme", 4, 0)
    assert d.receipted_message_id == "m-1" and d.message_state == 5
    assert d.receipt is not None and (d.receipt.id, d.receipt.stat, d.receipt.err) == ("m-1", "UNDELIV", "005")
    assert d.receipt.done_date == at


def test_receipt_from_tlvs_alone_and_mo_with_udh_and_payload() -> None:
    d = codec.decode(_deliver(source_addr="1", destination_addr="2", esm_class=ESM_CLASS_RECEIPT,
                              short_message=b"", receipted_message_id="x9", message_state=2))
    assert isinstance(d, codec.DeliverSm) and d.receipt is not None and (d.receipt.id, d.receipt.stat) == ("x9",
                                                                                                           "DELIVRD")
    udh = b"\x05\x00\x03\x01\x02\x01"
    mo = codec.decode(_deliver(source_addr="4915", destination_addr="4930", esm_class=0x40, data_coding=8,
                               short_message=udh + "hé".encode("utf-16-be")))
    assert isinstance(mo, codec.DeliverSm) and mo.receipt is None and mo.short_message.startswith(udh)
    assert mo.data_coding == 8 and mo.esm_class == 0x40 and mo.message_payload is None
    long = codec.decode(_deliver(source_addr="4915", destination_addr="4930", message_payload=b"x" * 200))
    assert isinstance(long, codec.DeliverSm) and long.message_payload == b"x" * 200 and long.short_message == b""


@pytest.mark.parametrize("raw", [
    build_malformed("bad_tlv", 3),
    _deliver(source_addr="1", destination_addr="2", short_message=b"abc")[:-2],
    _deliver(source_addr="1", destination_addr="2", short_message=b"abc") + b"\x04\x27\x00\x05",
])
def test_malformed_deliver_sm_raises_codec_error(raw: bytes) -> None:
    raw = raw[:0] + bytes(raw)
    fixed = (len(raw)).to_bytes(4, "big") + raw[4:]  # keep it framed: only the body is broken
    with pytest.raises(codec.CodecError):
        codec.decode(fixed)
