"""E-mail in `POST /v1/messages`: the request body of an e-mail (`"channel": "email"`), the parsing of
bodies that hold one (alone or in a batch mixing channels), and the e-mail's checks with their
stable codes (core/domain/email.py): `invalid_email`, `header_injection`, `subject_too_long`,
`body_too_large` (422, nothing written).

Addresses are checked with email-validator (syntax only: no DNS lookups at submission; no SMTPUTF8
addresses, since the mailer speaks plain SMTP) and stored in its normalised form.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from email_validator import EmailNotValidError, validate_email
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from api.errors import ApiError
from api.schemas import MAX_BATCH, MessageCreate, UtcDatetime, _encodable
from core.domain.email import EMAIL, EmailContent, EmailRefused, check_email
from core.domain.submission_rules import MAX_VALIDITY_S, MIN_VALIDITY_S
from core.store.submission import Submission

EmailText = Annotated[str, AfterValidator(_encodable)]


class EmailCreate(BaseModel):
    """One e-mail to submit: `text` and/or `html` (both: multipart/alternative)."""

    model_config = ConfigDict(extra="forbid")

    channel: Literal["email"]
    to: Annotated[EmailText, Field(min_length=1, max_length=320, description="One recipient address")]
    sender: Annotated[EmailText, Field(alias="from", min_length=1, max_length=320, description="From address")]
    from_name: Annotated[EmailText | None, Field(max_length=200, description="Display name of the sender")] = None
    reply_to: Annotated[EmailText | None, Field(max_length=320)] = None
    subject: Annotated[EmailText, Field(description="Up to 998 characters (longer: `subject_too_long`)")]
    text: EmailText | None = None
    html: EmailText | None = None
    send_at: Annotated[UtcDatetime | None, Field(description="Send at this time (with a UTC offset)")] = None
    validity: Annotated[int | None, Field(ge=MIN_VALIDITY_S, le=MAX_VALIDITY_S)] = None
    client_ref: Annotated[EmailText | None, Field(max_length=64)] = None
    priority: Literal["transactional", "marketing"] = "transactional"

    @model_validator(mode="after")
    def _has_a_body(self) -> EmailCreate:
        if not (self.text or self.html):
            raise ValueError("an e-mail needs `text`, `html` or both")
        return self


def has_channel(body: Any) -> bool:
    """Does the body (one message or a batch) name a channel anywhere? Such bodies are parsed here."""
    items = body.get("messages") if isinstance(body, dict) and "messages" in body else [body]
    return isinstance(items, list) and any(isinstance(m, dict) and "channel" in m for m in items)


def parse_with_channels(body: Any, is_batch: bool) -> list[MessageCreate | EmailCreate]:
    """The messages of a body whose items may name their channel (`sms`, the default, or `email`);
    errors carry body paths like those of an SMS-only body."""
    if is_batch:
        items = body.get("messages")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
            raise RequestValidationError([{"type": "list_type", "loc": ("body", "messages"),
                                           "msg": f"messages must be a list of 1..{MAX_BATCH} messages"}])
        extra = sorted(set(body) - {"messages"})
        if extra:
            raise RequestValidationError([{"type": "extra_forbidden", "loc": ("body", extra[0]),
                                           "msg": "Extra inputs are not permitted"}])
    else:
        items = [body]
    out: list[MessageCreate | EmailCreate] = []
    errors: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        prefix: tuple[Any, ...] = ("body", "messages", i) if is_batch else ("body",)
        try:
            out.append(_one(item))
        except ValidationError as e:
            errors.extend({**err, "loc": (*prefix, *err["loc"])}
                          for err in e.errors(include_url=False, include_input=False))
    if errors:
        raise RequestValidationError(errors)
    return out


def _one(item: Any) -> MessageCreate | EmailCreate:
    if isinstance(item, dict) and item.get("channel") == EMAIL:
        return EmailCreate.model_validate(item)
    if isinstance(item, dict) and item.get("channel", "sms") == "sms":
        return MessageCreate.model_validate({k: v for k, v in item.items() if k != "channel"})
    return EmailCreate.model_validate(item)  # names what is wrong with the channel


def normal_address(address: str) -> str:
    """The normalised address, or ValueError saying why it is not one."""
    try:
        return validate_email(address, check_deliverability=False, allow_smtputf8=False).normalized
    except EmailNotValidError as e:
        raise ValueError(str(e)) from e


def email_submission(m: EmailCreate, *, index: int | None, max_body_bytes: int,
                     default_validity_s: int) -> Submission:
    """The Submission of an e-mail; ApiError 422 with the e-mail's code if a check refuses it."""
    fields = {"to": m.to, "from": m.sender, "from_name": m.from_name or "", "reply_to": m.reply_to or "",
              "subject": m.subject, "text": m.text or "", "html": m.html or ""}
    try:
        content: EmailContent = check_email(fields, max_body_bytes=max_body_bytes, address=normal_address)
    except EmailRefused as e:
        field = f"body.{e.field}" if index is None else f"body.messages.{index}.{e.field}"
        raise ApiError(422, e.code, str(e), {"field": field}) from e
    return Submission(to=content.to, sender=content.sender, text=content.text, encoding="utf-8", parts=1,
                      transactional=m.priority == "transactional",
                      validity_s=m.validity if m.validity is not None else default_validity_s,
                      send_at=m.send_at, client_ref=m.client_ref, channel=EMAIL, email=content.accepted_fields())


def email_submissions(messages: list[Any], is_batch: bool, *, max_body_bytes: int,
                      default_validity_s: int) -> dict[int, Submission]:
    """Index -> Submission of each e-mail among `messages` (checked: ApiError 422 on the first refused)."""
    return {i: email_submission(m, index=i if is_batch else None, max_body_bytes=max_body_bytes,
                                default_validity_s=default_validity_s)
            for i, m in enumerate(messages) if isinstance(m, EmailCreate)}
