"""E-mail campaigns: the templates of subject, text and html, and the recipient CSV read into rendered
e-mails or row problems.

Pure: standard library and the domain only. The address check (email-validator) is passed in by the
entry point, as for single e-mails (api/email_submission.py `normal_address`).

The CSV is read as for SMS (core/domain/recipients.py: delimiters, quoting, row numbers, `empty_row`,
`field_count`, `malformed_row`, `missing_tag`), with an address column (`email`, `e-mail`, `mail` or
`address`, case-insensitive) instead of a phone column. Per row, beyond those codes:

- `invalid_email`: the address is not one (the reason quotes it and says why);
- `header_injection`: the subject holds CR or LF once its tags are filled in;
- `subject_too_long`, `body_too_large`: the filled subject or bodies are over the limits of any e-mail
  (core/domain/email.py `check_email`).

Tag values are inserted verbatim in subject and text, and HTML-escaped (`html.escape`, quotes too) in
html: a value never adds markup. Duplicate addresses (by normalised address) are found by the store,
which sees every batch, as for numbers.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from core.domain.email import AddressCheck, EmailRefused, check_email
from core.domain.recipients import MISSING_TAG, SHOWN_VALUE_CHARS, RecipientReader, RowProblem
from core.domain.templates import MissingTag, Template, render

EMAIL_COLUMNS = ("email", "e-mail", "mail", "address")
INVALID_EMAIL = "invalid_email"


@dataclass(frozen=True, slots=True)
class EmailTemplates:
    """An e-mail campaign's templates; `text` and/or `html` (at least one). `tags` is every tag of the
    three, in order of first appearance (subject, text, html); `source` is the text template (or "")."""

    subject: Template
    text: Template | None
    html: Template | None

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for tpl in (self.subject, self.text, self.html) if tpl for t in tpl.tags))

    @property
    def source(self) -> str:
        return self.text.source if self.text else ""

    def sources(self) -> dict[str, str]:
        return {"subject": self.subject.source, "text": self.source, "html": self.html.source if self.html else ""}


@dataclass(frozen=True, slots=True)
class EmailRecipient:
    """A valid row: its number, the normalised address and the rendered e-mail (billed as one part)."""

    row: int
    to: str
    subject: str
    text: str
    html: str
    encoding: str = "utf-8"
    parts: int = 1


class EmailRecipientReader(RecipientReader):
    """Reads a recipient CSV for an e-mail campaign into `EmailRecipient`s and `RowProblem`s (whose
    `phone` holds the normalised address when the row had a valid one)."""

    address_columns = EMAIL_COLUMNS
    address_kind = "email"

    def __init__(self, templates: EmailTemplates, *, sender: str, address: AddressCheck, max_body_bytes: int) -> None:
        super().__init__(templates.subject, 1)
        self.tags = templates.tags
        self.templates = templates
        self.sender = sender
        self.check = address
        self.max_body_bytes = max_body_bytes
        self._html_tags = frozenset(templates.html.tags) if templates.html else frozenset()

    def _address(self, raw: str) -> str | None:
        try:
            return self.check(raw.strip())
        except ValueError:
            return None

    def _invalid_address(self, row: int, raw: str) -> RowProblem:
        value = raw.strip()
        if not value:
            return RowProblem(row, INVALID_EMAIL, "the e-mail address is empty", None)
        shown = value if len(value) <= SHOWN_VALUE_CHARS else value[:SHOWN_VALUE_CHARS] + "…"
        try:
            self.check(value)
            why = "not accepted"
        except ValueError as e:
            why = str(e)
        return RowProblem(row, INVALID_EMAIL, f"invalid e-mail address {shown!r}: {why}", None)

    def _render(self, row: int, phone: str, values: dict[str, str]) -> EmailRecipient | RowProblem:  # type: ignore[override]
        t = self.templates
        try:
            subject = render(t.subject, values)
            text = render(t.text, values) if t.text else ""
            escaped = {k: html.escape(v) for k, v in values.items() if k in self._html_tags}
            body = render(t.html, escaped) if t.html else ""
        except MissingTag as e:
            return RowProblem(row, MISSING_TAG, str(e), phone)
        fields = {"to": phone, "from": self.sender, "subject": subject, "text": text, "html": body}
        try:
            # Addresses were checked already (the row's above, the campaign's at creation): kept as they are.
            check_email(fields, max_body_bytes=self.max_body_bytes, address=lambda a: a)
        except EmailRefused as e:
            return RowProblem(row, e.code, str(e), phone)
        return EmailRecipient(row, phone, subject, text, body)
