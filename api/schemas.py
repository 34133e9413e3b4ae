"""Request and response bodies of the public API (separate models for what comes in and goes out).

Patterns use `[0-9]`, not `\\d`: pydantic-core's regex engine is Unicode-aware, so `\\d` would
accept Arabic-Indic or full-width digits that no SMSC takes.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from core.domain.submission_rules import E164, MAX_VALIDITY_S, MIN_VALIDITY_S, SENDER_ID

MAX_BATCH = 1000
MAX_TEXT_CHARS = 255 * 153  # GSM-7 characters in the most parts any server allows (Settings.max_parts <= 255)
PRIORITY_VALUES: dict[str, int] = {"transactional": 10, "marketing": 0}

_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _encodable(value: str) -> str:
    """Reject lone surrogates (JSON allows "\\ud800"): they cannot be stored as UTF-8 or sent as UCS-2."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError("text contains an invalid Unicode code point (lone surrogate)") from e
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("text must not be empty or only whitespace")
    return value


def _iso_only(value: Any) -> Any:
    """Only ISO 8601 text (or a datetime, from code): pydantic would also read a number, or a string of
    digits, as Unix time, which the documented `date-time` format does not allow."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or _NUMBER.fullmatch(value.strip()):
        raise ValueError("expected an ISO 8601 date-time with a UTC offset, e.g. 2026-05-04T10:00:00Z")
    return value


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError as e:
        raise ValueError("datetime out of range") from e


MessageText = Annotated[str, Field(min_length=1), AfterValidator(_encodable), AfterValidator(_not_blank)]
UtcDatetime = Annotated[AwareDatetime, BeforeValidator(_iso_only), AfterValidator(_to_utc)]


class MessageCreate(BaseModel):
    """One SMS to submit. The part count of `text` must not exceed the server's `max_parts`."""

    model_config = ConfigDict(extra="forbid", str_strict=True)

    to: Annotated[str, Field(pattern=E164, description="Destination in E.164, e.g. +4915112345678")]
    sender: Annotated[str, Field(alias="from", pattern=SENDER_ID,
                                 description="Sender id: up to 11 letters/digits, or up to 16 digits with optional +")]
    # The bound in the document is what no server's `max_parts` can exceed (255 parts of 153); longer
    # texts are refused as `too_many_parts` (not `validation_error`), like any text over `max_parts`.
    text: Annotated[MessageText, Field(description="Message text; GSM-7 if it fits the GSM 03.38 alphabet, else UCS-2",
                                       json_schema_extra={"maxLength": MAX_TEXT_CHARS})]
    send_at: Annotated[UtcDatetime | None,
                       Field(description="Send at this time (with a UTC offset); default now")] = None
    validity: Annotated[int | None, Field(ge=MIN_VALIDITY_S, le=MAX_VALIDITY_S,
                                          description="Seconds the message may wait for delivery")] = None
    client_ref: Annotated[str | None, Field(max_length=64, description="Your reference, echoed back"),
                          AfterValidator(lambda v: v if v is None else _encodable(v))] = None
    priority: Literal["transactional", "marketing"] = "transactional"


class MessageBatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: Annotated[list[MessageCreate], Field(min_length=1, max_length=MAX_BATCH)]


def submission_json_schema() -> dict[str, Any]:
    """OpenAPI schema of the POST /v1/messages body: one message, or a batch. Inlined (no $refs),
    because the route parses its body itself and FastAPI would not register these models."""
    single = MessageCreate.model_json_schema(by_alias=True)
    batch = MessageBatchCreate.model_json_schema(by_alias=True)
    batch.pop("$defs", None)
    batch["properties"]["messages"]["items"] = single
    return {"oneOf": [single, batch]}


class MessageAccepted(BaseModel):
    id: str
    status: Literal["accepted", "rejected"] = Field(
        default="accepted", description="`rejected`: refused at acceptance (see `reason`), never sent nor billed")
    to: str
    parts: int
    client_ref: str | None = None
    # Only in the answer when set, so an accepted message's answer keeps its shape.
    reason: str | None = Field(default=None, exclude_if=lambda v: v is None,
                               description="Only when rejected, why: `opted_out` (the recipient is on the tenant's "
                                           "suppression list)")


class MessageBatchAccepted(BaseModel):
    messages: list[MessageAccepted] = Field(description="One entry per submitted message, in request order")


class Price(BaseModel):
    amount_minor: int = Field(description="Amount in minor units of the currency (e.g. cents)")
    currency: str


class MessageStatus(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)

    id: str
    status: str = Field(description="Current state: accepted, routed, sent, delivered, undelivered, ...")
    to: str
    sender: str = Field(serialization_alias="from")
    parts: int
    encoding: str
    route_id: str | None = None
    created_at: datetime | None = Field(default=None, description="When the message was accepted")
    send_at: datetime | None = None
    sent_at: datetime | None = None
    billed: bool = False
    price: Price | None = Field(default=None, description="Set once the message is billed")
    timestamps: dict[str, datetime] = Field(default_factory=dict,
                                            description="Time of the latest event of each type, by type")
    attempts: int = 0


class MessageEvent(BaseModel):
    seq: int
    type: str
    at: datetime
    route_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class MessageEvents(BaseModel):
    id: str
    events: list[MessageEvent]


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code")
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# ---- search (read side: reporting.messages in PostgreSQL) -------------------------------------------

MAX_SEARCH_LIMIT = 500
DEFAULT_SEARCH_LIMIT = 100
# A message's `state` in the reporting tables: the type of its newest non-billing event.
SearchState = Literal["accepted", "routed", "sent", "retry", "failed", "delivered", "undelivered", "expired",
                      "rejected", "canceled", "dead_lettered", "requeued", "unknown", "inbound", "bounced",
                      "complained"]


class MessageSummary(BaseModel):
    id: str
    status: str | None = Field(description="State as projected into the reporting tables (may lag the log)")
    to: str | None = None
    route_id: str | None = None
    parts: int | None = None
    accepted_at: datetime | None = None
    delivered_at: datetime | None = Field(default=None, description="Receipt time: delivered, undelivered or expired")
    billed: bool = False
    amount_minor: int | None = Field(default=None, description="Billed amount in minor units of the currency")


class MessageSearchPage(BaseModel):
    messages: list[MessageSummary] = Field(description="Newest first: by accepted_at, then id, descending")
    next: str | None = Field(default=None, description="Pass as `after` for the next page; null on the last page")


# ---- documented error answers (OpenAPI `responses=`) ---------------------------------------------------

# What each status means in this API: the codes `api/app.py` renders. An operation declares the statuses
# it can answer with `error_responses(...)`; declaring 422 also keeps FastAPI from documenting its
# default validation shape, which this API never sends.
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Body is not valid JSON or not UTF-8 (`invalid_json`)",
    401: "Missing or invalid API key (`unauthorized`, with `WWW-Authenticate`)",
    403: "The tenant is suspended or not active (`tenant_suspended`, `forbidden`)",
    404: "No such resource (`not_found`)",
    409: "Conflicts with the resource's current state",
    413: "Body too large (`payload_too_large`)",
    415: "Body sent with a content type this operation does not take (`unsupported_media_type`)",
    422: "`validation_error` (details: `[{field, loc, type, message}]`)",
    429: "Over the tenant's submission rate (`rate_limited`, with `Retry-After`)",
    503: "MongoDB unreachable (`unavailable`, with `Retry-After`): retry later",
}

ErrorResponses = dict[int | str, dict[str, Any]]


def error_responses(*statuses: int, described: dict[int, str] | None = None) -> ErrorResponses:
    """OpenAPI `responses=` for these error statuses, each with the ErrorResponse schema; `described`
    overrides the generic descriptions (and adds its statuses)."""
    texts = {s: ERROR_DESCRIPTIONS[s] for s in statuses} | (described or {})
    return {s: {"model": ErrorResponse, "description": texts[s]} for s in sorted(texts)}


# Every operation that reads or writes MongoDB can answer 503; every authenticated one 401/403/422.
TENANT_ERRORS = error_responses(401, 403, 422, 503)
ADMIN_ERRORS = error_responses(401, 422, 503, described={
    401: "Missing or wrong admin key (`unauthorized`)", 403: "No admin key configured (`admin_disabled`)"})
# Every operation with a JSON body: refused before its fields are looked at.
JSON_BODY_ERRORS = error_responses(400, 413, 415)
NOT_FOUND = error_responses(404)


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its `$defs` inlined, for a request body the route parses itself (an
    `openapi_extra` schema cannot point into `$defs`)."""
    schema = model.model_json_schema(by_alias=True)
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]
