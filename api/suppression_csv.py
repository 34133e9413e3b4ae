"""The CSV of a suppression import (`POST /v1/suppressions/import`): checked whole before anything is
written, so a file with one bad row changes nothing.

UTF-8 (a BOM is fine), `,` `;` or tab separated, a header row naming an address column (`address`,
`phone`, `number`, `msisdn`, `mobile` or `to`; E.164 with `+` or `00`) and optionally `scope` (a
sender id, or `*`, the default: every sender) and `reason`.
"""

from __future__ import annotations

import csv
import io
import re

from api.errors import ApiError
from core.domain.consent import ALL_SENDERS, normalize_address
from core.domain.submission_rules import E164, SENDER_ID

MAX_IMPORT_ROWS = 10_000
MAX_REPORTED = 20
ADDRESS_COLUMNS = ("address", "phone", "number", "msisdn", "mobile", "to")
_E164 = re.compile(E164)
_SENDER = re.compile(SENDER_ID)


def parse_import(raw: bytes) -> list[tuple[str, str, str]]:
    """(address, scope, reason) of every data row; ApiError 422 (`invalid_encoding`,
    `invalid_csv_header`, `import_too_large`, `invalid_csv_rows` with the bad rows) otherwise."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(422, "invalid_encoding", f"the CSV is not UTF-8: {e}") from e
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ApiError(422, "invalid_csv_header", "the CSV has no header row", {"columns": []})
    delimiter = max((",", ";", "\t"), key=lines[0].count)
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in ADDRESS_COLUMNS if c in header), None)
    if column is None:
        raise ApiError(422, "invalid_csv_header", f"no address column (one of {', '.join(ADDRESS_COLUMNS)})",
                       {"columns": header})
    data = [(i, r) for i, r in enumerate(rows[1:], start=2) if any(f.strip() for f in r)]
    if len(data) > MAX_IMPORT_ROWS:
        raise ApiError(422, "import_too_large", f"at most {MAX_IMPORT_ROWS} rows per import",
                       {"limit": MAX_IMPORT_ROWS, "count": len(data)})
    scope_col = header.index("scope") if "scope" in header else None
    reason_col = header.index("reason") if "reason" in header else None
    out: list[tuple[str, str, str]] = []
    problems: list[dict[str, object]] = []
    for row_number, row in data:
        problem = _row(row, column, scope_col, reason_col, len(header), out)
        if problem is not None:
            problems.append({"row": row_number, "code": problem})
    if problems:
        raise ApiError(422, "invalid_csv_rows", f"{len(problems)} row(s) cannot be imported; nothing was imported",
                       {"problems": problems[:MAX_REPORTED], "count": len(problems)})
    return out


def _row(row: list[str], column: int, scope_col: int | None, reason_col: int | None, width: int,
         out: list[tuple[str, str, str]]) -> str | None:
    """Append the row's entry to `out`, or return its problem code."""
    if len(row) != width:
        return "field_count"
    value = row[column].strip()
    address = "+" + value[2:] if value.startswith("00") else value
    if not _E164.match(address):
        return "invalid_phone"
    scope = row[scope_col].strip() if scope_col is not None else ""
    scope = scope or ALL_SENDERS
    if scope != ALL_SENDERS and not _SENDER.match(scope):
        return "invalid_scope"
    reason = row[reason_col].strip()[:500] if reason_col is not None else ""
    out.append((address, normalize_address(scope), reason))
    return None
