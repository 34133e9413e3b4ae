"""How the mailer hands an e-mail to its provider: over a pool of persistent SMTP connections (route
kind `smtp`) or the SendGrid v3 HTTP API (kind `http`, provider `sendgrid`). Each send answers a
`MailResult` (core/domain/email.py); no exception leaves `send` for a provider's or a network's fault.
Both run on the event loop, no threads.

SMTP: our asyncio client (core/workers/mailer_smtp.py), `route.pool` persistent connections on the
event loop, so a few connections carry many messages each (MAIL, RCPT, DATA, pipelined when the server
offers it; RSET after a refusal). A connection that dropped before the body left is opened again once
(nothing had left); a drop or time-out after it began is `maybe_sent` (the route's unknown-outcome
policy decides).
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Protocol

from core.domain.email import EmailContent, MailResult
from core.domain.email_mime import Mime
from core.domain.routing import Route
from core.workers.mailer_http import HttpLost, HttpPool
from core.workers.mailer_smtp import QUEUED_AS, SmtpPool

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
__all__ = ["QUEUED_AS", "SendGrid", "SmtpPool", "Transport", "sendgrid_body", "transport_for"]


class Transport(Protocol):
    async def send(self, content: EmailContent, mime: Mime) -> MailResult: ...

    async def close(self) -> None: ...


def transport_for(route: Route, timeout_s: float = TIMEOUT_S) -> Transport:
    if route.kind == "smtp":
        return SmtpPool(route, timeout_s)
    if route.kind == "http" and route.provider == "sendgrid":
        return SendGrid(route, timeout_s)
    raise ValueError(f"route {route.id}: no e-mail transport for kind {route.kind!r} provider {route.provider!r}")


class SendGrid:
    """SendGrid v3 `POST /v3/mail/send`: 202 with `X-Message-Id` when taken (our HTTP/1.1 client,
    core/workers/mailer_http.py: `route.pool` keep-alive connections)."""

    def __init__(self, route: Route, timeout_s: float = TIMEOUT_S, tls: ssl.SSLContext | None = None) -> None:
        self.route = route
        self.pool = HttpPool(route.base_url or "https://api.sendgrid.com", route.pool, timeout_s, tls)
        self.headers = {"Authorization": f"Bearer {route.api_key}", "Content-Type": "application/json",
                        "Accept": "application/json", "User-Agent": "msgcore"}

    async def send(self, content: EmailContent, mime: Mime) -> MailResult:
        body = json.dumps(sendgrid_body(content, mime), ensure_ascii=False, separators=(",", ":")).encode()
        try:
            reply = await self.pool.request("POST", "/v3/mail/send", self.headers, body)
        except (OSError, TimeoutError) as e:
            return MailResult(error=f"cannot connect: {e!r}", protocol="http")
        except HttpLost as e:
            return MailResult(error=f"no answer: {e}", maybe_sent=True, protocol="http")
        return MailResult(code=reply.status, text=reply.text[:500], protocol="http",
                          provider_id=reply.headers.get("x-message-id", ""))

    async def close(self) -> None:
        await self.pool.close()


def sendgrid_body(content: EmailContent, mime: Mime) -> dict[str, object]:
    sender: dict[str, str] = {"email": content.sender}
    if content.from_name:
        sender["name"] = content.from_name
    body: dict[str, object] = {
        "personalizations": [{"to": [{"email": content.to}]}], "from": sender, "subject": content.subject,
        "content": ([{"type": "text/plain", "value": content.text}] if content.text else [])
        + ([{"type": "text/html", "value": content.html}] if content.html else []),
        "custom_args": {"msgcore_id": mime.msgcore_id},
        "headers": {"X-Msgcore-Id": mime.msgcore_id},
    }
    if content.reply_to:
        body["reply_to"] = {"email": content.reply_to}
    return body
