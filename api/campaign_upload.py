"""A campaign's recipient upload: streamed to disk, checked whole, then accepted in batches.

1. The body is streamed into an unnamed temporary file (never held in memory; a 1,000,000-row file is
   about 50 MB of disk). A client that disconnects midway has written nothing.
2. A first pass over the file checks what would make it unusable as a whole: UTF-8, the header (a
   phone column, a column for every tag), the CSV structure. Any of these answers 422 and nothing is
   written.
3. A second pass renders each row and accepts the valid ones in batches of `BATCH_ROWS`, each batch
   one transaction with its problem rows and the campaign's counters. Parsing runs in a worker thread,
   batch by batch, so the event loop keeps serving other requests (one-time passwords among them).

Should the store fail midway, the rows accepted so far stay accepted and counted, and the answer says
so (503); uploading the same file again is safe: a number already in the campaign is reported as a
duplicate, never sent twice.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import tempfile
from collections.abc import Iterator
from itertools import islice
from typing import IO, Any

from fastapi import Request
from pymongo.errors import ConnectionFailure, OperationFailure

from api.campaign_schemas import RowProblemOut, UploadReport
from api.deps import ApiError
from core.domain.events import utcnow
from core.domain.recipients import (
    CsvEncodingError,
    CsvHeaderError,
    Recipient,
    RecipientReader,
    RowProblem,
    iter_text_lines,
)
from core.domain.templates import parse_template
from core.store.campaigns import CampaignStore

log = logging.getLogger(__name__)

BATCH_ROWS = 1000
REPORT_PROBLEMS = 100
READ_CHUNK = 256 * 1024
STATUS_CHECK_BATCHES = 20  # re-read the campaign's status this often: a cancel stops the upload
CSV_TYPES = {"text/csv", "application/csv", "text/plain", "application/octet-stream", "application/vnd.ms-excel"}


async def spool_body(request: Request, max_bytes: int) -> IO[bytes]:
    """The request body in an unnamed temporary file, positioned at its start."""
    ctype = request.headers.get("content-type", "text/csv").split(";")[0].strip().lower()
    if ctype not in CSV_TYPES:
        raise ApiError(415, "unsupported_media_type", f"send the recipients as text/csv, not {ctype}",
                       {"accepted": sorted(CSV_TYPES)})
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, "payload_too_large", f"upload over {max_bytes} bytes", {"limit": max_bytes})
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    if size == 0:
        spool.close()
        raise ApiError(422, "invalid_csv", "the upload is empty: send a CSV with a header row")
    spool.seek(0)
    return spool


def _reader(spool: IO[bytes], template_source: str, max_parts: int) -> Iterator[Recipient | RowProblem]:
    spool.seek(0)
    lines = iter_text_lines(iter(lambda: spool.read(READ_CHUNK), b""))
    return RecipientReader(parse_template(template_source), max_parts).read(lines)


def check_file(spool: IO[bytes], template_source: str, max_parts: int) -> int:
    """First pass: raise ApiError 422 if the file cannot be used at all; else the number of data rows."""
    try:
        return sum(1 for _ in _reader(spool, template_source, max_parts))
    except CsvEncodingError as e:
        raise ApiError(422, "invalid_encoding", f"the CSV is not UTF-8: {e}", {"line": e.line}) from e
    except CsvHeaderError as e:
        raise ApiError(422, "invalid_csv_header", str(e), {"problem": e.code, "columns": list(e.names)}) from e
    except csv.Error as e:
        raise ApiError(422, "invalid_csv", f"the CSV cannot be read: {e}") from e


async def accept_upload(campaigns: CampaignStore, campaign: dict[str, Any], spool: IO[bytes],
                        max_parts: int) -> UploadReport:
    """Second pass: render and accept the rows in batches; the report of this upload."""
    rows = await asyncio.to_thread(check_file, spool, campaign["template"], max_parts)
    await campaigns.start_upload(campaign["_id"], rows, utcnow())
    try:
        return await _accept_rows(campaigns, campaign, spool, max_parts)
    finally:
        await campaigns.finish_upload(campaign["_id"])


async def _accept_rows(campaigns: CampaignStore, campaign: dict[str, Any], spool: IO[bytes],
                       max_parts: int) -> UploadReport:
    reader = _reader(spool, campaign["template"], max_parts)
    report = UploadReport(campaign_id=campaign["_id"], rows=0, accepted=0, duplicates=0, invalid=0, problems=[],
                          problems_total=0, status=campaign["status"])
    batches = 0
    while True:
        batch = await asyncio.to_thread(lambda: list(islice(reader, BATCH_ROWS)))
        if not batch:
            break
        recipients = [r for r in batch if isinstance(r, Recipient)]
        problems = [p for p in batch if isinstance(p, RowProblem)]
        try:
            result = await campaigns.accept_batch(campaign, recipients, problems, utcnow())
        except (ConnectionFailure, OperationFailure) as e:
            log.warning("campaign=%s tenant=%s: upload stopped at row %d, store unavailable: %s", campaign["_id"],
                        campaign["tenant_id"], batch[0].row, e)
            raise ApiError(503, "unavailable", "the store became unavailable during the upload; the rows before "
                           f"row {batch[0].row} are accepted. Upload the same file again: numbers already in the "
                           "campaign are reported as duplicates, not sent twice",
                           {"accepted": report.accepted, "stopped_at_row": batch[0].row},
                           headers={"Retry-After": "5"}) from e
        report.rows += len(batch)
        report.accepted += result.accepted
        report.duplicates += result.duplicates
        report.invalid += result.invalid
        report.problems_total += len(result.problems)
        room = REPORT_PROBLEMS - len(report.problems)
        if room > 0:
            report.problems.extend(RowProblemOut(row=p.row, code=p.code, reason=p.reason)
                                   for p in sorted(result.problems, key=lambda p: p.row)[:room])
        batches += 1
        if batches % STATUS_CHECK_BATCHES == 0:
            campaign = await campaigns.get(campaign["tenant_id"], campaign["_id"])
            if campaign["status"] in ("canceling", "canceled"):
                log.info("campaign=%s: canceled during the upload; stopped after %d rows", campaign["_id"],
                         report.rows)
                break
    report.problems.sort(key=lambda p: p.row)
    report.status = (await campaigns.get(campaign["tenant_id"], campaign["_id"]))["status"]
    log.info("campaign=%s tenant=%s: upload of %d rows: %d accepted, %d duplicates, %d invalid", campaign["_id"],
             campaign["tenant_id"], report.rows, report.accepted, report.duplicates, report.invalid)
    return report
