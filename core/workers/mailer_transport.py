"""How the mailer hands an e-mail to its provider: over a pool of persistent SMTP connections (route
kind `smtp`) or the SendGrid v3 HTTP API (kind `http`, provider `sendgrid`). Each send answers a
`MailResult` (core/domain/email.py); no exception leaves `send` for a provider's or a network's fault.

SMTP: smtplib, each connection used by one thread at a time (a thread pool as large as the pool), so
a few connections carry many messages each (MAIL, RCPT, DATA; RSET after a refusal). A connection
that dropped before DATA is opened again once (nothing had left); a drop or time-out after DATA began
is `maybe_sent` (the route's unknown-outcome policy decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import smtplib
import ssl
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from email.policy import SMTP
from typing import Protocol

import httpx

from core.domain.email import EmailContent, MailResult
from core.domain.routing import MailTls, Route

log = logging.getLogger(__name__)

TIMEOUT_S = 30.0
QUEUED_AS = re.compile(r"queued as\s+<?([^\s>]+)", re.IGNORECASE)


class Transport(Protocol):
    async def send(self, content: EmailContent, mime: EmailMessage) -> MailResult: ...

    async def close(self) -> None: ...


def transport_for(route: Route, timeout_s: float = TIMEOUT_S) -> Transport:
    if route.kind == "smtp":
        return SmtpPool(route, timeout_s)
    if route.kind == "http" and route.provider == "sendgrid":
        return SendGrid(route, timeout_s)
    raise ValueError(f"route {route.id}: no e-mail transport for kind {route.kind!r} provider {route.provider!r}")


class _Stale(Exception):
    """A pooled connection turned out closed before anything was sent on it."""


class SmtpPool:
    """`route.pool` persistent SMTP connections."""

    def __init__(self, route: Route, timeout_s: float = TIMEOUT_S) -> None:
        self.route = route
        self.timeout_s = timeout_s
        self.executor = ThreadPoolExecutor(max_workers=route.pool, thread_name_prefix=f"smtp-{route.id}")
        self.idle: asyncio.Queue[smtplib.SMTP | None] = asyncio.Queue()
        for _ in range(route.pool):
            self.idle.put_nowait(None)  # opened on first use
        self.opened = 0  # connections opened (a figure for tests and logs)

    async def send(self, content: EmailContent, mime: EmailMessage) -> MailResult:
        conn = await self.idle.get()
        loop = asyncio.get_running_loop()
        try:
            conn, result = await loop.run_in_executor(self.executor, self._send, conn, content, mime)
        finally:
            self.idle.put_nowait(conn)
        return result

    def _send(self, conn: smtplib.SMTP | None, content: EmailContent,
              mime: EmailMessage) -> tuple[smtplib.SMTP | None, MailResult]:
        for reused in (conn is not None, False):
            if conn is None:
                try:
                    conn = self._open()
                except (OSError, smtplib.SMTPException) as e:
                    return None, MailResult(error=f"cannot connect to {self.route.host}:{self.route.port}: {e}")
            try:
                return conn, self._transaction(conn, content, mime)
            except _Stale as e:
                _quietly_close(conn)
                conn = None
                if not reused:
                    return None, MailResult(error=f"connection closed before sending: {e}")
            except (OSError, smtplib.SMTPException) as e:
                _quietly_close(conn)
                return None, MailResult(error=f"connection lost during DATA: {e!r}", maybe_sent=True)
        return None, MailResult(error="connection closed before sending")

    def _open(self) -> smtplib.SMTP:
        r = self.route
        conn: smtplib.SMTP
        if r.tls == MailTls.IMPLICIT:
            conn = smtplib.SMTP_SSL(r.host, r.port, timeout=self.timeout_s, context=ssl.create_default_context())
        else:
            conn = smtplib.SMTP(r.host, r.port, timeout=self.timeout_s)
        conn.ehlo()
        if r.tls == MailTls.STARTTLS:
            conn.starttls(context=ssl.create_default_context())
            conn.ehlo()
        if r.username:
            conn.login(r.username, r.password)
        self.opened += 1
        log.info("mailer route=%s: SMTP connection %d opened to %s:%d", r.id, self.opened, r.host, r.port)
        return conn

    @staticmethod
    def _transaction(conn: smtplib.SMTP, content: EmailContent, mime: EmailMessage) -> MailResult:
        """MAIL, RCPT, DATA on an open connection. _Stale if it dropped before DATA began."""
        try:
            code, reply = conn.mail(content.sender)
            if code == 250:
                code, reply = conn.rcpt(content.to)
        except (smtplib.SMTPServerDisconnected, OSError) as e:
            raise _Stale(str(e)) from e
        if code not in (250, 251):
            with contextlib.suppress(smtplib.SMTPException, OSError):
                conn.rset()
            return MailResult(code=code, text=_text(reply))
        try:
            code, reply = conn.data(mime.as_bytes(policy=SMTP))
        except smtplib.SMTPDataError as e:  # DATA itself refused (no 354): nothing was sent
            with contextlib.suppress(smtplib.SMTPException, OSError):
                conn.rset()
            return MailResult(code=e.smtp_code, text=_text(e.smtp_error))
        text = _text(reply)
        if code != 250:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                conn.rset()
            return MailResult(code=code, text=text)
        found = QUEUED_AS.search(text)
        return MailResult(code=code, text=text, provider_id=found.group(1) if found else text[:200])

    async def close(self) -> None:
        conns = []
        while not self.idle.empty():
            c = self.idle.get_nowait()
            if c is not None:
                conns.append(c)
        for c in conns:
            await asyncio.get_running_loop().run_in_executor(self.executor, _quit, c)
        self.executor.shutdown(wait=False)


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _quit(conn: smtplib.SMTP) -> None:
    try:
        conn.quit()
    except (smtplib.SMTPException, OSError):
        _quietly_close(conn)


def _quietly_close(conn: smtplib.SMTP | None) -> None:
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()


class SendGrid:
    """SendGrid v3 `POST /v3/mail/send`: 202 with `X-Message-Id` when taken."""

    def __init__(self, route: Route, timeout_s: float = TIMEOUT_S) -> None:
        self.route = route
        base = route.base_url or "https://api.sendgrid.com"
        self.client = httpx.AsyncClient(
            base_url=base, timeout=timeout_s, headers={"Authorization": f"Bearer {route.api_key}"},
            limits=httpx.Limits(max_connections=route.pool, max_keepalive_connections=route.pool))

    async def send(self, content: EmailContent, mime: EmailMessage) -> MailResult:
        try:
            resp = await self.client.post("/v3/mail/send", json=sendgrid_body(content, mime))
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
            return MailResult(error=f"cannot connect: {e!r}", protocol="http")
        except httpx.HTTPError as e:
            return MailResult(error=f"no answer: {e!r}", maybe_sent=True, protocol="http")
        return MailResult(code=resp.status_code, text=resp.text[:500], protocol="http",
                          provider_id=resp.headers.get("X-Message-Id", ""))

    async def close(self) -> None:
        await self.client.aclose()


def sendgrid_body(content: EmailContent, mime: EmailMessage) -> dict[str, object]:
    sender: dict[str, str] = {"email": content.sender}
    if content.from_name:
        sender["name"] = content.from_name
    body: dict[str, object] = {
        "personalizations": [{"to": [{"email": content.to}]}], "from": sender, "subject": content.subject,
        "content": ([{"type": "text/plain", "value": content.text}] if content.text else [])
        + ([{"type": "text/html", "value": content.html}] if content.html else []),
        "custom_args": {"msgcore_id": str(mime["X-Msgcore-Id"])},
        "headers": {"X-Msgcore-Id": str(mime["X-Msgcore-Id"])},
    }
    if content.reply_to:
        body["reply_to"] = {"email": content.reply_to}
    return body
