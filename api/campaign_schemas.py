"""Request and response bodies of the campaigns API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from api.schemas import SENDER_ID, MessageText, UtcDatetime, _encodable

MAX_TEMPLATE_CHARS = 1530  # 10 GSM-7 parts before any tag is filled in


class CampaignCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strict=True)

    name: Annotated[str, Field(min_length=1, max_length=200)]
    channel: Literal["sms"] = Field(default="sms", description="`sms` (the default) or `email` (EmailCampaignCreate)")
    sender: Annotated[str, Field(alias="from", pattern=SENDER_ID, description="Sender id for every message")]
    template: Annotated[MessageText, Field(max_length=MAX_TEMPLATE_CHARS,
                                           description="Text with `{{tags}}` filled from the CSV columns of the "
                                                       "same name (case-insensitive)")]
    send_at: Annotated[UtcDatetime | None, Field(description="Start sending at this time once started; "
                                                             "default: when started")] = None
    priority: Literal["transactional", "marketing"] = Field(
        default="marketing", description="Transactional campaigns (alerts) outrank marketing ones")


EmailTemplateText = Annotated[str, Field(min_length=1), AfterValidator(_encodable)]
MAX_EMAIL_TEMPLATE_CHARS = 1024 * 1024  # the default body limit (MSGCORE_EMAIL_MAX_BODY_BYTES) checks the filled one


class EmailCampaignCreate(BaseModel):
    """An e-mail campaign: `subject`, `text` and `html` are templates (`{{tags}}`; values are HTML-escaped
    in `html`); at least one of `text` and `html`."""

    model_config = ConfigDict(extra="forbid", str_strict=True)

    name: Annotated[str, Field(min_length=1, max_length=200)]
    channel: Literal["email"]
    sender: Annotated[EmailTemplateText, Field(alias="from", max_length=320, description="From address")]
    from_name: Annotated[EmailTemplateText | None, Field(max_length=200, description="Display name")] = None
    reply_to: Annotated[EmailTemplateText | None, Field(max_length=320)] = None
    subject: Annotated[EmailTemplateText, Field(max_length=998, description="Subject template (at most 998 "
                                                                            "characters once filled, no line breaks)")]
    text: Annotated[EmailTemplateText | None, Field(max_length=MAX_EMAIL_TEMPLATE_CHARS)] = None
    html: Annotated[EmailTemplateText | None, Field(max_length=MAX_EMAIL_TEMPLATE_CHARS)] = None
    send_at: Annotated[UtcDatetime | None, Field(description="Start sending at this time once started; "
                                                             "default: when started")] = None
    priority: Literal["transactional", "marketing"] = Field(
        default="marketing", description="Transactional campaigns (alerts) outrank marketing ones")

    @model_validator(mode="after")
    def _has_a_body(self) -> EmailCampaignCreate:
        if not (self.text or self.html):
            raise ValueError("an e-mail campaign needs `text`, `html` or both")
        return self


def campaign_create_json_schema() -> dict[str, Any]:
    """OpenAPI schema of the POST /v1/campaigns body: an SMS or an e-mail campaign. Inlined (no $refs):
    the route parses its body itself (by `channel`)."""
    return {"oneOf": [CampaignCreate.model_json_schema(by_alias=True),
                      EmailCampaignCreate.model_json_schema(by_alias=True)]}


class EmailTemplatesOut(BaseModel):
    subject: str
    text: str
    html: str
    from_name: str
    reply_to: str


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
    email: EmailTemplatesOut | None = Field(default=None, description="An e-mail campaign's templates and "
                                                                      "headers (`template` is its text)")
    encodings: dict[str, int] = Field(description="Accepted messages by encoding (gsm7, ucs2; utf-8 for e-mail)")
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
    code: str = Field(description="invalid_phone, missing_tag, too_many_parts, field_count, empty_row, duplicate, "
                                  "opted_out; for e-mail: invalid_email, header_injection, subject_too_long, "
                                  "body_too_large, suppressed")
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
