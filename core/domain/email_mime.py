"""The MIME document of an e-mail, built with the standard library's `email` package (pure).

- Subject and display names outside ASCII are encoded words (RFC 2047), by `email.policy.SMTP`;
- text and html together are `multipart/alternative` (text first: the last part is the preferred one);
- `Message-ID` is `<message id@sender's domain>`: stable across resends of the same message, so a
  receiving system can tell a duplicate; `Date` is the time of sending.
"""

from __future__ import annotations

from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from core.domain.email import EmailContent

CTE = "quoted-printable"  # 7-bit safe: no server needs 8BITMIME


def message_id_header(message_id: str, sender: str) -> str:
    domain = sender.rpartition("@")[2] or "msgcore.invalid"
    return f"<{message_id}@{domain}>"


def _address(addr: str, name: str = "") -> Address:
    local, _, domain = addr.rpartition("@")
    return Address(display_name=name, username=local, domain=domain)


def build_mime(content: EmailContent, message_id: str, now: datetime) -> EmailMessage:
    """The e-mail as sent: headers, then text, html, or both as alternatives."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = _address(content.sender, content.from_name)
    msg["To"] = _address(content.to)
    if content.reply_to:
        msg["Reply-To"] = _address(content.reply_to)
    msg["Subject"] = content.subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id_header(message_id, content.sender)
    msg["X-Msgcore-Id"] = message_id
    if content.text or not content.html:
        msg.set_content(content.text or "", charset="utf-8", cte=CTE)
        if content.html:
            msg.add_alternative(content.html, subtype="html", charset="utf-8", cte=CTE)
    else:
        msg.set_content(content.html, subtype="html", charset="utf-8", cte=CTE)
    return msg
