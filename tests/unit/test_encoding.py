"""GSM 03.38 / UCS-2 encoding and splitting (pure)."""

from __future__ import annotations

import random

import pytest

from core.domain.encoding import (
    EncodedText,
    MessageTooLong,
    count_parts,
    decode_short_message,
    encode_text,
    make_udh,
    split_udh,
)


def _join(encoded: EncodedText) -> str:
    return "".join(decode_short_message(p, encoded.data_coding) for p in encoded.parts)


def test_gsm7_basic() -> None:
    enc = encode_text("Hello @ £ $ ¥ è!")
    assert enc.encoding == "gsm7"
    assert enc.data_coding == 0
    assert enc.part_count == 1
    assert enc.parts[0][:5] == b"Hello"
    assert enc.parts[0][6] == 0x00  # '@' is septet 0


def test_extension_chars_count_as_two_septets() -> None:
    enc = encode_text("€[]{}|^~\\\f")
    assert enc.encoding == "gsm7"
    assert len(enc.parts[0]) == 20
    assert enc.parts[0][:2] == b"\x1b\x65"
    # 80 euro signs = 160 septets: one part; 81 need two.
    assert count_parts("€" * 80) == ("gsm7", 1)
    assert count_parts("€" * 81) == ("gsm7", 2)


def test_gsm7_boundary_160_161() -> None:
    assert count_parts("a" * 160) == ("gsm7", 1)
    enc = encode_text("a" * 161)
    assert enc.part_count == 2
    assert [len(p) for p in enc.parts] == [153, 8]
    assert count_parts("a" * 306) == ("gsm7", 2)
    assert count_parts("a" * 307) == ("gsm7", 3)


def test_ucs2_boundary_70_71() -> None:
    assert count_parts("ж" * 70) == ("ucs2", 1)
    enc = encode_text("ж" * 71)
    assert enc.encoding == "ucs2"
    assert enc.data_coding == 8
    assert enc.part_count == 2
    assert [len(p) for p in enc.parts] == [134, 8]


def test_arabic_is_ucs2() -> None:
    text = "مرحبا بالعالم"
    enc = encode_text(text)
    assert enc.encoding == "ucs2"
    assert enc.parts == [text.encode("utf-16-be")]
    assert _join(enc) == text


def test_emoji_surrogate_pair_never_split() -> None:
    # 66 code units of 'x' then an emoji (2 units): the emoji would straddle the 67-unit boundary.
    text = "x" * 66 + "😀" + "y" * 10
    enc = encode_text(text)
    assert enc.part_count == 2
    assert len(enc.parts[0]) == 66 * 2
    assert enc.parts[1][:4] == "😀".encode("utf-16-be")
    for part in enc.parts:
        assert len(part) <= 134
        part.decode("utf-16-be")  # raises on a lone surrogate
    assert _join(enc) == text


def test_escape_never_split_at_part_boundary() -> None:
    # 152 septets then '€' (2 septets): the escape pair would straddle the 153-septet boundary.
    text = "a" * 152 + "€" + "b" * 20
    enc = encode_text(text)
    assert enc.part_count == 2
    assert enc.parts[0] == b"a" * 152
    assert enc.parts[1][:2] == b"\x1b\x65"
    for part in enc.parts:
        assert len(part) <= 153
        assert not part.endswith(b"\x1b")
    assert _join(enc) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain ascii",
        "Ünïcødé ÄÖÜ äöü ß § ¿¡ ΔΦΓΛΩΠΨΣΘΞ",
        "braces {x} [y] ~z~ |w| ^ \\ €uro \f" * 12,
        "Привет, мир! " * 20,
        "emoji 😀🎉👍🏽 mixed" * 15,
        "line\r\nbreaks\nand tabs-free",
    ],
)
def test_round_trip_over_all_parts(text: str) -> None:
    enc = encode_text(text)
    assert enc.part_count == len(enc.parts)
    assert _join(enc) == text


def test_allow_long_false_raises() -> None:
    encode_text("a" * 160, allow_long=False)
    with pytest.raises(MessageTooLong) as info:
        encode_text("a" * 161, allow_long=False)
    assert info.value.part_count == 2


def test_udh_and_split() -> None:
    udh = make_udh(0x2A, 3, 2)
    assert udh == bytes.fromhex("0500032a0302")
    assert split_udh(udh + b"abc", 0x40) == (udh, b"abc")
    assert split_udh(udh + b"abc", 0x00) == (None, udh + b"abc")
    with pytest.raises(ValueError):
        make_udh(1, 2, 3)


def test_decode_other_codings() -> None:
    assert decode_short_message(b"id:1 stat:DELIVRD", 1) == "id:1 stat:DELIVRD"
    assert decode_short_message(b"caf\xe9", 3) == "café"


def test_domain_module_is_pure() -> None:
    from pathlib import Path

    import core.domain.encoding as mod

    source = Path(mod.__file__).read_text(encoding="utf-8")
    imports = {line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "dataclasses", "enum", "typing"}


# The fast part count (no encoding) against the encoder, over the whole alphabet and random texts.
ONE_SEPTET = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
EXTENSION = "\f^{}\\[~]|€"


def _encoded_count(text: str) -> tuple[str, int]:
    encoded = encode_text(text)
    return encoded.encoding, encoded.part_count


def test_fast_character_sets_agree_with_the_encoder() -> None:
    for ch in ONE_SEPTET:
        assert count_parts(ch * 160) == ("gsm7", 1), repr(ch)
        assert count_parts(ch * 161) == ("gsm7", 2), repr(ch)
    for ch in EXTENSION:
        assert count_parts(ch * 80) == ("gsm7", 1), repr(ch)
        assert count_parts(ch * 81) == ("gsm7", 2), repr(ch)
    for code in range(0x250):
        ch = chr(code)
        if ch not in ONE_SEPTET + EXTENSION + "\x1b":
            assert count_parts(ch)[0] == "ucs2", repr(ch)


def test_fast_part_count_matches_count_parts() -> None:
    rnd = random.Random(7)
    alphabets = ["abc XYZ 09.,!", "abc€[]^", "éüÄñ£", "aé😀", "مرحبا", "日本語", "a😀" * 3]
    for _ in range(3000):
        text = "".join(rnd.choice(rnd.choice(alphabets)) for _ in range(rnd.randint(0, 700)))
        assert count_parts(text) == _encoded_count(text), text
