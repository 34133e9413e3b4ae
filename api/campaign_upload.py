"""A campaign's recipient upload: streamed to disk, checked whole, then accepted in batches.

1. The body is streamed into an unnamed temporary file (never held in memory; a 1,000,000-row file is
   about 50 MB of disk), checked to be UTF-8 as it arrives. A client that disconnects midway has
   written nothing.
2. What would make the file unusable as a whole answers 422 before anything is written: not UTF-8,
   or a header without a phone column (an address column for e-mail) or without a column for every
   tag. (Broken quoting in a row is that row's problem, `malformed_row`.)
3. One pass renders each row and accepts the valid ones in batches of `BATCH_ROWS`, each batch one
   transaction with its problem rows and the campaign's counters. Parsing runs in a worker thread,
   batch by batch, so the event loop keeps serving other requests (one-time passwords among them).

Should the store fail midway, the rows accepted so far stay accepted and counted, and the answer says
so (503); uploading the same file again is safe: a number already in the campaign is reported as a
duplicate, never sent twice.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import IO, Any

from fastapi import Request

from api.campaign_schemas import RowProblemOut, UploadReport
from api.email_submission import normal_address
from api.errors import ApiError
from core.domain.email import DEFAULT_MAX_BODY_BYTES, EMAIL
from core.domain.email_campaign import EmailRecipient, EmailRecipientReader, EmailTemplates
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
from core.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

BATCH_ROWS = 1000
REPORT_PROBLEMS = 100
READ_CHUNK = 256 * 1024
STATUS_CHECK_BATCHES = 20  # re-read the campaign's status this often: a cancel stops the upload
CSV_TYPES = {"text/csv", "application/csv", "text/plain", "application/octet-stream", "application/vnd.ms-excel"}


@dataclass
class Spooled:
    """The upload on disk: `file` at its start, `lines` physical lines (for progress: a quoted field
    may span lines)."""

    file: IO[bytes]
    lines: int


async def spool_body(request: Request, max_bytes: int) -> Spooled:
    """The request body in an unnamed temporary file, checked to be UTF-8 on the way."""
    ctype = request.headers.get("content-type", "text/csv").split(";")[0].strip().lower()
    if ctype not in CSV_TYPES:
        raise ApiError(415, "unsupported_media_type", f"send the recipients as text/csv, not {ctype}",
                       {"accepted": sorted(CSV_TYPES)})
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    decoder = codecs.getincrementaldecoder("utf-8")()
    size = lines = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, "payload_too_large", f"upload over {max_bytes} bytes", {"limit": max_bytes})
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                line = lines + chunk[:max(0, e.start)].count(b"\n") + 1
                raise ApiError(422, "invalid_encoding", f"the CSV is not UTF-8 (line {line})", {"line": line}) from e
            lines += chunk.count(b"\n")
            spool.write(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise ApiError(422, "invalid_encoding", f"the CSV is not UTF-8: it ends inside a character (line "
                           f"{lines + 1})", {"line": lines + 1}) from e
    except BaseException:
        spool.close()
        raise
    if size == 0:
        spool.close()
        raise ApiError(422, "invalid_csv", "the upload is empty: send a CSV with a header row")
    spool.seek(0)
    return Spooled(spool, lines)


Row = Recipient | EmailRecipient | RowProblem


def _recipient_reader(campaign: dict[str, Any], max_parts: int, max_body_bytes: int) -> RecipientReader:
    """The reader of the campaign's channel: SMS (a phone column, one template) or e-mail (an address
    column, subject/text/html templates, addresses checked with email-validator)."""
    if campaign.get("channel") != EMAIL:
        return RecipientReader(parse_template(campaign["template"]), max_parts)
    email = campaign["email"]
    templates = EmailTemplates(subject=parse_template(email["subject"]),
                               text=parse_template(email["text"]) if email["text"] else None,
                               html=parse_template(email["html"]) if email["html"] else None)
    return EmailRecipientReader(templates, sender=campaign["sender"], address=normal_address,
                                max_body_bytes=max_body_bytes)


def _reader(spool: IO[bytes], campaign: dict[str, Any], max_parts: int, max_body_bytes: int) -> Iterator[Row]:
    """The file's rows; reading the header here raises 422 if it cannot be used."""
    spool.seek(0)
    lines = iter_text_lines(iter(lambda: spool.read(READ_CHUNK), b""))
    try:
        return _recipient_reader(campaign, max_parts, max_body_bytes).read(lines)
    except CsvEncodingError as e:  # spool_body checked the encoding; kept for readers fed otherwise
        raise ApiError(422, "invalid_encoding", f"the CSV is not UTF-8: {e}", {"line": e.line}) from e
    except CsvHeaderError as e:
        raise ApiError(422, "invalid_csv_header", str(e), {"problem": e.code, "columns": list(e.names)}) from e


async def accept_upload(campaigns: CampaignStore, campaign: dict[str, Any], upload: Spooled,
                        max_parts: int, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> UploadReport:
    """Render and accept the rows in batches; the report of this upload."""
    reader = await asyncio.to_thread(_reader, upload.file, campaign, max_parts, max_body_bytes)
    await campaigns.start_upload(campaign["_id"], max(0, upload.lines - 1), utcnow())
    try:
        return await _accept_rows(campaigns, campaign, reader)
    finally:
        await campaigns.finish_upload(campaign["_id"])


async def _accept_rows(campaigns: CampaignStore, campaign: dict[str, Any],
                       reader: Iterator[Row]) -> UploadReport:
    report = UploadReport(campaign_id=campaign["_id"], rows=0, accepted=0, duplicates=0, invalid=0, problems=[],
                          problems_total=0, status=campaign["status"])
    batches = 0
    while True:
        batch = await asyncio.to_thread(lambda: list(islice(reader, BATCH_ROWS)))
        if not batch:
            break
        recipients = [r for r in batch if isinstance(r, Recipient | EmailRecipient)]
        problems = [p for p in batch if isinstance(p, RowProblem)]
        try:
            result = await campaigns.accept_batch(campaign, recipients, problems, utcnow())
        except StoreUnavailable as e:
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
