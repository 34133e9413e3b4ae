"""Request and response bodies of the public API (separate models for what comes in and goes out).

Patterns use `[0-9]`, not `\\d`: pydantic-core's regex engine is Unicode-aware, so `\\d` would
accept Arabic-Indic or full-width digits that no SMSC takes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

MAX_BATCH = 1000
MIN_VALIDITY_S = 60
MAX_VALIDITY_S = int(timedelta(days=7).total_seconds())
PRIORITY_VALUES: dict[str, int] = {"transactional": 10, "marketing": 0}

E164 = r"^\+[1-9][0-9]{6,14}$"
# Numeric sender (optionally with +) of up to 16 digits, or an alphanumeric sender id of up to 11.
SENDER_ID = r"^(?:\+?[0-9]{1,16}|[A-Za-z0-9]{1,11})$"


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


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError as e:
        raise ValueError("datetime out of range") from e


MessageText = Annotated[str, Field(min_length=1), AfterValidator(_encodable), AfterValidator(_not_blank)]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]


class MessageCreate(BaseModel):
    """One SMS to submit. The part count of `text` must not exceed the server's `max_parts`."""

    model_config = ConfigDict(extra="forbid", str_strict=True)

    to: Annotated[str, Field(pattern=E164, description="Destination in E.164, e.g. +4915112345678")]
    sender: Annotated[str, Field(alias="from", pattern=SENDER_ID,
                                 description="Sender id: up to 11 letters/digits, or up to 16 digits with optional +")]
    text: Annotated[MessageText, Field(description="Message text; GSM-7 if it fits the GSM 03.38 alphabet, else UCS-2")]
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
    status: Literal["accepted"] = "accepted"
    to: str
    parts: int
    client_ref: str | None = None


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


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    mongo: Literal["ok"] = "ok"


# ---- search (read side: reporting.messages in PostgreSQL) -------------------------------------------

MAX_SEARCH_LIMIT = 500
DEFAULT_SEARCH_LIMIT = 100
# A message's `state` in the reporting tables: the type of its newest non-billing event.
SearchState = Literal["accepted", "routed", "sent", "retry", "failed", "delivered", "undelivered", "expired",
                      "rejected", "canceled", "dead_lettered", "requeued", "unknown", "inbound"]


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


# OpenAPI documentation of the errors every tenant-authenticated route can answer. Declaring 422
# keeps FastAPI from documenting its default validation shape, which this API never sends.
TENANT_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key (`unauthorized`)"},
    403: {"model": ErrorResponse, "description": "The tenant is suspended (`tenant_suspended`)"},
    422: {"model": ErrorResponse, "description": "`validation_error`"},
}
