"""Request and response bodies of the campaigns API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import SENDER_ID, MessageText, UtcDatetime

MAX_TEMPLATE_CHARS = 1530  # 10 GSM-7 parts before any tag is filled in


class CampaignCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strict=True)

    name: Annotated[str, Field(min_length=1, max_length=200)]
    channel: Literal["sms"] = Field(default="sms", description="Only `sms` for now")
    sender: Annotated[str, Field(alias="from", pattern=SENDER_ID, description="Sender id for every message")]
    template: Annotated[MessageText, Field(max_length=MAX_TEMPLATE_CHARS,
                                           description="Text with `{{tags}}` filled from the CSV columns of the "
                                                       "same name (case-insensitive)")]
    send_at: Annotated[UtcDatetime | None, Field(description="Start sending at this time once started; "
                                                             "default: when started")] = None
    priority: Literal["transactional", "marketing"] = Field(
        default="marketing", description="Transactional campaigns (alerts) outrank marketing ones")


class RecipientCounts(BaseModel):
    rows: int = Field(description="Data rows read from all uploads")
    accepted: int = Field(description="Rows accepted as messages")
    duplicates: int = Field(description="Rows whose number was already in the campaign")
    invalid: int = Field(description="Rows refused (invalid number, missing tag value, too long, ...)")
    parts: int = Field(description="SMS parts of the accepted messages")


class Progress(BaseModel):
    total: int = Field(description="Messages in the campaign")
    waiting: int = Field(description="Not yet handed to an SMSC (accepted, routed, retrying)")
    done_percent: float = Field(description="Share of messages handed to an SMSC or finished")
    rate_per_s: float | None = Field(default=None, description="Messages sent per second over the last minute")
    eta_s: float | None = Field(default=None, description="Seconds until the last message is sent at that rate")


class Campaign(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)

    id: str
    name: str
    status: Literal["draft", "scheduled", "running", "paused", "canceling", "canceled", "completed"]
    channel: str
    sender: str = Field(serialization_alias="from")
    template: str
    tags: list[str]
    priority: str
    send_at: datetime | None = None
    created_at: datetime
    started_at: datetime | None = None
    paused_at: datetime | None = None
    canceled_at: datetime | None = None
    completed_at: datetime | None = None
    recipients: RecipientCounts
    encodings: dict[str, int] = Field(description="Accepted messages by encoding (gsm7, ucs2)")
    problems_by_code: dict[str, int] = Field(description="Refused rows by problem code")
    counts: dict[str, int] | None = Field(
        default=None, description="Messages by state, from the reporting tables (they follow the log with the "
                                  "projector's lag; messages not projected yet count as `accepted`); null on "
                                  "the list and when reporting is unavailable")
    progress: Progress | None = None


class CampaignList(BaseModel):
    campaigns: list[Campaign] = Field(description="Newest first")
    next: datetime | None = Field(default=None, description="Pass as `before` for the next page")


class RowProblemOut(BaseModel):
    row: int = Field(description="CSV row (the header is row 1)")
    code: str = Field(description="invalid_phone, missing_tag, too_many_parts, field_count, empty_row, duplicate")
    reason: str


class UploadReport(BaseModel):
    campaign_id: str
    rows: int = Field(description="Data rows in this upload")
    accepted: int
    duplicates: int
    invalid: int
    problems: list[RowProblemOut] = Field(description="The first problems of this upload, by row")
    problems_total: int
    status: str = Field(description="The campaign's status after the upload")


class ProblemPage(BaseModel):
    problems: list[RowProblemOut]
    next_after_row: int | None = Field(default=None, description="Pass as `after_row` for the next page")
