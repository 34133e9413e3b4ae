"""Decoding MO (deliver_sm) text with the route's default alphabet (pure)."""

from __future__ import annotations

import pytest

from core.domain.encoding import REPLACEMENT, DecodedMo, MoAlphabet, decode_mo, decode_short_message, encode_text
from core.domain.routing import Route

GRUSS_LATIN1 = "Grüße aus Köln".encode("latin-1")


def test_latin1_bytes_as_gsm_are_reported_not_silently_mapped() -> None:
    # The bug: 0xFC (ü in Latin-1) masked to a septet read as ö.
    assert decode_short_message(b"\xfc", 0) == "ö"
    decoded = decode_mo(GRUSS_LATIN1, 0, MoAlphabet.GSM)
    assert decoded.text == f"Gr{REPLACEMENT}{REPLACEMENT}e aus K{REPLACEMENT}ln"
    assert decoded.undecodable == GRUSS_LATIN1


def test_a_latin1_route_reads_latin1() -> None:
    assert decode_mo(GRUSS_LATIN1, 0, MoAlphabet.LATIN1) == DecodedMo("Grüße aus Köln")


def test_gsm_stays_the_default_and_decodes_septets_exactly() -> None:
    text = "Hello @ £ {ü} €"
    payload = encode_text(text).parts[0]
    assert decode_mo(payload, 0) == DecodedMo(text)
    assert Route(id="r1").mo_alphabet == MoAlphabet.GSM


def test_a_trailing_escape_is_undecodable() -> None:
    assert decode_mo(b"ab\x1b", 0) == DecodedMo(f"ab{REPLACEMENT}", b"ab\x1b")


@pytest.mark.parametrize("alphabet", [MoAlphabet.ASCII, MoAlphabet.GSM])
def test_ascii_and_gsm_refuse_high_bytes(alphabet: MoAlphabet) -> None:
    decoded = decode_mo(b"caf\xe9", 0, alphabet)
    assert decoded.text == f"caf{REPLACEMENT}" and decoded.undecodable == b"caf\xe9"
    assert decode_mo(b"cafe", 0, alphabet) == DecodedMo("cafe")


@pytest.mark.parametrize(
    ("payload", "coding", "expected"),
    [
        ("Grüß 👋".encode("utf-16-be"), 8, DecodedMo("Grüß 👋")),
        (b"\x00a\xd8\x00", 8, DecodedMo(f"a{REPLACEMENT}", b"\x00a\xd8\x00")),  # lone surrogate
        (b"\x00a\x00", 8, DecodedMo(f"a{REPLACEMENT}", b"\x00a\x00")),  # odd byte
        (b"caf\xe9", 3, DecodedMo("café")),
        (b"caf\xe9", 1, DecodedMo(f"caf{REPLACEMENT}", b"caf\xe9")),
        (b"caf\xe9", 4, DecodedMo("café")),  # unknown coding: Latin-1, no byte lost
    ],
)
def test_explicit_codings_ignore_the_route_alphabet(payload: bytes, coding: int, expected: DecodedMo) -> None:
    for alphabet in MoAlphabet:
        assert decode_mo(payload, coding, alphabet) == expected


def test_routes_accept_the_setting_and_refuse_others() -> None:
    assert Route(id="r1", mo_alphabet="latin1").mo_alphabet == MoAlphabet.LATIN1
    with pytest.raises(ValueError, match="mo_alphabet"):
        Route(id="r1", mo_alphabet="utf8")
