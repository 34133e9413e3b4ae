"""The webhook HTTP client against real loopback servers: a receiver that closes kept-alive
connections without saying so, a chunked answer, an answer too large, and nobody listening."""

from __future__ import annotations

import asyncio

import pytest

from core.workers.webhooks_http import HttpClient, HttpError, Target


async def _serve(answer: bytes, answers_per_connection: int = 0) -> tuple[asyncio.Server, list[bytes]]:
    """A loopback server answering `answer`; with `answers_per_connection`, it reads the request after
    that many and closes the connection without an answer (an idle timeout met by a new request)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(h.split(b":")[1]) for h in head.split(b"\r\n")
                              if h.lower().startswith(b"content-length"))
                body = await reader.readexactly(length)
                if answers_per_connection and answered == answers_per_connection:
                    break
                seen.append(body)
                writer.write(answer)
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), seen


async def test_posts_survive_a_receiver_that_closes_idle_connections() -> None:
    server, seen = await _serve(b"HTTP/1.1 204 No Content\r\n\r\n", answers_per_connection=2)
    port = server.sockets[0].getsockname()[1]
    client = HttpClient()
    try:
        target = Target.of(f"http://localhost:{port}/h", "127.0.0.1")
        statuses = []
        for i in range(10):
            statuses.append(await client.post(target, f'{{"n":{i}}}'.encode(), [], 5))
        # Every third POST met a closed connection and went again on a fresh one: each answered once.
        assert statuses == [204] * 10
        assert seen == [f'{{"n":{i}}}'.encode() for i in range(10)]
    finally:
        await client.close()
        server.close()


async def test_chunked_and_oversized_answers_and_no_listener() -> None:
    chunked = b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    server, _ = await _serve(chunked)
    big, _ = await _serve(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000)
    client = HttpClient()
    try:
        ok = Target.of("http://127.0.0.1/h", "127.0.0.1")
        ok = Target(ok.scheme, ok.host, ok.address, server.sockets[0].getsockname()[1], ok.path)
        assert [await client.post(ok, b"{}", [], 5) for _ in range(3)] == [202, 202, 202]
        too_big = Target(ok.scheme, ok.host, ok.address, big.sockets[0].getsockname()[1], ok.path)
        with pytest.raises(HttpError):
            await client.post(too_big, b"{}", [], 5)
        nobody = Target(ok.scheme, ok.host, ok.address, 9, ok.path)  # discard port: nothing listens
        with pytest.raises(HttpError):
            await client.post(nobody, b"{}", [], 5)
    finally:
        await client.close()
        server.close()
        big.close()
