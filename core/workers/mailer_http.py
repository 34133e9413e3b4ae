"""A small HTTP/1.1 client on the event loop for the providers' send APIs (SendGrid v3): `route.pool`
persistent keep-alive connections, one request at a time each, like the SMTP pool.

Why not httpx: per request it cost the mailer about 1 ms of CPU (half of its samples in a profile:
connection-pool bookkeeping, cancellation shields, and a failing `import sniffio` on every call).
This client does only what a JSON POST needs: Content-Length bodies out; Content-Length, chunked or
read-to-close bodies in; `Connection: close` honoured; TLS for https.

Outcomes, as with httpx before: a connection that cannot be opened is `cannot connect` (nothing
left); a pooled connection found closed before the request is written is opened again once; any
failure once the request was written (no answer, a broken answer, a time-out) is `maybe_sent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024


@dataclass
class HttpReply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.keep = True

    @classmethod
    async def open(cls, host: str, port: int, tls: ssl.SSLContext | None, timeout_s: float) -> HttpConnection:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname=host if tls else None,
                                                           limit=MAX_HEAD)
        return cls(reader, writer)

    @property
    def usable(self) -> bool:
        return self.keep and not self.reader.at_eof() and not self.writer.is_closing()

    async def request(self, head: bytes, body: bytes) -> HttpReply:
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ConnectionResetError(f"no HTTP answer: {status_line[:80]!r}")
        reply = HttpReply(int(parts[1]))
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n"):
            if not line.endswith(b"\n"):
                raise ConnectionResetError("the server closed the connection in the answer's head")
            name, _, value = line.decode("latin-1").partition(":")
            reply.headers[name.strip().lower()] = value.strip()
        reply.body = await self._body(reply.headers)
        if reply.headers.get("connection", "").lower() == "close" or parts[0] == b"HTTP/1.0":
            self.keep = False
        return reply

    async def _body(self, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while size := int((await self.reader.readline()).split(b";", 1)[0].strip() or b"0", 16):
                if size > MAX_BODY:
                    raise ConnectionResetError("answer too large")
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readline()
            while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        if "content-length" in headers:
            length = int(headers["content-length"])
            if length > MAX_BODY:
                raise ConnectionResetError("answer too large")
            return await self.reader.readexactly(length) if length else b""
        self.keep = False  # neither: the body ends with the connection
        return await self.reader.read(MAX_BODY)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class HttpPool:
    """`size` keep-alive connections to the origin of `base_url`, each opened on first use."""

    def __init__(self, base_url: str, size: int, timeout_s: float, tls: ssl.SSLContext | None = None) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "localhost"
        self.https = url.scheme == "https"
        self.port = url.port or (443 if self.https else 80)
        self.prefix = url.path.rstrip("/")
        self.tls = (tls or ssl.create_default_context()) if self.https else None
        self.timeout_s = timeout_s
        self.idle: asyncio.Queue[HttpConnection | None] = asyncio.Queue()
        for _ in range(max(1, size)):
            self.idle.put_nowait(None)
        self.opened = 0

    def head(self, method: str, path: str, headers: dict[str, str], length: int) -> bytes:
        host = self.host if self.port == (443 if self.https else 80) else f"{self.host}:{self.port}"
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes) -> HttpReply:
        """The answer. Raises OSError or TimeoutError (cannot connect: nothing left) or HttpLost (written,
        no complete answer)."""
        conn = await self.idle.get()
        try:
            conn, reply = await self._request(conn, self.head(method, path, headers, len(body)), body)
        finally:
            self.idle.put_nowait(conn)
        return reply

    async def _request(self, conn: HttpConnection | None, head: bytes,
                       body: bytes) -> tuple[HttpConnection | None, HttpReply]:
        if conn is not None and not conn.usable:
            conn.close()
            conn = None
        if conn is None:
            conn = await HttpConnection.open(self.host, self.port, self.tls, self.timeout_s)
            self.opened += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await conn.request(head, body)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
            conn.close()
            raise HttpLost(repr(e)) from e
        except BaseException:
            conn.close()
            raise
        if not conn.usable:
            conn.close()
            return None, reply
        return conn, reply

    async def close(self) -> None:
        while not self.idle.empty():
            c = self.idle.get_nowait()
            if c is not None:
                c.close()


class HttpLost(Exception):
    """The request was written (at least in part) and no complete answer came: it may have been taken."""
