"""The connector's queue of messages to submit: transactional ones (the shared lane) first.

A batch is read transactional-first already, but the send workers take from one queue: without this,
a one-time password read while the queue holds up to CLAIM_AHEAD_S of campaign traffic waited behind
all of it (p50 ~0.5 s during a campaign). Each class keeps read order. Commit order is unaffected: a
batch commits when all its items are answered, whatever order they went out in.
"""

from __future__ import annotations

import asyncio
from collections import deque

from core.domain.message import lane_of
from smsc.connector_jobs import Item


class _Classes:
    """The queue's storage: two FIFOs; its length is what asyncio.Queue counts."""

    def __init__(self) -> None:
        self.urgent: deque[Item] = deque()
        self.bulk: deque[Item] = deque()

    def __len__(self) -> int:
        return len(self.urgent) + len(self.bulk)


class SendQueue(asyncio.Queue[Item]):
    """asyncio.Queue through its subclass hooks (`_init`, `_put`, `_get`, as PriorityQueue does)."""

    _queue: _Classes

    def _init(self, maxsize: int) -> None:
        self._queue = _Classes()

    def _put(self, item: Item) -> None:
        (self._queue.urgent if lane_of(item.state) == "" else self._queue.bulk).append(item)

    def _get(self) -> Item:
        return self._queue.urgent.popleft() if self._queue.urgent else self._queue.bulk.popleft()
