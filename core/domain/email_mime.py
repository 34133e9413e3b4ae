"""The MIME document of an e-mail, written directly as bytes (pure).

- Subject and display names outside ASCII are encoded words (RFC 2047, `email.header` /
  `email.utils.formataddr`); the head is 7-bit ASCII, lines end in CRLF;
- text and html together are `multipart/alternative` (text first: the last part is the preferred one);
- bodies are UTF-8 in quoted-printable (7-bit safe: no server needs 8BITMIME), by `binascii.b2a_qp`;
- `Message-ID` is `<message id@sender's domain>`: stable across resends of the same message, so a
  receiving system can tell a duplicate; `Date` is the time of sending.

Written by hand rather than through `email.message.EmailMessage` (policy SMTP): the header registry
parsed and re-folded every header of every e-mail and cost the mailer about 15 % of its CPU. The
boundary `=_<message id>` can never occur inside a quoted-printable body ("=" is always "=3D" there).
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.utils import format_datetime, formataddr

from core.domain.email import EmailContent

FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters ...
MAX_LINE = 998  # ... and MUST be at most 998
CRLF = b"\r\n"


@dataclass(frozen=True, slots=True)
class Mime:
    """An e-mail as it goes on the wire (before SMTP dot-stuffing)."""

    raw: bytes
    message_id_header: str
    msgcore_id: str


def message_id_header(message_id: str, sender: str) -> str:
    domain = sender.rpartition("@")[2] or "msgcore.invalid"
    return f"<{message_id}@{domain}>"


def _checked(name: str, value: str) -> str:
    if "\r" in value or "\n" in value:  # submission refuses these (header_injection); never written
        raise ValueError(f"header {name} may not contain CR or LF")
    return value


def _address(addr: str, name: str = "") -> str:
    out = formataddr((_checked("display name", name), _checked("address", addr)), charset="utf-8")
    if not name or len(out) <= MAX_LINE - len("Reply-To: "):
        return out  # one line: a phrase of several encoded words is not read back alike everywhere
    return f"{Header(name, 'utf-8', header_name='Reply-To').encode(linesep=chr(13) + chr(10))} <{addr}>"


def _subject(subject: str) -> str:
    """Plain when short 7-bit text; otherwise folded encoded words (an ASCII "=?" is encoded too,
    so that no receiver takes it for one)."""
    _checked("Subject", subject)
    if subject.isascii() and len(subject) <= FOLD_AT - len("Subject: ") and "=?" not in subject:
        return subject
    return Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n")


def _qp(text: str) -> bytes:
    """UTF-8, quoted-printable, CRLF line ends, ending with a line end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    return binascii.b2a_qp(text.encode("utf-8"), istext=True).replace(b"\n", CRLF)


def _part(subtype: str, text: str) -> bytes:
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode() + _qp(text)


def build_mime(content: EmailContent, message_id: str, now: datetime) -> Mime:
    """The e-mail as sent: headers, then text, html, or both as alternatives."""
    mid = message_id_header(message_id, content.sender)
    head = [f"From: {_address(content.sender, content.from_name)}", f"To: {_address(content.to)}"]
    if content.reply_to:
        head.append(f"Reply-To: {_address(content.reply_to)}")
    head += [f"Subject: {_subject(content.subject)}", f"Date: {format_datetime(now)}", f"Message-ID: {mid}",
             f"X-Msgcore-Id: {_checked('X-Msgcore-Id', message_id)}", "MIME-Version: 1.0"]
    if content.text and content.html:
        boundary = f"=_{message_id}"
        sep = f"--{boundary}\r\n".encode()
        head.append(f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n')  # + the blank line
        body = (sep + _part("plain", content.text) + CRLF + sep + _part("html", content.html)
                + f"\r\n--{boundary}--\r\n".encode())
    else:  # the single part's own headers end the head
        body = _part("html", content.html) if content.html else _part("plain", content.text)
    return Mime(("\r\n".join(head) + "\r\n").encode("ascii") + body, mid, message_id)
