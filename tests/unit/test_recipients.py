"""Campaign recipient CSVs: decoding, header checks, row validation and rendering (pure)."""

from __future__ import annotations

import types
from collections.abc import Iterator

import pytest

from core.domain import recipients
from core.domain.encoding import count_parts
from core.domain.recipients import (
    CsvEncodingError,
    CsvHeaderError,
    Recipient,
    RecipientReader,
    RowProblem,
    iter_text_lines,
    normalize_phone,
)
from core.domain.templates import parse_template

GREETING = "Hi {{first_name}}! Stop by {{store_name}}"


def read(data: str | bytes, template: str = GREETING, max_parts: int = 4,
         chunk_size: int = 65536) -> list[Recipient | RowProblem]:
    raw = data.encode() if isinstance(data, str) else data
    chunks = (raw[i:i + chunk_size] for i in range(0, len(raw), chunk_size))
    return list(RecipientReader(parse_template(template), max_parts).read(iter_text_lines(chunks)))


def lines_of(raw: bytes, chunk_size: int) -> list[str]:
    return list(iter_text_lines(raw[i:i + chunk_size] for i in range(0, len(raw), chunk_size)))


def only_problem(results: list[Recipient | RowProblem]) -> RowProblem:
    assert len(results) == 1
    assert isinstance(results[0], RowProblem)
    return results[0]


# --- decoding --------------------------------------------------------------------------------


def test_lines_keep_their_endings_and_a_last_line_without_one() -> None:
    raw = b"a,b\r\nc\nd\re\r\n\r\nlast"
    assert lines_of(raw, 65536) == ["a,b\r\n", "c\n", "d\r", "e\r\n", "\r\n", "last"]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 7])
def test_chunks_may_split_characters_crlf_and_the_bom(chunk_size: int) -> None:
    raw = "\ufeffphone,first_name\r\n+4915112345678,أحمد 😀\r\n+4915112345679,Zoë\rx\n".encode()
    assert lines_of(raw, chunk_size) == [
        "phone,first_name\r\n", "+4915112345678,أحمد 😀\r\n", "+4915112345679,Zoë\r", "x\n"]


def test_empty_input_gives_no_lines() -> None:
    assert lines_of(b"", 10) == []
    assert lines_of(b"\xef\xbb\xbf", 1) == []


@pytest.mark.parametrize("chunk_size", [1, 4, 65536])
def test_invalid_utf8_names_its_line_after_yielding_the_lines_before(chunk_size: int) -> None:
    raw = b"phone,name\n+4915112345678,Ann\r\n+4915112345679,Jos\xe9\n+4915112345670,Bob\n"
    got: list[str] = []
    with pytest.raises(CsvEncodingError) as info:
        got.extend(iter_text_lines(raw[i:i + chunk_size] for i in range(0, len(raw), chunk_size)))
    assert info.value.line == 3
    assert info.value.byte == 0xE9
    assert "line 3 is not valid UTF-8" in str(info.value)
    assert got == ["phone,name\n", "+4915112345678,Ann\r\n"]


def test_truncated_character_at_the_end_is_an_encoding_error() -> None:
    with pytest.raises(CsvEncodingError) as info:
        lines_of("a\nb\nü".encode()[:-1], 1)
    assert info.value.line == 3
    assert info.value.byte == 0xC3


def test_encoding_error_after_a_lone_cr_counts_the_cr_as_a_line_end() -> None:
    with pytest.raises(CsvEncodingError) as info:
        lines_of(b"a\r\xff", 65536)
    assert info.value.line == 2


def test_encoding_error_surfaces_while_reading_rows() -> None:
    raw = b"phone,first_name,store_name\n+4915112345678,Ann,X\n+4915112345679,\xff,X\n"
    results: list[Recipient | RowProblem] = []
    with pytest.raises(CsvEncodingError) as info:
        results.extend(RecipientReader(parse_template(GREETING), 4).read(iter_text_lines([raw])))
    assert info.value.line == 3
    assert [r.row for r in results] == [2]


# --- CSV shape ---------------------------------------------------------------------------------


def test_bom_crlf_and_rendering() -> None:
    results = read("\ufeffPhone,First_Name,Store_Name\r\n+4915112345678,Anna,Main St\r\n")
    assert results == [Recipient(2, "+4915112345678", "Hi Anna! Stop by Main St", "gsm7", 1)]


def test_quoted_commas_and_doubled_quotes() -> None:
    results = read('phone,first_name,store_name\n+4915112345678,"Smith, Ann","The ""Big"" Shop"\n')
    assert isinstance(results[0], Recipient)
    assert results[0].text == 'Hi Smith, Ann! Stop by The "Big" Shop'


def test_quoted_newline_keeps_the_row_number_of_the_line_it_starts_on() -> None:
    data = ("phone,first_name,store_name\n"
            "+4915112345678,Ann,\"Main St\nUnit 4\"\n"
            "+4915112345679,Bob,X\n"
            "nope,Cy,X\n")
    results = read(data)
    assert [r.row for r in results] == [2, 4, 5]
    assert isinstance(results[0], Recipient)
    assert results[0].text == "Hi Ann! Stop by Main St\nUnit 4"
    assert isinstance(results[2], RowProblem)
    assert results[2].code == "invalid_phone"


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_semicolon_and_tab_delimiters(delimiter: str) -> None:
    data = delimiter.join(["phone", "first_name", "store_name"]) + "\n"
    data += delimiter.join(["+4915112345678", '"Smith, Ann"', "Main St, 4"]) + "\n"
    results = read(data)
    assert isinstance(results[0], Recipient)
    assert results[0].text == "Hi Smith, Ann! Stop by Main St, 4"


def test_a_comma_in_the_header_wins_over_semicolons() -> None:
    results = read("phone,first_name,store_name;x\n+4915112345678,Ann,X;Y\n", template="{{first_name}}")
    assert isinstance(results[0], Recipient)
    assert results[0].text == "Ann"


def test_file_ending_without_newline_and_trailing_blank_lines() -> None:
    assert [r.row for r in read("phone,first_name,store_name\n+4915112345678,Ann,X")] == [2]
    assert [r.row for r in read("phone,first_name,store_name\n+4915112345678,Ann,X\n\n\r\n\n")] == [2]


def test_blank_lines_between_rows_and_before_the_header() -> None:
    data = "\n\nphone,first_name,store_name\n+4915112345678,Ann,X\n\n\n+4915112345679,Bob,X\n\n"
    results = read(data)
    assert [(r.row, type(r).__name__) for r in results] == [
        (4, "Recipient"), (5, "RowProblem"), (6, "RowProblem"), (7, "Recipient")]
    assert {r.code for r in results if isinstance(r, RowProblem)} == {"empty_row"}


@pytest.mark.parametrize("line", ["   ", ",,", " , , ", "\t", ",", ",,,,"])
def test_rows_of_only_delimiters_or_whitespace_are_empty_rows(line: str) -> None:
    problem = only_problem(read(f"phone,first_name,store_name\n{line}\n"))
    assert (problem.row, problem.code, problem.phone) == (2, "empty_row", None)


# --- header ------------------------------------------------------------------------------------


def test_header_names_are_case_and_space_insensitive() -> None:
    reader = RecipientReader(parse_template(GREETING), 4)
    results = list(reader.read([" First_Name ,STORE_NAME, Mobile ,Extra\n", "Ann,X,+4915112345678,ignored\n"]))
    assert reader.columns == ["first_name", "store_name", "mobile", "extra"]
    assert reader.phone_column == "mobile"
    assert results == [Recipient(2, "+4915112345678", "Hi Ann! Stop by X", "gsm7", 1)]


@pytest.mark.parametrize("alias", ["phone", "to", "msisdn", "mobile", "number", "PHONE", " To "])
def test_phone_column_aliases(alias: str) -> None:
    reader = RecipientReader(parse_template("Sale!"), 1)
    results = list(reader.read([f"name,{alias}\n", "Ann,+4915112345678\n"]))
    assert reader.phone_column == alias.strip().lower()
    assert results == [Recipient(2, "+4915112345678", "Sale!", "gsm7", 1)]


def test_the_first_phone_alias_is_the_phone_column_and_later_ones_are_values() -> None:
    reader = RecipientReader(parse_template("call {{number}}"), 1)
    results = list(reader.read(["to,number\n", "+4915112345678,0800 123\n"]))
    assert reader.phone_column == "to"
    assert results == [Recipient(2, "+4915112345678", "call 0800 123", "gsm7", 1)]


def test_read_checks_the_header_before_returning() -> None:
    reader = RecipientReader(parse_template(GREETING), 4)
    with pytest.raises(CsvHeaderError):
        reader.read(["first_name,store_name\n"])  # no iteration needed
    results = reader.read(["phone,first_name,store_name\n"])
    assert isinstance(results, types.GeneratorType)
    assert reader.columns == ["phone", "first_name", "store_name"]
    assert list(results) == []


@pytest.mark.parametrize(
    ("lines", "code", "message", "names"),
    [
        ([], "empty_file", "the file is empty", ()),
        (["\n", "\r\n"], "empty_file", "the file is empty", ()),
        (["name,first_name,store_name\n"], "no_phone_column", "no phone column", ()),
        (["phone,First_Name,store_name, first_name \n"], "duplicate_columns", "more than once: first_name",
         ("first_name",)),
        (["phone,,store_name,first_name\n"], "empty_column_name", "column(s) 2 have no name", ("2",)),
        (["phone,first_name,store_name,\n"], "empty_column_name", "column(s) 4 have no name", ("4",)),
        (["phone\n"], "missing_tag_columns",
         "the template uses tags with no column in the CSV header: first_name, store_name",
         ("first_name", "store_name")),
        (["phone,first_name\n"], "missing_tag_columns",
         "the template uses tags with no column in the CSV header: store_name", ("store_name",)),
        (['"phone" x,first_name\n'], "malformed_header", "not valid CSV", ()),
    ],
)
def test_header_errors(lines: list[str], code: str, message: str, names: tuple[str, ...]) -> None:
    with pytest.raises(CsvHeaderError) as info:
        RecipientReader(parse_template(GREETING), 4).read(lines)
    assert info.value.code == code
    assert message in str(info.value)
    assert info.value.names == names


# --- rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+4915112345678", "+4915112345678"),
        ("  +49 151 1234-5678 ", "+4915112345678"),
        ("004915112345678", "+4915112345678"),
        ("0049 (151) 123.456.78", "+4915112345678"),
        ("+44 (0)20 7946 0958", "+442079460958"),
        ("+49\u00a0151\u00a012345678", "+4915112345678"),
        ("+1-202-555-0143", "+12025550143"),
        ("4915112345678", None),  # no country marker: not guessed
        ("015112345678", None),
        ("+0915112345678", None),
        ("+491", None),
        ("+4915112345678901234", None),
        ("+٤٩١٥١١٢٣٤٥٦٧٨", None),  # Arabic-Indic digits
        ("+" + "".join(chr(0xFF10 + int(d)) for d in "4915112345678"), None),  # full-width digits
        ("+49 151 abc", None),
        ("", None),
        ("4.91511E+12", None),
    ],
)
def test_normalize_phone(raw: str, expected: str | None) -> None:
    assert normalize_phone(raw) == expected


def test_phone_is_normalised_in_rows() -> None:
    results = read("phone,first_name,store_name\n0049 151-1234 5678,Ann,X\n")
    assert isinstance(results[0], Recipient)
    assert results[0].phone == "+4915112345678"


def test_invalid_phone_quotes_the_value_cut_to_40_characters() -> None:
    problem = only_problem(read("phone,first_name,store_name\n015112345678,Ann,X\n"))
    assert (problem.row, problem.code, problem.phone) == (2, "invalid_phone", None)
    assert "'015112345678'" in problem.reason
    long_value = "x" * 100
    problem = only_problem(read(f"phone,first_name,store_name\n{long_value},Ann,X\n"))
    assert f"'{'x' * 40}…'" in problem.reason
    assert "x" * 41 not in problem.reason
    problem = only_problem(read("phone,first_name,store_name\n ,Ann,X\n"))
    assert problem.code == "invalid_phone"
    assert "empty" in problem.reason


@pytest.mark.parametrize("value", ["", "  ", '"   "'])
def test_missing_tag_value(value: str) -> None:
    problem = only_problem(read(f"phone,first_name,store_name\n+4915112345678,{value},X\n"))
    assert (problem.row, problem.code, problem.phone) == (2, "missing_tag", "+4915112345678")
    assert problem.reason == "no value for tag first_name"


def test_unused_columns_may_be_empty() -> None:
    results = read("phone,first_name,store_name,notes\n+4915112345678,Ann,X,\n")
    assert isinstance(results[0], Recipient)


@pytest.mark.parametrize(("line", "count"), [("+4915112345678,Ann", 2), ("+4915112345678,Ann,X,Y", 4)])
def test_too_few_or_too_many_fields(line: str, count: int) -> None:
    problem = only_problem(read(f"phone,first_name,store_name\n{line}\n"))
    assert (problem.row, problem.code, problem.phone) == (2, "field_count", "+4915112345678")
    assert problem.reason == f"the row has {count} fields, the header has 3"


def test_field_count_problem_without_a_phone_field() -> None:
    problem = only_problem(read("first_name,store_name,phone\nAnn,X\n"))
    assert (problem.code, problem.phone) == ("field_count", None)


def test_unicode_names_switch_to_ucs2_and_count_parts() -> None:
    data = ("phone,first_name,store_name\n"
            "+4915112345678,أحمد,المتجر\n"
            "+4915112345679,Ann 😀,X\n"
            "+4915112345670,José,Zürich\n")
    results = read(data)
    assert all(isinstance(r, Recipient) for r in results)
    assert [(r.encoding, r.parts) for r in results if isinstance(r, Recipient)] == [
        ("ucs2", 1), ("ucs2", 1), ("gsm7", 1)]
    long_arabic = "م" * 80
    results = read(f"phone,first_name,store_name\n+4915112345678,{long_arabic},X\n")
    assert isinstance(results[0], Recipient)
    assert (results[0].encoding, results[0].parts) == count_parts(results[0].text) == ("ucs2", 2)


def test_too_many_parts() -> None:
    template = "{{first_name}} {{store_name}}"
    ok = read(f"phone,first_name,store_name\n+4915112345678,{'a' * 150},{'b' * 150}\n", template, max_parts=2)
    assert isinstance(ok[0], Recipient)
    assert ok[0].parts == 2
    problem = only_problem(read(f"phone,first_name,store_name\n+4915112345678,{'a' * 200},{'b' * 150}\n",
                                template, max_parts=2))
    assert (problem.code, problem.phone) == ("too_many_parts", "+4915112345678")
    assert problem.reason == "the rendered text needs at least 3 parts, limit is 2"  # 351 > 2 * 153 characters
    problem = only_problem(read(f"phone,first_name,store_name\n+4915112345678,{'€' * 200},X\n",
                                template, max_parts=2))
    assert problem.reason == "the rendered text needs 3 parts, limit is 2"  # 202 characters, 402 septets
    problem = only_problem(read(f"phone,first_name,store_name\n+4915112345678,{'€' * 100},X\n",
                                template, max_parts=1))
    assert problem.reason == "the rendered text needs 2 parts, limit is 1"  # € costs two septets


def test_huge_text_is_refused_without_counting_exactly() -> None:
    problem = only_problem(read(f"phone,first_name,store_name\n+4915112345678,{'a' * 100_000},X\n",
                                "{{first_name}}", max_parts=255))
    assert problem.code == "too_many_parts"
    assert problem.reason == "the rendered text needs at least 654 parts, limit is 255"


def test_max_parts_must_be_a_valid_limit() -> None:
    with pytest.raises(ValueError, match="max_parts"):
        RecipientReader(parse_template("x"), 0)
    with pytest.raises(ValueError, match="max_parts"):
        RecipientReader(parse_template("x"), 256)


def test_broken_quoting_is_one_problem_spanning_its_lines() -> None:
    data = ("phone,first_name,store_name\n"
            '+4915112345678,"Ann" x,X\n'
            "+4915112345679,Bob,X\n"
            '+4915112345670,"Cy,X\n'
            "+4915112345671,Di,X\n")
    results = read(data)
    assert [(r.row, r.code if isinstance(r, RowProblem) else "ok") for r in results] == [
        (2, "malformed_row"), (3, "ok"), (4, "malformed_row")]
    assert isinstance(results[2], RowProblem)
    assert "lines 4-5" in results[2].reason


def test_problem_codes_are_documented() -> None:
    doc = recipients.__doc__ or ""
    for code in ("invalid_phone", "missing_tag", "too_many_parts", "field_count", "empty_row", "malformed_row"):
        assert f"`{code}`" in doc


# --- scale and the fast part count -------------------------------------------------------------


def test_ten_thousand_rows_stream_in_order() -> None:
    def generate() -> Iterator[bytes]:
        yield b"phone,first_name,store_name\r\n"
        for i in range(10_000):
            yield f"+4915{i:09d},Name{i},Store\r\n".encode()

    results = RecipientReader(parse_template(GREETING), 1).read(iter_text_lines(generate()))
    assert isinstance(results, types.GeneratorType)
    count = 0
    for i, result in enumerate(results):
        assert isinstance(result, Recipient)
        assert (result.row, result.phone) == (i + 2, f"+4915{i:09d}")
        count += 1
    assert count == 10_000
