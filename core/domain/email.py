"""E-mail as a channel: the rules an e-mail must keep to be accepted, and what a provider's answer
means for it. Pure: the address syntax check (email-validator) is passed in by the entry point, and
the MIME document is built in core/domain/email_mime.py.

An e-mail's `accepted` data (core/domain/events.py) carries `to`, `sender` (the from address) and
`text` like an SMS, plus `subject`, `html`, `from_name` and `reply_to`; `encoding` is "utf-8" and
`parts` is 1 (an e-mail is billed per message).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.domain.outcomes import SubmitDecision, Verdict, unanswered
from core.domain.retry import backoff_s

EMAIL = "email"
MAX_SUBJECT_CHARS = 998  # RFC 5322 2.1.1: a line of at most 998 characters
DEFAULT_MAX_BODY_BYTES = 1024 * 1024  # text + html, UTF-8
HEADER_FIELDS = ("to", "from", "from_name", "reply_to", "subject")


class EmailRefused(ValueError):
    """An e-mail that is not accepted: `code` is the API's stable error code, `field` the body field."""

    def __init__(self, code: str, field: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


@dataclass(frozen=True, slots=True)
class EmailContent:
    """What is sent: addresses as validated (normalised), the display name, subject and bodies."""

    to: str
    sender: str
    subject: str
    text: str = ""
    html: str = ""
    from_name: str = ""
    reply_to: str = ""

    def accepted_fields(self) -> dict[str, Any]:
        """The e-mail's own fields of its `accepted` data (the rest is common to every channel)."""
        return {"subject": self.subject, "html": self.html, "from_name": self.from_name, "reply_to": self.reply_to}

    @classmethod
    def from_accepted(cls, data: dict[str, Any]) -> EmailContent:
        return cls(to=data["to"], sender=data["sender"], subject=data.get("subject", ""), text=data.get("text", ""),
                   html=data.get("html", ""), from_name=data.get("from_name", ""), reply_to=data.get("reply_to", ""))


AddressCheck = Callable[[str], str]  # an address -> its normalised form; raises ValueError if invalid


def check_email(fields: dict[str, str], *, max_body_bytes: int, address: AddressCheck) -> EmailContent:
    """The e-mail described by `fields` (to, from, from_name, reply_to, subject, text, html), checked:
    raises EmailRefused with `header_injection` (CR or LF in a header field), `invalid_email`,
    `subject_too_long` or `body_too_large`. Header fields are checked before addresses, so an
    address with a line break is named for what it is."""
    for name in HEADER_FIELDS:
        value = fields.get(name) or ""
        if "\r" in value or "\n" in value:
            raise EmailRefused("header_injection", name, f"{name} must not contain CR or LF (header injection)")
    if len(fields.get("subject") or "") > MAX_SUBJECT_CHARS:
        raise EmailRefused("subject_too_long", "subject",
                           f"subject has {len(fields['subject'])} characters, at most {MAX_SUBJECT_CHARS}")
    size = len((fields.get("text") or "").encode()) + len((fields.get("html") or "").encode())
    if size > max_body_bytes:
        raise EmailRefused("body_too_large", "text" if fields.get("text") else "html",
                           f"text and html are {size} bytes, at most {max_body_bytes}")
    checked = {}
    for name in ("to", "from", "reply_to"):
        value = fields.get(name) or ""
        if name == "reply_to" and not value:
            checked[name] = ""
            continue
        try:
            checked[name] = address(value)
        except ValueError as e:
            raise EmailRefused("invalid_email", name, f"{name}: {e}") from e
    return EmailContent(to=checked["to"], sender=checked["from"], subject=fields.get("subject") or "",
                        text=fields.get("text") or "", html=fields.get("html") or "",
                        from_name=fields.get("from_name") or "", reply_to=checked["reply_to"])


# ---- the provider's answer ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailResult:
    """What came back for one e-mail. `code`: the SMTP reply code or HTTP status (0: no answer);
    `error`: no answer came (`maybe_sent`: the message had left this process when the connection
    dropped or timed out); `provider_id`: the provider's queue or message id when it took it."""

    code: int = 0
    text: str = ""
    provider_id: str = ""
    error: str = ""
    maybe_sent: bool = False
    protocol: str = "smtp"  # "smtp" | "http"

    @property
    def ok(self) -> bool:
        return not self.error and 200 <= self.code < 300

    @property
    def permanent(self) -> bool:
        """The provider refused this message for good (its own fault, not the route's)."""
        if self.error or self.ok:
            return False
        if self.protocol == "smtp":
            return 500 <= self.code < 600
        return 400 <= self.code < 500 and self.code not in (401, 403, 408, 429)

    @property
    def route_failed(self) -> bool:
        """Counts against the route's circuit breaker: no answer, or a temporary refusal."""
        return not self.ok and not self.permanent


def decide_mail(result: MailResult, *, policy: str, attempt: int, rng: random.Random | None = None) -> SubmitDecision:
    """The outcome of one e-mail's call to its provider (`attempt`: this attempt's number).

    - accepted (2xx): SENT;
    - no answer after the message left (time-out, dropped connection): policy `resend` -> RETRY with
      `possible_duplicate` on another route; `hold` -> UNKNOWN;
    - no answer and nothing left (no connection): RETRY on another route (NOT_SENT);
    - a temporary refusal (SMTP 4xx, HTTP 429/5xx, 401/403 of a misconfigured route): RETRY on another route;
    - a permanent refusal (SMTP 5xx, other HTTP 4xx): FAILED with the provider's code and text."""
    if result.error:
        return unanswered(result.error, result.maybe_sent, policy=policy, attempt=attempt, rng=rng,
                          exclude_route=True, what="from the provider")
    if result.ok:
        return SubmitDecision(Verdict.SENT)
    name = f"{result.protocol.upper()}_{result.code}"
    if result.permanent:
        return SubmitDecision(Verdict.FAILED, result.code, name, result.text)
    return SubmitDecision(Verdict.RETRY, result.code, name, result.text, exclude_route=True,
                          retry_in_s=backoff_s(attempt, rng=rng))


def circuit_open_decision(state: str, rng: random.Random | None = None) -> SubmitDecision:
    """An e-mail read for a route whose breaker refuses calls: not sent, retried elsewhere. Nothing was
    attempted, so the caller keeps its attempt count."""
    return SubmitDecision(Verdict.RETRY, None, "CIRCUIT_OPEN", f"the route's circuit breaker is {state}",
                          exclude_route=True, retry_in_s=backoff_s(0, rng=rng))
