"""Text encoding and splitting for SMS: GSM 03.38 default alphabet or UCS-2, with concatenation.

Pure: standard library only, no I/O.

Conventions (SMPP, data_coding 0 / 8):

- GSM-7 payloads are *unpacked* septets, one byte per septet; a character of the extension table
  costs two septets, the escape 0x1B followed by its code.
- UCS-2 payloads are UTF-16-BE; a character outside the BMP (most emoji) is a surrogate pair and
  costs two code units.
- A single message holds 160 septets / 70 code units; once split, each part holds 153 septets /
  67 code units, because the 6-byte concatenation UDH takes the rest of the 140 octets.
- A part boundary never falls inside an escape pair or a surrogate pair: a handset receiving half
  of one would show garbage (smpplib's own `gsm.make_parts` gets this wrong for escapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Encoding = Literal["gsm7", "ucs2"]

DATA_CODING_GSM7 = 0
DATA_CODING_UCS2 = 8

GSM7_SINGLE_SEPTETS = 160
GSM7_PART_SEPTETS = 153
UCS2_SINGLE_UNITS = 70
UCS2_PART_UNITS = 67
MAX_PARTS = 255  # the UDH carries the total in one octet

ESC = 0x1B
ESM_CLASS_UDHI = 0x40

# GSM 03.38 default alphabet, indexed by septet value; 0x1B is the escape to the extension table.
_GSM7_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNO"
    "PQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmno"
    "pqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION = {
    "\f": 0x0A,
    "^": 0x14,
    "{": 0x28,
    "}": 0x29,
    "\\": 0x2F,
    "[": 0x3C,
    "~": 0x3D,
    "]": 0x3E,
    "|": 0x40,
    "€": 0x65,
}

_ENCODE_BASIC: dict[str, int] = {ch: i for i, ch in enumerate(_GSM7_BASIC) if i != ESC}
# For counting parts without encoding (count_parts): characters of one septet, and of the alphabet.
_ONE_SEPTET = frozenset(_ENCODE_BASIC)
_GSM7 = frozenset(_ENCODE_BASIC) | frozenset(_GSM7_EXTENSION)
_DECODE_EXTENSION: dict[int, str] = {code: ch for ch, code in _GSM7_EXTENSION.items()}


class MessageTooLong(ValueError):
    """The text needs more parts than allowed (one part when `allow_long` is False, else 255)."""

    def __init__(self, part_count: int, limit: int) -> None:
        super().__init__(f"text needs {part_count} parts, limit is {limit}")
        self.part_count = part_count
        self.limit = limit


@dataclass(frozen=True, slots=True)
class EncodedText:
    """A text ready for submit_sm: one payload per part, each without UDH."""

    encoding: Encoding
    data_coding: int
    parts: list[bytes]
    part_count: int


def _gsm7_units(text: str) -> list[bytes] | None:
    """Each character's septets (1 or 2 bytes), or None if some character is not in GSM 03.38."""
    units: list[bytes] = []
    for ch in text:
        code = _ENCODE_BASIC.get(ch)
        if code is not None:
            units.append(bytes((code,)))
            continue
        ext = _GSM7_EXTENSION.get(ch)
        if ext is None:
            return None
        units.append(bytes((ESC, ext)))
    return units


def _ucs2_units(text: str) -> list[bytes]:
    """Each character as UTF-16-BE: 2 bytes, or 4 for a surrogate pair (kept together)."""
    return [ch.encode("utf-16-be") for ch in text]


def _pack(units: list[bytes], capacity: int) -> list[bytes]:
    """Greedily fill parts of at most `capacity` bytes without ever splitting a unit."""
    parts: list[bytes] = []
    current = bytearray()
    for unit in units:
        if len(current) + len(unit) > capacity:
            parts.append(bytes(current))
            current = bytearray()
        current += unit
    parts.append(bytes(current))
    return parts


def encode_text(text: str, *, allow_long: bool = True) -> EncodedText:
    """Encode `text` as GSM-7 if every character fits the default alphabet (with extension), else UCS-2.

    Returns at least one part (an empty text gives one empty part). Raises `MessageTooLong` when the
    text needs more than one part and `allow_long` is False, or more than 255 parts.
    """
    gsm_units = _gsm7_units(text)
    if gsm_units is not None:
        encoding: Encoding = "gsm7"
        data_coding = DATA_CODING_GSM7
        units = gsm_units
        single, per_part = GSM7_SINGLE_SEPTETS, GSM7_PART_SEPTETS
    else:
        encoding = "ucs2"
        data_coding = DATA_CODING_UCS2
        units = _ucs2_units(text)
        # Limits are in 16-bit code units, i.e. twice as many bytes.
        single, per_part = UCS2_SINGLE_UNITS * 2, UCS2_PART_UNITS * 2
    total = sum(len(u) for u in units)
    parts = [b"".join(units)] if total <= single else _pack(units, per_part)
    limit = MAX_PARTS if allow_long else 1
    if len(parts) > limit:
        raise MessageTooLong(len(parts), limit)
    return EncodedText(encoding=encoding, data_coding=data_coding, parts=parts, part_count=len(parts))


def count_parts(text: str) -> tuple[Encoding, int]:
    """(encoding name, number of parts) that `encode_text(text)` would produce; the billed part count.

    Without encoding in the common cases (encoding costs ~0.3 µs a character, which would cap a
    campaign upload at a few tens of thousands of rows a second): one septet per character, or UCS-2
    without surrogate pairs, fill every part but the last, so the count is a division."""
    length = len(text)
    if _ONE_SEPTET.issuperset(text):
        parts = 1 if length <= GSM7_SINGLE_SEPTETS else -(-length // GSM7_PART_SEPTETS)
        if parts > MAX_PARTS:
            raise MessageTooLong(parts, MAX_PARTS)
        return "gsm7", parts
    if not _GSM7.issuperset(text):
        units = len(text.encode("utf-16-le")) // 2
        if units <= UCS2_SINGLE_UNITS:
            return "ucs2", 1
        if units == length and -(-units // UCS2_PART_UNITS) <= MAX_PARTS:
            return "ucs2", -(-units // UCS2_PART_UNITS)
    encoded = encode_text(text)
    return encoded.encoding, encoded.part_count


def make_udh(ref: int, total: int, index: int) -> bytes:
    """Concatenation UDH with an 8-bit reference: 05 00 03 ref total index (index counts from 1)."""
    if not 0 <= ref <= 0xFF:
        raise ValueError(f"ref {ref} out of 0..255")
    if not 1 <= index <= total <= MAX_PARTS:
        raise ValueError(f"index {index} / total {total} invalid")
    return bytes((0x05, 0x00, 0x03, ref, total, index))


def split_udh(payload: bytes, esm_class: int) -> tuple[bytes | None, bytes]:
    """(UDH including its length octet, or None; the rest) of a short_message.

    The UDH is present only when esm_class has the UDHI bit (0x40); a length that overruns the
    payload is treated as no UDH rather than raising, since MO traffic can be malformed.
    """
    if not esm_class & ESM_CLASS_UDHI or not payload:
        return None, payload
    udh_len = payload[0] + 1
    if udh_len > len(payload):
        return None, payload
    return payload[:udh_len], payload[udh_len:]


def _decode_gsm7(payload: bytes) -> str:
    out: list[str] = []
    escaped = False
    for byte in payload:
        septet = byte & 0x7F
        if escaped:
            escaped = False
            # Per 03.38 an unknown extension code shows the default-table character.
            out.append(_DECODE_EXTENSION.get(septet, _GSM7_BASIC[septet]))
        elif septet == ESC:
            escaped = True
        else:
            out.append(_GSM7_BASIC[septet])
    if escaped:
        out.append(" ")
    return "".join(out)


def decode_short_message(payload: bytes, data_coding: int) -> str:
    """Text of a short_message payload (without UDH) for its data_coding.

    0 = GSM-7 unpacked septets, 1 = IA5/ASCII, 3 = Latin-1, 8 = UCS-2 (UTF-16-BE; a lone surrogate
    or odd byte is replaced, never raised). Any other coding is decoded as Latin-1 so that no byte is
    lost.
    """
    if data_coding == DATA_CODING_GSM7:
        return _decode_gsm7(payload)
    if data_coding == DATA_CODING_UCS2:
        return payload.decode("utf-16-be", errors="replace")
    if data_coding == 1:
        return payload.decode("ascii", errors="replace")
    return payload.decode("latin-1")


# --- MO (deliver_sm) decoding with the route's default alphabet ------------------------------------

REPLACEMENT = "\ufffd"


class MoAlphabet(StrEnum):
    """What an SMSC means by data_coding 0 (the "SMSC default alphabet") in the MO it delivers.

    SMPP 3.4 leaves it to the SMSC: most send GSM 03.38 unpacked septets, some send Latin-1 or ASCII
    bytes. Decoding Latin-1 as GSM silently changes characters (0xFC `ü` masked to 0x7C reads `ö`).
    """

    GSM = "gsm"
    LATIN1 = "latin1"
    ASCII = "ascii"


@dataclass(frozen=True, slots=True)
class DecodedMo:
    """An MO text and, when some bytes were not valid in the alphabet used, the raw payload.

    `text` has U+FFFD where such bytes were; `undecodable` is then the whole payload (without UDH)
    so that nobody has to guess from the replacement characters what was received.
    """

    text: str
    undecodable: bytes | None = None


def _decode_gsm7_strict(payload: bytes) -> tuple[str, bool]:
    """GSM 03.38 unpacked septets; (text, whether some byte was invalid).

    Invalid: a byte with the high bit set (a septet never has it) and an escape with nothing after
    it. An unknown extension code shows the default-table character, as 03.38 prescribes.
    """
    out: list[str] = []
    bad = escaped = False
    for byte in payload:
        if byte > 0x7F:
            out.append(REPLACEMENT)
            bad, escaped = True, False
        elif escaped:
            escaped = False
            out.append(_DECODE_EXTENSION.get(byte, _GSM7_BASIC[byte]))
        elif byte == ESC:
            escaped = True
        else:
            out.append(_GSM7_BASIC[byte])
    if escaped:
        out.append(REPLACEMENT)
        bad = True
    return "".join(out), bad


def _decode_codec(payload: bytes, codec: str) -> tuple[str, bool]:
    try:
        return payload.decode(codec), False
    except UnicodeDecodeError:
        return payload.decode(codec, errors="replace"), True


def decode_mo(payload: bytes, data_coding: int, default_alphabet: MoAlphabet = MoAlphabet.GSM) -> DecodedMo:
    """The text of an MO short_message payload (without UDH); never raises.

    data_coding 0 is decoded with `default_alphabet` (the route's `mo_alphabet`); 1 is ASCII, 3
    Latin-1, 8 UCS-2 (UTF-16-BE); any other coding is read as Latin-1 so that no byte is lost.
    Bytes that are not valid in the alphabet used (a byte >= 0x80 in GSM-7 or ASCII, a trailing
    escape, an odd byte or lone surrogate in UCS-2) become U+FFFD and set `undecodable`.
    """
    if data_coding == DATA_CODING_GSM7:
        if default_alphabet == MoAlphabet.GSM:
            text, bad = _decode_gsm7_strict(payload)
        else:
            text, bad = _decode_codec(payload, "latin-1" if default_alphabet == MoAlphabet.LATIN1 else "ascii")
    elif data_coding == DATA_CODING_UCS2:
        text, bad = _decode_codec(payload, "utf-16-be")
    elif data_coding == 1:
        text, bad = _decode_codec(payload, "ascii")
    else:
        text, bad = payload.decode("latin-1"), False
    return DecodedMo(text, payload if bad else None)
