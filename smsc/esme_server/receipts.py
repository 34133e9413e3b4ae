"""Receipts and MO to an ESME: the consumer of the account's topic `dlr:<system_id>`, read by position.

A message submitted over SMPP with registered_delivery carries `notify="dlr:<system_id>"`, so each
of its final events (whatever stage writes it) takes a position in that topic. This sender, one per
account and process while the account has a receiver (or transceiver) bind here:

1. owns `esme|dlr:<system_id>` (core/store/owners.py): only one process sends an account's receipts;
2. reads [checkpoint, checkpoint + N) of the topic, and the messages' `accepted` events (origin:
   what the ESME asked for, its addresses, the submit time and text for the receipt);
3. sends a deliver_sm per receipt the ESME asked for (registered_delivery 1: every outcome, 2:
   failures only: core/domain/esme_receipts.py) over the account's receiver binds, and waits for
   every deliver_sm_resp. A receipt not answered within `receipt_timeout_s`, refused, or whose bind
   went away is sent again (counted: `redelivered`); with no receiver bind left the sender stops and
   the receipts wait in the topic;
4. only then moves the checkpoint past the range, guarded by its epoch.

So every position below the checkpoint was answered by the ESME; a crash between sending and the
commit sends the range again (an ESME may see a receipt twice, never miss one). Intermediate
notifications (registered_delivery bit 4: ENROUTE when the upstream SMSC took the message) come from
the routes' await topics, before step 2, with the same guarantees (intermediate.py).

MO take the same path: an `inbound` event in the topic (smsc/inbound.py puts it there for the
tenant's oldest account with `receive_mo`) goes out as a plain MO deliver_sm (mo.py) instead of a
receipt, with the same guarantees: it waits while no receiver is bound, is sent again after a
time-out or a reconnect, and is done only once its deliver_sm_resp (ESME_ROK) arrived.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from core import metrics
from core.domain.esme_receipts import final_receipt_wanted, intermediate_wanted, registered_delivery_of
from core.store.errors import CheckpointMoved, Fenced, StoreError
from core.store.owners import Owners, Ownership
from core.store.topics import checkpoint_id
from smsc.esme_server.intermediate import IntermediateFollower
from smsc.esme_server.mo import mo_fields
from smsc.esme_server.queries import SMPP_STATE
from smsc.pdu import ESM_CLASS_RECEIPT, ESME_ROK, MESSAGE_STATES, build_receipt_text

if TYPE_CHECKING:
    from core.store.smpp_accounts import SmppAccount
    from smsc.esme_server.server import EsmeServer
    from smsc.esme_server.session import EsmeSession

log = logging.getLogger(__name__)

ESM_CLASS_INTERMEDIATE = 0x20  # message type: intermediate delivery notification (SMPP v3.4 5.2.12)

CONSUMER = "esme"
RETRY_PAUSE_S = 1.0


@dataclass(frozen=True)
class Receipt:
    """A deliver_sm to send: a receipt (kind "receipt") or an MO (kind "mo")."""

    message_id: str
    fields: dict[str, Any]
    kind: str = "receipt"


def receipt_of(event: dict[str, Any], accepted: dict[str, Any]) -> Receipt | None:
    """The deliver_sm of a final event (a delivery receipt) or of a `sent` (an intermediate
    notification, ENROUTE), when the ESME asked for it (None otherwise: core/domain/esme_receipts.py)."""
    registered = registered_delivery_of(accepted)
    if intermediate_wanted(registered, event["type"]):
        return _deliver_sm(event, accepted, "ENROUTE", "000", ESM_CLASS_INTERMEDIATE)
    if event["type"] == "sent" or not final_receipt_wanted(registered, event["type"]):
        return None
    stat = SMPP_STATE.get(event["type"], "UNDELIV")
    if event["type"] == "undelivered" and str(event["data"].get("stat", "")) in MESSAGE_STATES:
        stat = str(event["data"]["stat"])
    err = str(event["data"].get("err") or "000")[:3].zfill(3)
    return _deliver_sm(event, accepted, stat, err, ESM_CLASS_RECEIPT)


def _deliver_sm(event: dict[str, Any], accepted: dict[str, Any], stat: str, err: str, esm_class: int) -> Receipt:
    data = accepted.get("data", {})
    origin = data.get("origin", {}).get("smpp", {})
    mid = event["message_id"]
    text = build_receipt_text(mid, accepted["at"], event["at"], stat=stat, err=err, text=data.get("text", ""))
    return Receipt(mid, {
        "source_addr_ton": origin.get("dest_ton", 1), "source_addr_npi": origin.get("dest_npi", 1),
        "source_addr": origin.get("destination", data.get("to", "")),
        "dest_addr_ton": origin.get("source_ton", 0), "dest_addr_npi": origin.get("source_npi", 0),
        "destination_addr": origin.get("source", data.get("sender", "")),
        "esm_class": esm_class, "data_coding": 0,
        "short_message": text.encode("ascii", errors="replace"),
        "receipted_message_id": mid, "message_state": MESSAGE_STATES[stat]})


class ReceiptSender:
    def __init__(self, server: EsmeServer, account: SmppAccount) -> None:
        self.server = server
        self.account = account
        self.topic = account.notify_topic
        self.owner_key = f"{CONSUMER}|{self.topic}"
        self.owners = Owners(server.db)
        self.log = server.events.log
        self.finished = False
        self.stats: collections.Counter[str] = collections.Counter()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._own: Ownership | None = None
        self.intermediate = IntermediateFollower(server, account)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"esme-receipts-{self.account.system_id}")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _receivers(self) -> list[EsmeSession]:
        return self.server.receivers(self.account.system_id)

    async def _run(self) -> None:
        try:
            while True:
                if not self._receivers():
                    self.finished = True  # no await since the check: a new bind starts a new sender
                    return
                try:
                    if await self._acquire():
                        await self._serve()
                except (Fenced, CheckpointMoved) as e:
                    log.warning("esme-server %s: receipts: %s; taking the account again", self.topic, e)
                    self._own = None
                except StoreError as e:
                    log.warning("esme-server %s: receipts: store unavailable: %s", self.topic, e)
                    await asyncio.sleep(RETRY_PAUSE_S)
        finally:
            self.finished = True
            if self._own is not None:
                await self.owners.release(self._own, self.server.clock())

    async def _acquire(self) -> bool:
        if self._own is None:
            self._own = await self.owners.acquire(self.owner_key, self.server.holder, self.server.clock(),
                                                  self.server.config.lease_s)
            if self._own is None:  # another process sends this account's receipts
                await self._sleep(self.server.config.lease_s / 4)
                return False
        return True

    async def _keep(self) -> Ownership:
        """Our ownership, its lease renewed once half of it has gone; Fenced if it was taken."""
        assert self._own is not None
        now = self.server.clock()
        if self._own.lease_until - now < timedelta(seconds=self.server.config.lease_s / 2):
            self._own = await self.owners.renew(self._own, now, self.server.config.lease_s)
        return self._own

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _serve(self) -> None:
        """Send ranges of the topic while a receiver bind is open."""
        while self._receivers():
            own = await self._keep()
            start = (await self.log.load_checkpoints(CONSUMER, [self.topic]))[self.topic]
            counter = (await self.log.counters([self.topic]))[self.topic]
            # After the counter: the ENROUTE of a message goes out before its final receipt (intermediate.py).
            caught_up = await self.intermediate.drain(self._receipts_of, self._deliver_all, self._keep)
            if caught_up is False:
                return
            if counter <= start:
                await self._sleep(self.server.config.poll_s)
                continue
            end = min(counter, start + min(self.server.config.receipt_batch, self.account.window))
            receipts = await self._receipts(start, end)
            if not await self._deliver_all(receipts):
                return  # no receiver left: the range waits in the topic
            own = await self._keep()
            await self.log.commit([], moves={checkpoint_id(CONSUMER, self.topic): (start, end)}, fence=own.fence)
            self.stats["ranges"] += 1

    async def _receipts(self, start: int, end: int) -> list[Receipt]:
        """The deliver_sm of [start, end): an MO carries all it needs; a receipt needs its message's
        `accepted` event (one query for the range)."""
        return await self._receipts_of(await self.log.read(self.topic, start, end))

    async def _receipts_of(self, docs: list[dict[str, Any]]) -> list[Receipt]:
        streams = await self.log.load_many(d["message_id"] for d in docs if d["type"] != "inbound")
        out = []
        for d in docs:
            if d["type"] == "inbound":
                out.append(Receipt(d["message_id"], mo_fields(d, self.account.alphabet), kind="mo"))
                log.info("esme-server %s: MO message=%s tenant=%s from=%s to deliver", self.topic,
                         d["message_id"], d["tenant_id"], d.get("data", {}).get("from"))
                continue
            accepted = next((e for e in streams.get(d["message_id"], []) if e["seq"] == 1), None)
            receipt = receipt_of(d, accepted) if accepted is not None else None
            if receipt is not None:
                out.append(receipt)
            else:
                self.stats["not_asked"] += 1
        return out

    async def _deliver_all(self, receipts: list[Receipt]) -> bool:
        """Send every receipt until each has its deliver_sm_resp (ROK); False if no receiver is left."""
        pending, first = receipts, True
        while pending:
            sessions = self._receivers()
            if not sessions:
                return False
            sent = [(r, sessions[i % len(sessions)]) for i, r in enumerate(pending)]
            futures = [s.deliver(r.fields) for r, s in sent]
            counter = metrics.ESME_RECEIPTS_SENT if first else metrics.ESME_RECEIPTS_REDELIVERED
            counter.inc(len(sent))
            self.stats["sent" if first else "redelivered"] += len(sent)
            self.stats["mo_sent" if first else "mo_redelivered"] += sum(r.kind == "mo" for r, _ in sent)
            await asyncio.wait(futures, timeout=self.server.config.receipt_timeout_s)
            pending = [r for (r, _), f in zip(sent, futures, strict=True) if not _acked(f)]
            answered = all(f.done() and not f.cancelled() for f in futures)
            for f in futures:
                f.cancel()  # a late answer of an abandoned send is ignored
            if pending:
                log.info("esme-server %s: %d deliver_sm not acknowledged (e.g. message=%s); sending again",
                         self.topic, len(pending), pending[0].message_id)
                await self._keep()
                if answered:
                    await asyncio.sleep(RETRY_PAUSE_S)  # refused, not lost: do not hammer the ESME
            first = False
        return True


def _acked(fut: asyncio.Future[int]) -> bool:
    return fut.done() and not fut.cancelled() and fut.result() == ESME_ROK

