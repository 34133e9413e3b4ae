"""A small HTTP/1.1 client for webhook POSTs: asyncio streams with h11 (already installed with httpx)
for the protocol, and keep-alive connections pooled per target.

Why not httpx: measured on the 2-core development box, httpx spent 1-3 ms of CPU per POST to a local
receiver (216 POSTs/s at 64 in flight), a third of the issue's target of 1,000 deliveries/s; this
client spends a fraction of that (ops/bench/webhooks.py).
Why it also helps the SSRF guard: it connects to the ADDRESS that was checked (the caller resolves
and checks, then passes it), so a name that resolves elsewhere a moment later (DNS rebinding) cannot
move the request; `Host` and TLS server name stay the URL's host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

MAX_RESPONSE_BYTES = 64 * 1024  # a receiver's answer body is read (to keep the connection) up to this
IDLE_PER_TARGET = 64


class HttpError(Exception):
    """No HTTP answer: connection refused or reset, protocol error, or an answer too large."""


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    reused: bool = False  # taken from the idle pool (the receiver may have closed it meanwhile)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str  # the URL's host: Host header and TLS server name
    address: str  # the checked IP address to connect to
    port: int
    path: str

    @classmethod
    def of(cls, url: str, address: str) -> Target:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname or "", address, port, path)

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


class HttpClient:
    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int, str], list[_Conn]] = {}
        self._tls = ssl.create_default_context()

    async def post(self, target: Target, body: bytes, headers: list[tuple[str, str]], timeout_s: float) -> int:
        """POST `body`; returns the answer's status. Raises HttpError or TimeoutError (the connection
        is dropped then: its state is unknown)."""
        key = (target.scheme, target.address, target.port, target.host)
        conn = await asyncio.wait_for(self._connection(key, target), timeout_s)
        try:
            status, reusable = await self._exchange_or_close(conn, target, body, headers, timeout_s)
        except HttpError:
            if not conn.reused:
                raise
            # A kept-alive connection the receiver closed while idle: once more on a fresh one (if it
            # did read the request, it sees it twice: delivery is at least once).
            conn = await asyncio.wait_for(self._connection(key, target, fresh=True), timeout_s)
            status, reusable = await self._exchange_or_close(conn, target, body, headers, timeout_s)
        if reusable and len(self._idle.setdefault(key, [])) < IDLE_PER_TARGET:
            conn.h11.start_next_cycle()
            conn.reused = False
            self._idle[key].append(conn)
        else:
            conn.close()
        return status

    async def _exchange_or_close(self, conn: _Conn, target: Target, body: bytes, headers: list[tuple[str, str]],
                                 timeout_s: float) -> tuple[int, bool]:
        try:
            return await asyncio.wait_for(self._exchange(conn, target, body, headers), timeout_s)
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError) as e:
            conn.close()
            raise HttpError(f"{type(e).__name__}: {e}") from e
        except BaseException:
            conn.close()
            raise

    async def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()

    async def _connection(self, key: tuple[str, str, int, str], target: Target, fresh: bool = False) -> _Conn:
        idle = [] if fresh else self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.reader.at_eof():
                conn.reused = True
                return conn
            conn.close()
        tls = self._tls if target.scheme == "https" else None
        try:
            reader, writer = await asyncio.open_connection(
                target.address, target.port, ssl=tls, server_hostname=target.host if tls else None)
        except OSError as e:
            raise HttpError(f"connect {target.address}:{target.port}: {e}") from e
        return _Conn(reader, writer)

    async def _exchange(self, conn: _Conn, target: Target, body: bytes,
                        headers: list[tuple[str, str]]) -> tuple[int, bool]:
        all_headers = [("Host", target.host_header), ("Content-Length", str(len(body))), *headers]
        conn.writer.write(conn.h11.send(h11.Request(method="POST", target=target.path, headers=all_headers))
                          + conn.h11.send(h11.Data(data=body)) + conn.h11.send(h11.EndOfMessage()))
        await conn.writer.drain()
        status, size = 0, 0
        while True:
            event = conn.h11.next_event()
            if event is h11.NEED_DATA:
                data = await conn.reader.read(65536)
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise HttpError(f"answer body over {MAX_RESPONSE_BYTES} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return status, conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("connection closed before the answer ended")
