"""Campaign recipient lists: a CSV upload read row by row into rendered messages or row problems.

Pure: standard library and the domain only; no I/O beyond iterating what the caller passes in. Both
`iter_text_lines` and `RecipientReader.read` are generators, so a file of a million rows is never
held in memory.

The CSV: UTF-8 (a leading BOM is dropped); `,`-separated, or `;` / tab when the header line has no
`,`; standard quoting (`"a, b"`, `""` for a quote, newlines inside quotes). The header row names the
columns, compared stripped and lower-cased (as template tags are): the first column called `phone`,
`to`, `msisdn`, `mobile` or `number` holds the recipient, the others hold tag values; columns the
template does not use are ignored.

Rows are numbered like a spreadsheet shows them: physical line numbers, the header being row 1, so
the first data row is row 2; a record continued over several lines by a quoted newline has the
number of the line it starts on.

Each data record gives one `Recipient` or one `RowProblem`, in file order. Problem codes (stable,
shown to customers and safe to match on):

- `invalid_phone`: the phone value is not an international number (reason quotes it, cut to 40
  characters); see `normalize_phone`.
- `missing_tag`: a tag the template uses has no value in this row ("no value for tag first_name").
- `too_many_parts`: the rendered text needs more SMS parts than the limit.
- `field_count`: the row has more or fewer fields than the header has columns.
- `empty_row`: a row of only delimiters and whitespace, or a blank line *between* rows. Blank lines
  after the last row (spreadsheets and editors leave them) are skipped without a report; blank
  lines before the header are skipped too.
- `malformed_row`: the CSV quoting is broken (text after a closing quote, a quote never closed
  before the end of the file, a field over the csv module's size limit); the reason gives the
  lines the broken record spans, which are reported as this one problem.

Duplicate phone numbers are *not* detected here: a list is read in batches and only the store sees
all of them, so it deduplicates across batches.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

from core.domain.encoding import GSM7_PART_SEPTETS, GSM7_SINGLE_SEPTETS, MAX_PARTS, MessageTooLong, count_parts
from core.domain.templates import MissingTag, Template, render

if TYPE_CHECKING:
    from _csv import Reader as CsvReader

INVALID_PHONE = "invalid_phone"
MISSING_TAG = "missing_tag"
TOO_MANY_PARTS = "too_many_parts"
FIELD_COUNT = "field_count"
EMPTY_ROW = "empty_row"
MALFORMED_ROW = "malformed_row"

PHONE_COLUMNS = ("phone", "to", "msisdn", "mobile", "number")
SHOWN_VALUE_CHARS = 40

_BOM = "\ufeff"
# A line and its ending; CRLF before lone CR so that a CRLF stays one ending.
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)")

_E164 = re.compile(r"\+[1-9][0-9]{6,14}")  # [0-9], not \d: \d also matches Arabic-Indic digits
# Separators people type or spreadsheets add: whitespace (incl. no-break space), dashes, dots, parens.
_PHONE_NOISE = re.compile(r"[\s\-\u2010-\u2015\u2212.()]")

class CsvEncodingError(ValueError):
    """The upload is not valid UTF-8: `line` (from 1) holds the first bad `byte`, or ends the file in
    the middle of a character."""

    def __init__(self, line: int, byte: int) -> None:
        super().__init__(f"line {line} is not valid UTF-8 (byte 0x{byte:02x}); save the file as 'CSV UTF-8'")
        self.line = line
        self.byte = byte


class CsvHeaderError(ValueError):
    """The header row makes the file unusable; nothing has been read past it.

    `code` is one of `empty_file`, `malformed_header`, `empty_column_name`, `duplicate_columns`,
    `no_phone_column` (`no_email_column` for an e-mail campaign), `missing_tag_columns`; `names` lists
    the offending column or tag names.
    """

    def __init__(self, code: str, message: str, names: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.names = names


@dataclass(frozen=True, slots=True)
class Recipient:
    """A valid row: its number, the E.164 phone, the rendered text and what sending it costs."""

    row: int
    phone: str
    text: str
    encoding: str
    parts: int

    @property
    def to(self) -> str:
        """The recipient's address, whatever the channel (core/domain/email_campaign.py has e-mail's)."""
        return self.phone


@dataclass(frozen=True, slots=True)
class RowProblem:
    """A row that gives no message. `phone` is the normalised number when the row had a valid one."""

    row: int
    code: str
    reason: str
    phone: str | None


def iter_text_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Decode UTF-8 `chunks` (split anywhere, even inside a character or a CRLF) into lines.

    Each line keeps its ending (`\\r\\n`, `\\n` or a lone `\\r`) so that `csv.reader` sees quoted
    newlines; the last line may have none. A leading BOM is dropped. On invalid UTF-8 every line
    before the bad one is yielded, then `CsvEncodingError` names the bad line.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending: list[str] = []  # the current unfinished line, in pieces: a line may span many chunks
    count = 0
    for chunk in chain(chunks, (None,)):
        try:
            text = decoder.decode(chunk if chunk is not None else b"", final=chunk is None)
        except UnicodeDecodeError as e:
            lines, _ = _complete_lines("".join(pending) + e.object[: e.start].decode("utf-8"))
            yield from lines
            raise CsvEncodingError(count + len(lines) + 1, e.object[e.start]) from e
        if chunk is None:
            lines, rest = _complete_lines("".join(pending) + text)
            yield from lines
            if rest:
                yield rest
            return
        if "\n" not in text and "\r" not in text:
            pending.append(text)
            continue
        # A CR at the end of a chunk may be the first half of a CRLF: keep it for the next chunk.
        held = "\r" if text[-1] == "\r" else ""
        lines, rest = _complete_lines("".join(pending) + (text[:-1] if held else text))
        pending = [rest + held]
        count += len(lines)
        yield from lines


def _complete_lines(buffer: str) -> tuple[list[str], str]:
    """The lines of `buffer` that have an ending (a trailing lone CR counts as one), and the rest."""
    cut = max(buffer.rfind("\n"), buffer.rfind("\r")) + 1
    return _LINE.findall(buffer, 0, cut), buffer[cut:]


def normalize_phone(raw: str) -> str | None:
    """`raw` as E.164 (`+` and 7 to 15 ASCII digits, no leading 0), or None when it cannot be one.

    Whitespace, dashes, dots and parentheses are removed, and `(0)` with them: "+44 (0)20 7946 0958"
    means +442079460958, not +4402079460958. A leading `00` becomes `+`. A number without `+` or
    `00` is rejected rather than guessed: we do not know which country it belongs to.
    """
    phone = raw.strip()
    if _E164.fullmatch(phone):
        return phone
    phone = _PHONE_NOISE.sub("", phone.replace("(0)", ""))
    if phone.startswith("00"):
        phone = "+" + phone[2:]
    return phone if _E164.fullmatch(phone) else None


class RecipientReader:
    """Reads a recipient CSV for one template into `Recipient`s and `RowProblem`s.

    After `read` has returned, `columns` holds the normalised header names and `phone_column` the
    name of the phone column. Subclasses for another channel (core/domain/email_campaign.py) set
    `address_columns` and `tags` and override `_address`, `_invalid_address` and `_render`.
    """

    address_columns: tuple[str, ...] = PHONE_COLUMNS
    address_kind = "phone"

    def __init__(self, template: Template, max_parts: int) -> None:
        if not 1 <= max_parts <= MAX_PARTS:
            raise ValueError(f"max_parts {max_parts} out of 1..{MAX_PARTS}")
        self.template = template
        self.max_parts = max_parts
        self.tags: tuple[str, ...] = template.tags
        self.columns: list[str] = []
        self.phone_column: str | None = None
        self._phone_index = 0
        self._tag_indexes: tuple[tuple[str, int], ...] = ()

    def read(self, lines: Iterable[str]) -> Iterator[Recipient | RowProblem]:
        """Read the header now, then return an iterator giving one result per data record in file order.

        `lines` are text lines with their endings, such as `iter_text_lines` yields. Raises
        `CsvHeaderError` (or `CsvEncodingError` from `lines`) before any row is read; the returned
        iterator can raise `CsvEncodingError` later, at the first undecodable line.
        """
        source = iter(lines)
        skipped = 0
        for first in source:
            if first.strip("\r\n"):
                break
            skipped += 1  # blank lines before the header
        else:
            raise CsvHeaderError("empty_file", "the file is empty: the first row must name the columns")
        first = first.removeprefix(_BOM)  # in case `lines` came from a decoder that kept it
        reader = csv.reader(chain((first,), source), delimiter=_delimiter(first), strict=True)
        try:
            header = next(reader)
        except csv.Error as e:
            raise CsvHeaderError("malformed_header", f"the header row is not valid CSV: {e}") from e
        self._use_header([name.strip().lower() for name in header])
        return self._records(reader, skipped)

    def _use_header(self, columns: list[str]) -> None:
        unnamed = [str(i) for i, name in enumerate(columns, 1) if not name]
        if unnamed:
            raise CsvHeaderError("empty_column_name", f"header column(s) {', '.join(unnamed)} have no name",
                                 tuple(unnamed))
        duplicates = [name for name, n in Counter(columns).items() if n > 1]
        if duplicates:
            raise CsvHeaderError("duplicate_columns", f"the header names these columns more than once: "
                                 f"{', '.join(duplicates)}", tuple(duplicates))
        phone_column = next((name for name in columns if name in self.address_columns), None)
        if phone_column is None:
            kind = self.address_kind
            raise CsvHeaderError(f"no_{kind}_column", f"the header has no {kind} column: name one of "
                                 f"{', '.join(self.address_columns)}")
        missing = [tag for tag in self.tags if tag not in columns]
        if missing:
            raise CsvHeaderError("missing_tag_columns", f"the template uses tags with no column in the CSV "
                                 f"header: {', '.join(missing)}", tuple(missing))
        self.columns = columns
        self.phone_column = phone_column
        self._phone_index = columns.index(phone_column)
        self._tag_indexes = tuple((tag, columns.index(tag)) for tag in self.tags)

    def _records(self, reader: CsvReader, offset: int) -> Iterator[Recipient | RowProblem]:
        # Line numbers are the csv reader's count of lines taken plus `offset`, the blank lines
        # skipped before the header, which the reader never saw.
        done = reader.line_num + offset  # last line of the last record reported (or of the header)
        while True:
            before = reader.line_num + offset
            try:
                fields = next(reader)
            except StopIteration:
                return  # blank lines after `done` are trailing ones: skipped
            except csv.Error as e:
                yield from _blank_lines(done, before + 1)
                done = reader.line_num + offset
                yield RowProblem(before + 1, MALFORMED_ROW, f"broken CSV quoting in lines {before + 1}-{done}: {e}",
                                 None)
                continue
            if not fields:  # a blank line; reported only if a record follows
                continue
            yield from _blank_lines(done, before + 1)
            done = reader.line_num + offset
            yield self._record(before + 1, fields)

    def _record(self, row: int, fields: list[str]) -> Recipient | RowProblem:
        if len(fields) != len(self.columns):
            if _is_blank(fields):
                return RowProblem(row, EMPTY_ROW, "the row is empty", None)
            phone = self._address(fields[self._phone_index]) if self._phone_index < len(fields) else None
            return RowProblem(row, FIELD_COUNT, f"the row has {len(fields)} fields, the header has "
                              f"{len(self.columns)}", phone)
        raw_phone = fields[self._phone_index]
        phone = self._address(raw_phone)
        if phone is None:
            if _is_blank(fields):
                return RowProblem(row, EMPTY_ROW, "the row is empty", None)
            return self._invalid_address(row, raw_phone)
        return self._render(row, phone, {tag: fields[i] for tag, i in self._tag_indexes})

    def _address(self, raw: str) -> str | None:
        """The row's recipient in its normal form, or None when `raw` is not a valid one."""
        return normalize_phone(raw)

    def _invalid_address(self, row: int, raw: str) -> RowProblem:
        return RowProblem(row, INVALID_PHONE, _invalid_phone_reason(raw), None)

    def _render(self, row: int, phone: str, values: dict[str, str]) -> Recipient | RowProblem:
        try:
            text = render(self.template, values)
        except MissingTag as e:
            return RowProblem(row, MISSING_TAG, str(e), phone)
        return self._message(row, phone, text)

    def _message(self, row: int, phone: str, text: str) -> Recipient | RowProblem:
        limit = self.max_parts
        if len(text) > GSM7_SINGLE_SEPTETS and len(text) > limit * GSM7_PART_SEPTETS:
            # Every part holds at most 153 characters, so this many at least; counting exactly
            # would only spend time on a text that cannot be sent anyway.
            needed = -(-len(text) // GSM7_PART_SEPTETS)
            return RowProblem(row, TOO_MANY_PARTS, f"the rendered text needs at least {needed} parts, "
                              f"limit is {limit}", phone)
        try:
            encoding, parts = count_parts(text)
        except MessageTooLong as e:
            return _too_many_parts(row, phone, e.part_count, limit)
        if parts > limit:
            return _too_many_parts(row, phone, parts, limit)
        return Recipient(row, phone, text, encoding, parts)


def _delimiter(header_line: str) -> str:
    """`,` unless the header line has none but has `;` or tabs (European spreadsheet exports)."""
    if "," in header_line:
        return ","
    semicolons, tabs = header_line.count(";"), header_line.count("\t")
    if semicolons or tabs:
        return ";" if semicolons >= tabs else "\t"
    return ","


def _blank_lines(done: int, row: int) -> Iterator[RowProblem]:
    """An `empty_row` problem for each blank line between the last reported record and `row`."""
    for blank in range(done + 1, row):
        yield RowProblem(blank, EMPTY_ROW, "the line is empty", None)


def _too_many_parts(row: int, phone: str, parts: int, limit: int) -> RowProblem:
    return RowProblem(row, TOO_MANY_PARTS, f"the rendered text needs {parts} parts, limit is {limit}", phone)


def _is_blank(fields: list[str]) -> bool:
    return not "".join(fields).strip()


def _invalid_phone_reason(raw: str) -> str:
    value = raw.strip()
    if not value:
        return "the phone number is empty"
    shown = value if len(value) <= SHOWN_VALUE_CHARS else value[:SHOWN_VALUE_CHARS] + "…"
    return f"invalid phone number {shown!r}: expected an international number such as +4915112345678"
