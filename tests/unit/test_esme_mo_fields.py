"""The deliver_sm fields of an MO for an ESME (smsc/esme_server/mo.py): codings kept where the text
allows, the account's alphabet for data_coding 0, raw bytes for what could not be decoded, UDH rebuilt."""

from __future__ import annotations

from core.domain.encoding import encode_text, make_udh
from smsc.esme_server.mo import address, mo_fields, mo_payload


def test_default_alphabet_follows_the_account() -> None:
    data = {"text": "Grüße {x}", "data_coding": 0}
    assert mo_payload(data, "gsm") == (0, encode_text("Grüße {x}").parts[0])
    assert mo_payload(data, "latin1") == (0, "Grüße {x}".encode("latin-1"))
    assert mo_payload({"text": "Δ €", "data_coding": 0}, "latin1") == (8, "Δ €".encode("utf-16-be"))
    assert mo_payload({"text": "نعم", "data_coding": 0}, "gsm") == (8, "نعم".encode("utf-16-be"))


def test_other_codings_are_kept_and_undecodable_bytes_pass_through() -> None:
    assert mo_payload({"text": "😀", "data_coding": 8}, "gsm") == (8, "😀".encode("utf-16-be"))
    assert mo_payload({"text": "café", "data_coding": 3}, "gsm") == (3, "café".encode("latin-1"))
    assert mo_payload({"text": "\x01\xff", "data_coding": 4}, "gsm") == (4, b"\x01\xff")
    raw = {"text": "a\ufffd", "data_coding": 0, "undecodable": "61ff"}
    assert mo_payload(raw, "gsm") == (0, b"a\xff")
    assert mo_payload({"text": "hi"}, "gsm") == (0, b"hi")  # events recorded before data_coding was kept


def test_fields_of_a_part_and_of_a_long_mo() -> None:
    part = {"data": {"from": "+4915112345678", "to": "+4930111111", "text": "abc", "data_coding": 0,
                     "udh": {"ref": 7, "total": 2, "index": 1}}}
    f = mo_fields(part, "gsm")
    assert f["esm_class"] == 0x40 and f["short_message"] == make_udh(7, 2, 1) + b"abc"
    assert (f["source_addr_ton"], f["source_addr"], f["destination_addr"]) == (1, "4915112345678", "4930111111")
    long = mo_fields({"data": {"from": "ACME", "to": "12345", "text": "x" * 300, "data_coding": 3}}, "gsm")
    assert long["short_message"] == b"" and long["message_payload"] == b"x" * 300 and long["esm_class"] == 0
    assert address("ACME") == (5, 0, "ACME") and address("12345") == (0, 1, "12345")
