"""Intermediate notifications (registered_delivery bit 4): the `sent` of an account's messages that
asked for one goes back to the ESME as a deliver_sm with esm_class 0x20 and message_state ENROUTE.

Why not through the account's topic `dlr:<system_id>` like the final events: a `sent` already takes
its one position in `await:<route>` (the expirer's input), and an event has one position only. So
the account's receipt sender follows the routes' await topics itself, with checkpoints of its own
(`esme-i:<system_id>|await:<route>`), and only for an account that asked at least once
(`intermediate_since`, core/store/smpp_accounts.py: the checkpoints start at that moment's counters).
Cost: such an account reads every `sent` of every route (its own are picked by `notify`); an
account that never asks reads nothing here.

Order: the receipt sender reads the counter of `dlr:<system_id>` first, then drains the await topics
up to counters read after it. A final event in the dlr range committed after its message's `sent`,
so that `sent` is below the await counters: its ENROUTE goes out (and is answered) before the final
receipt. Same guarantees as receipts: the checkpoints move, fenced by the sender's ownership, only
after every deliver_sm_resp of a range.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from core.domain.message import await_topic
from core.store.owners import Ownership
from core.store.routes import RouteStore
from core.store.smpp_accounts import intermediate_consumer
from core.store.topics import checkpoint_id

if TYPE_CHECKING:
    from core.store.smpp_accounts import SmppAccount
    from smsc.esme_server.receipts import Receipt
    from smsc.esme_server.server import EsmeServer

log = logging.getLogger(__name__)

ROUTES_TTL_S = 5.0
ACCOUNT_TTL_S = 5.0  # how soon a sender learns that its account started asking (set by another process)

Deliver = Callable[[list["Receipt"]], Awaitable[bool]]
Keep = Callable[[], Awaitable[Ownership]]


class IntermediateFollower:
    def __init__(self, server: EsmeServer, account: SmppAccount) -> None:
        self.server = server
        self.account = account
        self.consumer = intermediate_consumer(account.system_id)
        self.notify = account.notify_topic
        self.log = server.events.log
        self.routes = RouteStore(server.db)
        self.enabled = account.intermediate
        self.sent = 0
        self._topics: list[str] = []
        self._topics_at = float("-inf")
        self._account_at = time.monotonic()

    async def _enabled(self) -> bool:
        if not self.enabled and (self.account.system_id in self.server.intermediate_on
                                 or time.monotonic() - self._account_at >= ACCOUNT_TTL_S):
            self._account_at = time.monotonic()
            found = await self.server.accounts.credentials(self.account.system_id)
            self.enabled = found is not None and found[0].intermediate
        return self.enabled

    async def _await_topics(self) -> list[str]:
        if time.monotonic() - self._topics_at >= ROUTES_TTL_S:
            self._topics = [await_topic(r.id) for r in await self.routes.list(include_disabled=True)]
            self._topics_at = time.monotonic()
        return self._topics

    async def drain(self, receipts_of: Callable[[list[dict[str, Any]]], Awaitable[list[Receipt]]], deliver: Deliver,
                    keep: Keep) -> bool | None:
        """Send the ENROUTE of every `sent` below the await counters read now. None when the
        account never asked (nothing read); False when no receiver is left (the rest waits); True
        when caught up. Raises Fenced, CheckpointMoved, StoreError like the receipt sender."""
        if not await self._enabled():
            return None
        topics = await self._await_topics()
        target = await self.log.counters(topics)
        while True:
            checkpoints = await self.log.load_checkpoints(self.consumer, topics)
            behind = [t for t in topics if checkpoints[t] < target[t]]
            if not behind:
                return True
            batch = max(1, min(self.server.config.receipt_batch, self.account.window))
            moves: dict[str, tuple[int, int]] = {}
            docs: list[dict[str, Any]] = []
            for topic in behind:
                start = checkpoints[topic]
                end = min(target[topic], start + batch)
                docs += [d for d in await self.log.read(topic, start, end) if d.get("notify") == self.notify]
                moves[checkpoint_id(self.consumer, topic)] = (start, end)
            receipts = await receipts_of(docs)
            if not await deliver(receipts):
                return False
            own = await keep()
            await self.log.commit([], moves=moves, fence=own.fence)
            self.sent += len(receipts)
