"""MO to an ESME: the deliver_sm of an `inbound` event that took a position in the account's topic.

smsc/inbound.py hands an MO of a tenant whose (oldest) SMPP account has `receive_mo` to that
account's topic; the account's sender (receipts.py) meets it there among the receipts and sends it
with this module's fields: esm_class 0 (a plain MO; with the UDHI bit when the MO was one part of a
concatenated message, its UDH rebuilt from the event), source = the handset, destination = the
tenant's number.

The payload keeps the MO's data_coding where the text allows it:
- bytes the upstream alphabet could not decode (`undecodable`) go out as received, same data_coding;
- 8 (UCS-2), 1 (ASCII), 3 (Latin-1) and other codings are encoded back to the same coding (other
  codings were read as Latin-1 by smsc/inbound.py, so their bytes come back unchanged);
- 0 means "the SMSC's default alphabet" upstream and the account's `alphabet` here (GSM 03.38 or
  Latin-1): the text is encoded in the account's alphabet, or as UCS-2 (8) when it does not fit.
A payload over 254 octets goes in message_payload (short_message empty).
"""

from __future__ import annotations

from typing import Any

from core.domain.encoding import MessageTooLong, encode_text, make_udh
from smsc.pdu import ESM_CLASS_UDHI

ESM_CLASS_MO = 0x00
DC_DEFAULT, DC_ASCII, DC_LATIN1, DC_UCS2 = 0, 1, 3, 8
MAX_SHORT_MESSAGE = 254  # sm_length is one octet; 255 is reserved by some ESMEs


def address(number: str) -> tuple[int, int, str]:
    """(ton, npi, addr) of a number as msgcore spells it: "+digits" international (1/1), digits
    unknown (0/1, short codes), anything else alphanumeric (5/0)."""
    if number.startswith("+") and number[1:].isdigit():
        return 1, 1, number[1:]
    if number.isdigit():
        return 0, 1, number
    return 5, 0, number


def _default_alphabet(text: str, alphabet: str) -> tuple[int, bytes]:
    if alphabet == "latin1":
        try:
            return DC_DEFAULT, text.encode("latin-1")
        except UnicodeEncodeError:
            return DC_UCS2, text.encode("utf-16-be")
    try:
        encoded = encode_text(text)
    except MessageTooLong:  # over 255 parts of GSM-7: UCS-2 in message_payload has no part limit
        return DC_UCS2, text.encode("utf-16-be")
    if encoded.data_coding != DC_DEFAULT:
        return DC_UCS2, text.encode("utf-16-be")
    return DC_DEFAULT, b"".join(encoded.parts)  # parts never split a character: joined, the whole text


def mo_payload(data: dict[str, Any], alphabet: str) -> tuple[int, bytes]:
    """(data_coding, payload without UDH) of an `inbound` event's data for an account whose
    data_coding 0 is `alphabet` ("gsm" or "latin1"). Never raises."""
    coding = int(data.get("data_coding", DC_DEFAULT))
    if data.get("undecodable"):
        return coding, bytes.fromhex(data["undecodable"])
    text = str(data.get("text", ""))
    if coding == DC_UCS2:
        return DC_UCS2, text.encode("utf-16-be")
    if coding == DC_ASCII:
        return DC_ASCII, text.encode("ascii", errors="replace")
    if coding == DC_DEFAULT:
        return _default_alphabet(text, alphabet)
    return coding, text.encode("latin-1", errors="replace")  # Latin-1 and codings read as Latin-1


def mo_fields(event: dict[str, Any], alphabet: str) -> dict[str, Any]:
    """The deliver_sm fields (smpplib names) of an `inbound` event document."""
    data = event.get("data", {})
    coding, payload = mo_payload(data, alphabet)
    esm_class = ESM_CLASS_MO
    udh = data.get("udh")
    if udh:
        payload = make_udh(int(udh["ref"]), int(udh["total"]), int(udh["index"])) + payload
        esm_class |= ESM_CLASS_UDHI
    src_ton, src_npi, src = address(str(data.get("from", "")))
    dst_ton, dst_npi, dst = address(str(data.get("to", "")))
    fields: dict[str, Any] = {
        "source_addr_ton": src_ton, "source_addr_npi": src_npi, "source_addr": src,
        "dest_addr_ton": dst_ton, "dest_addr_npi": dst_npi, "destination_addr": dst,
        "esm_class": esm_class, "data_coding": coding}
    if len(payload) > MAX_SHORT_MESSAGE:
        fields.update(short_message=b"", message_payload=payload)
    else:
        fields["short_message"] = payload
    return fields
