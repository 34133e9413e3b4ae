"""The sorted streams `verify` merges message by message: MongoDB cursors read ahead in a background
task, PostgreSQL server-side cursors, grouped by message_id and checked to be in byte order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import psycopg
from psycopg import sql

from ops.verify.report import BATCH, OutOfOrder


class Sorted:
    """An async iterator of (key, item) with strictly increasing keys, with one item of look-ahead.

    Raises OutOfOrder if the source breaks the order (the merge relies on it)."""

    def __init__(self, name: str, source: AsyncIterator[tuple[str, Any]]) -> None:
        self.name = name
        self._source = source
        self.key: str | None = None
        self.item: Any = None

    async def advance(self) -> None:
        previous = self.key
        try:
            self.key, self.item = await anext(self._source)
        except StopAsyncIteration:
            self.key, self.item = None, None
            return
        if previous is not None and self.key is not None and self.key <= previous:
            raise OutOfOrder(f"{self.name}: key {self.key!r} after {previous!r}; the stream is not sorted by "
                              f"message_id in byte order")

    async def take(self, key: str) -> Any:
        """The item for `key` (advancing past it), or None if this stream has none."""
        if self.key != key:
            return None
        item = self.item
        await self.advance()
        return item


class ReadAhead:
    """Iterates `source` while a background task fetches the next batches (at most `depth` of them
    ahead), so waiting for MongoDB overlaps with checking. `aclose()` stops the task."""

    def __init__(self, source: AsyncIterator[Any], depth: int = 3) -> None:
        self._queue: asyncio.Queue[list[Any] | BaseException | None] = asyncio.Queue(maxsize=depth)
        self._task = asyncio.create_task(self._pump(source))

    async def _pump(self, source: AsyncIterator[Any]) -> None:
        try:
            chunk: list[Any] = []
            async for item in source:
                chunk.append(item)
                if len(chunk) >= BATCH:
                    await self._queue.put(chunk)
                    chunk = []
            await self._queue.put(chunk)
            await self._queue.put(None)
        except Exception as e:  # handed to the reader, which raises it
            await self._queue.put(e)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while (chunk := await self._queue.get()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            for item in chunk:
                yield item

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def grouped(rows: AsyncIterator[Any], key_of: Any) -> AsyncGenerator[tuple[str, Any], None]:
    """Consecutive rows with the same key, as (key, [rows])."""
    key: str | None = None
    group: list[Any] = []
    async for row in rows:
        k = key_of(row)
        if k != key and group:
            yield key, group  # type: ignore[misc]
            group = []
        key = k
        group.append(row)
    if group:
        yield key, group  # type: ignore[misc]


async def keyed(rows: AsyncIterator[Any], key_of: Any) -> AsyncGenerator[tuple[str, Any], None]:
    async for row in rows:
        yield key_of(row), row


async def fetch_server_side(conn: psycopg.AsyncConnection, name: str, query: sql.Composed
                             ) -> AsyncGenerator[Any, None]:
    """Rows of `query` through a server-side cursor (needs the open transaction of `conn`)."""
    cur = conn.cursor(name=name)
    cur.itersize = BATCH
    async with cur:
        await cur.execute(query)
        async for row in cur:
            yield row
