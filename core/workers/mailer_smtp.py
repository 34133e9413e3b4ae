"""An SMTP client on the event loop (no threads) and the route's pool of persistent connections.

A connection: greeting, EHLO, STARTTLS (`loop.start_tls`) and EHLO again when the route asks for it,
AUTH PLAIN or LOGIN when the route has a user name. One e-mail is one transaction:

- with PIPELINING advertised (RFC 2920), MAIL, RCPT and DATA go out in one write and their three
  replies are read after it; then the dot-stuffed body and its final reply: two round trips;
- without it, MAIL, RCPT, DATA each wait for their reply, then the body: four round trips.

Outcomes, as before (smtplib): a refusal of MAIL, RCPT or DATA is answered with its code and text and
the connection is kept (RSET); a connection found closed, or timing out, before the body began to
leave is `_Stale`: it is opened again once if it was a pooled one (nothing had left) and the
e-mail is not maybe-sent; a drop or time-out once the body began is `maybe_sent` (unknown outcome).
The provider's id is parsed from the 250 reply to the body (`queued as <id>`), else its text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import ssl

from core.domain.email import EmailContent, MailResult
from core.domain.email_mime import Mime
from core.domain.routing import MailTls, Route

log = logging.getLogger(__name__)

QUEUED_AS = re.compile(r"queued as\s+<?([^\s>]+)", re.IGNORECASE)
MAX_LINE = 8192


class Stale(Exception):
    """The connection turned out closed (or silent) before anything of the e-mail had left."""


class SmtpReplyError(Exception):
    """A reply that ends the connection's setup (greeting, EHLO, STARTTLS, AUTH)."""

    def __init__(self, what: str, code: int, text: str) -> None:
        super().__init__(f"{what}: {code} {text}")


def dot_stuffed(raw: bytes) -> bytes:
    """The body as DATA sends it: lines starting with "." doubled, CRLF at the end, then ".\\r\\n"."""
    data = raw.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class SmtpConnection:
    """One SMTP session over asyncio streams; used by one task at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout_s = timeout_s
        self.extensions: dict[str, str] = {}

    @property
    def pipelining(self) -> bool:
        return "pipelining" in self.extensions

    @classmethod
    async def open(cls, route: Route, timeout_s: float, tls: ssl.SSLContext | None = None) -> SmtpConnection:
        """Connected, greeted, EHLO, TLS and AUTH as the route asks; `tls` defaults to the system's CAs."""
        tls = tls or ssl.create_default_context()
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                route.host, route.port, ssl=tls if route.tls == MailTls.IMPLICIT else None, limit=MAX_LINE * 8)
        conn = cls(reader, writer, timeout_s)
        try:
            await conn._setup(route, tls)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _setup(self, route: Route, tls: ssl.SSLContext) -> None:
        await self._expect("greeting", (220,))
        await self.ehlo()
        if route.tls == MailTls.STARTTLS:
            if "starttls" not in self.extensions:
                raise SmtpReplyError("STARTTLS", 0, "not offered by the server")
            await self._command("STARTTLS", "STARTTLS", (220,))
            async with asyncio.timeout(self.timeout_s):
                await self.writer.start_tls(tls, server_hostname=route.host)
            await self.ehlo()
        if route.username:
            await self.login(route.username, route.password)

    async def ehlo(self) -> None:
        code, lines = await self.command(b"EHLO msgcore\r\n")
        if code != 250:
            raise SmtpReplyError("EHLO", code, "\n".join(lines))
        self.extensions = {}
        for line in lines[1:]:
            keyword, _, params = line.partition(" ")
            self.extensions[keyword.lower()] = params

    async def login(self, user: str, password: str) -> None:
        mechanisms = self.extensions.get("auth", "").upper().split()
        if "PLAIN" in mechanisms or "LOGIN" not in mechanisms:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            await self._command("AUTH PLAIN", f"AUTH PLAIN {token}", (235,))
            return
        await self._command("AUTH LOGIN", "AUTH LOGIN", (334,))
        await self._command("AUTH LOGIN", base64.b64encode(user.encode()).decode(), (334,))
        await self._command("AUTH LOGIN", base64.b64encode(password.encode()).decode(), (235,))

    async def _command(self, what: str, line: str, ok: tuple[int, ...]) -> None:
        code, lines = await self.command(f"{line}\r\n".encode())
        if code not in ok:
            raise SmtpReplyError(what, code, "\n".join(lines))

    async def _expect(self, what: str, ok: tuple[int, ...]) -> None:
        code, lines = await self.reply()
        if code not in ok:
            raise SmtpReplyError(what, code, "\n".join(lines))

    async def command(self, data: bytes) -> tuple[int, list[str]]:
        self.writer.write(data)
        return await self.reply()

    async def reply(self) -> tuple[int, list[str]]:
        """One reply, all its lines ("250-a", "250-b", "250 c"): its code and texts."""
        lines: list[str] = []
        async with asyncio.timeout(self.timeout_s):
            while True:
                try:
                    line = await self.reader.readline()
                except ValueError as e:  # a line over the limit (LimitOverrunError is a ValueError here)
                    raise ConnectionResetError(f"reply line too long: {e}") from e
                if not line.endswith(b"\n"):
                    raise ConnectionResetError("the server closed the connection")
                try:
                    code = int(line[:3])
                except ValueError as e:
                    raise ConnectionResetError(f"not an SMTP reply: {line[:80]!r}") from e
                lines.append(line[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
                if line[3:4] != b"-":
                    return code, lines

    async def send_mail(self, sender: str, to: str, raw: bytes) -> MailResult:
        """One transaction. Raises Stale before the body left; OSError/TimeoutError after it began."""
        if self.reader.at_eof() or self.writer.is_closing():
            raise Stale("closed while idle")
        envelope = [f"MAIL FROM:<{sender}>\r\n".encode(), f"RCPT TO:<{to}>\r\n".encode(), b"DATA\r\n"]
        try:
            if self.pipelining:
                self.writer.write(b"".join(envelope))
                replies = [await self.reply() for _ in envelope]
            else:
                replies = []
                for cmd in envelope:
                    replies.append(await self.command(cmd))
                    if replies[-1][0] not in (250, 251):
                        break
        except (OSError, TimeoutError) as e:
            raise Stale(repr(e)) from e
        refused = next((r for r in replies[:2] if r[0] not in (250, 251)), None)
        if refused is not None or replies[-1][0] != 354:
            return await self._refused(refused or replies[-1], data_open=replies[-1][0] == 354)
        self.writer.write(dot_stuffed(raw))
        code, lines = await self.reply()
        text = "\n".join(lines)
        if code != 250:
            await self._rset()
            return MailResult(code=code, text=text)
        found = QUEUED_AS.search(text)
        return MailResult(code=code, text=text, provider_id=found.group(1) if found else text[:200])

    async def _refused(self, reply: tuple[int, list[str]], *, data_open: bool) -> MailResult:
        """MAIL, RCPT or DATA refused: nothing was sent. A server that opened DATA anyway (pipelined
        after a refused RCPT) gets an empty message, which it refuses for want of a recipient."""
        with contextlib.suppress(OSError, TimeoutError):
            if data_open:
                await self.command(b".\r\n")
            await self._rset()
        return MailResult(code=reply[0], text="\n".join(reply[1]))

    async def _rset(self) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            await self.command(b"RSET\r\n")

    async def quit(self) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            await self.command(b"QUIT\r\n")
        self.abort()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class SmtpPool:
    """`route.pool` persistent SMTP connections, each opened on first use."""

    def __init__(self, route: Route, timeout_s: float, tls: ssl.SSLContext | None = None) -> None:
        self.route = route
        self.timeout_s = timeout_s
        self.tls = tls
        self.idle: asyncio.Queue[SmtpConnection | None] = asyncio.Queue()
        for _ in range(route.pool):
            self.idle.put_nowait(None)
        self.opened = 0  # connections opened (a figure for tests and logs)

    async def send(self, content: EmailContent, mime: Mime) -> MailResult:
        conn = await self.idle.get()
        try:
            conn, result = await self._send(conn, content, mime)
        finally:
            self.idle.put_nowait(conn)
        return result

    async def _send(self, conn: SmtpConnection | None, content: EmailContent,
                    mime: Mime) -> tuple[SmtpConnection | None, MailResult]:
        for reused in (conn is not None, False):
            if conn is None:
                try:
                    conn = await self._open()
                except (OSError, TimeoutError, SmtpReplyError) as e:
                    return None, MailResult(error=f"cannot connect to {self.route.host}:{self.route.port}: {e}")
            try:
                return conn, await conn.send_mail(content.sender, content.to, mime.raw)
            except Stale as e:
                conn.abort()
                conn = None
                if not reused:
                    return None, MailResult(error=f"connection closed before sending: {e}")
            except (OSError, TimeoutError) as e:
                conn.abort()
                return None, MailResult(error=f"connection lost during DATA: {e!r}", maybe_sent=True)
            except BaseException:  # cancelled mid-transaction: the session's state is unknown
                conn.abort()
                raise
        return None, MailResult(error="connection closed before sending")

    async def _open(self) -> SmtpConnection:
        conn = await SmtpConnection.open(self.route, self.timeout_s, self.tls)
        self.opened += 1
        log.info("mailer route=%s: SMTP connection %d opened to %s:%d%s", self.route.id, self.opened,
                 self.route.host, self.route.port, " (pipelining)" if conn.pipelining else "")
        return conn

    async def close(self) -> None:
        conns = []
        while not self.idle.empty():
            c = self.idle.get_nowait()
            if c is not None:
                conns.append(c)
        await asyncio.gather(*(c.quit() for c in conns))
