"""Submission, status, audit trail and search of messages.

Status and audit trail read the log (MongoDB); search reads the reporting tables (PostgreSQL), which
follow the log with the projector's lag.

POST parses its body itself (rather than declaring a pydantic parameter) for three reasons: the body
is one message *or* a batch, and a union would report every error twice, once per member; a batch
over the limit is refused before 1,001 messages are validated; and the idempotency hash needs the
parsed JSON as sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api import read_side
from api.deps import EventStoreDep, ReportingPoolDep, SettingsDep, SubmissionDep, TenantDep, charge_submission
from api.email_submission import email_submissions, has_channel, parse_with_channels
from api.errors import ApiError
from api.schemas import (
    DEFAULT_SEARCH_LIMIT,
    E164,
    MAX_BATCH,
    MAX_SEARCH_LIMIT,
    TENANT_ERRORS,
    MessageAccepted,
    MessageBatchAccepted,
    MessageBatchCreate,
    MessageCreate,
    MessageEvent,
    MessageEvents,
    MessageSearchPage,
    MessageStatus,
    MessageSummary,
    Price,
    SearchState,
    UtcDatetime,
    error_responses,
    submission_json_schema,
)
from core.domain.errors import TooManyParts
from core.domain.events import Event, EventType, utcnow
from core.domain.message import MessageState, fold
from core.submission_service import Idempotency, Submission

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/messages", tags=["messages"])

# GSM-7 multipart holds 153 characters per part at most (UCS-2 fewer), so longer texts cannot fit
# `max_parts`; refusing them before encoding keeps a huge text from costing CPU.
MAX_CHARS_PER_PART = 153
SINGLE_PART_CHARS = 160
MAX_MESSAGE_ID_LEN = 64

ERRORS = TENANT_ERRORS | error_responses(404, described={404: "No such message for this tenant (`not_found`)"})
SUBMIT_ERRORS = TENANT_ERRORS | error_responses(400, 413, 415, 422, 429, described={
    422: "`validation_error`, `too_many_parts`, `batch_too_large`, `idempotency_key_reused`, "
         "`batch_exceeds_rate_limit`",
    429: "Over the tenant's submission rate (`rate_limited`, with `Retry-After`); nothing was accepted"})

# Longer ids are answered 404 like any unknown id (the code checks the length), not 422.
MessageId = Annotated[str, Path(json_schema_extra={"maxLength": MAX_MESSAGE_ID_LEN})]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=128, pattern=r"^[\x20-\x7e]+$",
           description="Retry-safe submission: the same key (per tenant) with the same body returns the "
                       "same ids and creates nothing new"),
]


# ---- POST /v1/messages ----------------------------------------------------------------------------

@router.post(
    "",
    status_code=202,
    response_model=MessageAccepted | MessageBatchAccepted,
    responses=SUBMIT_ERRORS,
    summary="Submit one message or a batch",
    description=f"Body: one message object, or `{{\"messages\": [...]}}` with 1..{MAX_BATCH} of them. "
                "The whole batch is accepted or refused as one. The answer lists the ids in request order.",
    openapi_extra={"requestBody": {"required": True,
                                   "content": {"application/json": {"schema": submission_json_schema()}}}},
)
async def submit_messages(
    request: Request,
    response: Response,
    tenant: TenantDep,
    submissions: SubmissionDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> MessageAccepted | MessageBatchAccepted:
    body = await read_json(request)
    messages, is_batch = _validate_submission(body)
    emails = email_submissions(messages, is_batch, max_body_bytes=settings.email_max_body_bytes,
                               default_validity_s=settings.default_validity_s)
    encodings = [("utf-8", 1) if i in emails
                 else _encoding_and_parts(m.text, settings.max_parts, i if is_batch else None)
                 for i, m in enumerate(messages)]
    # Charged once the request is known valid, before anything is written: a 429 writes nothing. An
    # idempotent replay is charged like any request (simplest; a client replays rarely).
    charge_submission(request, tenant, len(messages))
    items = [emails[i] if i in emails else _submission(m, enc, parts, settings.default_validity_s)
             for i, (m, (enc, parts)) in enumerate(zip(messages, encodings, strict=True))]
    idempotency = None if idempotency_key is None else Idempotency(idempotency_key, _request_hash(body))
    submitted = await submissions.submit(tenant.id, items, utcnow(), idempotency)
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    accepted = [MessageAccepted(id=mid, to=m.to, parts=parts, client_ref=m.client_ref,
                                status="rejected" if mid in submitted.rejected else "accepted",
                                reason=submitted.rejected.get(mid))
                for mid, m, (_, parts) in zip(submitted.ids, messages, encodings, strict=True)]
    return MessageBatchAccepted(messages=accepted) if is_batch else accepted[0]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request) -> Any:
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.split(";")[0].lower():
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.body()
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {e}") from e


def _validate_submission(body: Any) -> tuple[list[Any], bool]:
    """The messages of a single or batch body, and whether it was a batch; errors carry body paths."""
    is_batch = isinstance(body, dict) and "messages" in body
    if is_batch and isinstance(body["messages"], list) and len(body["messages"]) > MAX_BATCH:
        raise ApiError(422, "batch_too_large", f"a batch holds at most {MAX_BATCH} messages",
                       {"limit": MAX_BATCH, "count": len(body["messages"])})
    if has_channel(body):  # e-mail, or a batch mixing channels (api/email_submission.py)
        return parse_with_channels(body, is_batch), is_batch
    try:
        if is_batch:
            return MessageBatchCreate.model_validate(body).messages, True
        return [MessageCreate.model_validate(body)], False
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False, include_input=False)]
        raise RequestValidationError(errors) from e


def _encoding_and_parts(text: str, max_parts: int, index: int | None) -> tuple[str, int]:
    """(encoding, parts) of `text`; raises `too_many_parts` over `max_parts`."""
    from core.domain.encoding import MessageTooLong, count_parts

    if len(text) > SINGLE_PART_CHARS and len(text) > max_parts * MAX_CHARS_PER_PART:
        # At least this many parts; counting exactly would only cost time.
        raise _too_many_parts(-(-len(text) // MAX_CHARS_PER_PART), max_parts, index)
    try:
        encoding, parts = count_parts(text)
    except MessageTooLong as e:
        raise _too_many_parts(e.part_count, max_parts, index) from e
    if parts > max_parts:
        raise _too_many_parts(parts, max_parts, index)
    return encoding, parts


def _too_many_parts(parts: int, limit: int, index: int | None) -> ApiError:
    err = TooManyParts(parts, limit)
    field = "body.text" if index is None else f"body.messages.{index}.text"
    return ApiError(422, err.code, str(err), {"field": field, "parts": err.parts, "limit": err.limit})


def _submission(m: MessageCreate, encoding: str, parts: int, default_validity_s: int) -> Submission:
    return Submission(to=m.to, sender=m.sender, text=m.text, encoding=encoding, parts=parts,
                      transactional=m.priority == "transactional",
                      validity_s=m.validity if m.validity is not None else default_validity_s,
                      send_at=m.send_at, client_ref=m.client_ref)


def _request_hash(body: Any) -> str:
    # ensure_ascii keeps the canonical form byte-stable whatever the characters.
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---- GET /v1/messages (search) -------------------------------------------------------------------

SEARCH_ERRORS = TENANT_ERRORS | error_responses(422, 503, described={
    422: "`validation_error` (bad filter, limit or cursor)",
    503: "`reporting_unavailable`: no PostgreSQL configured or reachable, or no reporting tables yet; "
         "`unavailable`: MongoDB unreachable"})


def encode_cursor(accepted_at: datetime, message_id: str) -> str:
    """The opaque `after` cursor of a page's last row (url-safe base64 of JSON)."""
    raw = json.dumps({"a": accepted_at.astimezone(UTC).isoformat(), "i": message_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(accepted_at, message_id) of a cursor; 422 `validation_error` on `query.after` if it is not one."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at, mid = datetime.fromisoformat(raw["a"]), raw["i"]
        if at.tzinfo is None or not isinstance(mid, str):
            raise ValueError("malformed cursor")
        return at, mid
    except (ValueError, TypeError, KeyError, binascii.Error) as e:
        raise _query_error("after", "invalid cursor: pass the `next` value of a previous page") from e


def _query_error(name: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("query", name), "msg": message}])


@router.get("", response_model=MessageSearchPage, responses=SEARCH_ERRORS, summary="Search messages",
            description="The caller's messages from the reporting tables (PostgreSQL), newest first, filtered by "
                        "state, campaign, destination and acceptance time (`since` inclusive, `until` exclusive). "
                        "Keyset pagination: pass a page's `next` as `after`. The reporting tables follow the log "
                        "with the projector's lag; `GET /v1/messages/{id}` reads the log itself.")
async def search_messages(
    tenant: TenantDep,
    pool: ReportingPoolDep,
    settings: SettingsDep,
    state: Annotated[SearchState | None, Query(description="Current state")] = None,
    campaign_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    to: Annotated[str | None, Query(pattern=E164, description="Destination in E.164")] = None,
    since: Annotated[UtcDatetime | None, Query(description="Accepted at or after (ISO 8601 with a zone)")] = None,
    until: Annotated[UtcDatetime | None, Query(description="Accepted before (ISO 8601 with a zone)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_SEARCH_LIMIT)] = DEFAULT_SEARCH_LIMIT,
    after: Annotated[str | None, Query(max_length=512, description="Cursor: `next` of the previous page")] = None,
) -> MessageSearchPage:
    if since is not None and until is not None and until <= since:
        raise _query_error("until", "until must be later than since")
    cursor = decode_cursor(after) if after is not None else None
    filters = read_side.SearchFilters(state=state, campaign_id=campaign_id, to=to, since=since, until=until)
    rows = await read_side.search_messages(pool, settings.reporting_schema, tenant.id, filters, cursor, limit)
    items = [MessageSummary(id=r["message_id"], status=r["state"], to=r["to_number"], route_id=r["route_id"],
                            parts=r["parts"], accepted_at=_as_utc(r["accepted_at"]),
                            delivered_at=_as_utc(r["delivered_at"]), billed=r["billed"],
                            amount_minor=r["amount_minor"]) for r in rows]
    last = rows[-1] if len(rows) == limit else None
    log.debug("tenant %s: search returned %d message(s)", tenant.id, len(items))
    return MessageSearchPage(messages=items,
                             next=encode_cursor(last["accepted_at"], last["message_id"]) if last else None)


def _as_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


# ---- GET /v1/messages/{id} ------------------------------------------------------------------------

@router.get("/{message_id}", response_model=MessageStatus, responses=ERRORS,
            summary="Current status of a message",
            description="The fold of the message's events in the log (read through the unique index), "
                        "so a message is visible as soon as its submission was answered.")
async def get_message(message_id: MessageId, tenant: TenantDep, store: EventStoreDep) -> MessageStatus:
    events = await store.load_events(message_id) if len(message_id) <= MAX_MESSAGE_ID_LEN else []
    if not events or events[0].tenant_id != tenant.id:
        raise _not_found(message_id)
    state = fold(events)
    assert state is not None  # a message has at least its first event
    return _status(state, events)


def _status(state: MessageState, events: Sequence[Event]) -> MessageStatus:
    timestamps = {e.type.value: e.at for e in events}  # later events of a type overwrite earlier ones
    billed = next((e for e in reversed(events) if e.type == EventType.BILLED), None)
    price = None
    if billed is not None:
        price = Price(amount_minor=billed.data.get("amount", 0),
                      currency=billed.data.get("currency", state.currency))
    return MessageStatus(
        id=state.message_id, status=state.state, to=state.to, sender=state.sender,
        parts=state.parts, encoding=state.encoding, route_id=state.route_id,
        created_at=state.accepted_at, send_at=state.send_at, sent_at=state.sent_at,
        billed=state.billed, price=price, timestamps=timestamps, attempts=state.attempts,
    )


# ---- GET /v1/messages/{id}/events -----------------------------------------------------------------

@router.get("/{message_id}/events", response_model=MessageEvents, responses=ERRORS,
            summary="Audit trail of a message", description="Every event of the message, in order, from the log.")
async def get_message_events(message_id: MessageId, tenant: TenantDep, store: EventStoreDep) -> MessageEvents:
    events = await store.load_events(message_id) if len(message_id) <= MAX_MESSAGE_ID_LEN else []
    if not events or events[0].tenant_id != tenant.id:
        raise _not_found(message_id)
    return MessageEvents(id=message_id, events=[
        MessageEvent(seq=e.seq, type=e.type.value, at=e.at, route_id=e.route_id, data=e.data) for e in events
    ])


def _not_found(message_id: str) -> ApiError:
    return ApiError(404, "not_found", "no such message", {"id": message_id[:MAX_MESSAGE_ID_LEN]})
