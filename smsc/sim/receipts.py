"""Delivery receipts of the simulator: scheduled when their delay has passed, queued per system_id,
sent as deliver_sm to the receiver-capable binds of that system_id within each bind's window.

A receipt leaves the schedule (a heap: jitter and live changes of the delay break due order) for its
system_id's queue when due; in `out_of_order` mode it first waits in a reorder buffer until a group
of `reorder_window` is full or it has waited REORDER_MAX_WAIT_S, then the group goes out shuffled.
A receipt is never resent on its own: one still unacknowledged when its bind drops goes back to the
front of the queue for the next bind of that system_id, as a real SMSC keeps receipts until
acknowledged. Event-loop only.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import deque
from datetime import UTC, datetime

from smpplib import smpp
from smpplib.command import Command

from smsc.pdu import ESM_CLASS_RECEIPT, ESME_ROK, MESSAGE_STATES, SequenceCounter, build_receipt_text
from smsc.sim.faults import REORDER_MAX_WAIT_S, FaultEngine
from smsc.sim.sessions import Conn, Receipt

log = logging.getLogger(__name__)


class ReceiptQueues:
    """The receipts one simulator owes, from scheduled to acknowledged.

    `conns` is the simulator's live set of connections (read, never changed here); `counters` its
    protocol counters (`deliver_sm_sent` is counted here).
    """

    def __init__(self, conns: set[Conn], faults: FaultEngine, seq: SequenceCounter, deliver_window: int,
                 counters: dict[str, int]) -> None:
        self._conns = conns
        self._faults = faults
        self._seq = seq
        self._deliver_window = deliver_window
        self._counters = counters
        self._scheduled: list[tuple[float, int, Receipt]] = []  # (due, tiebreak, receipt)
        self._tiebreak = itertools.count()
        self._wake = asyncio.Event()
        # out_of_order: receipts held per system_id until a group is full or has waited long enough.
        self._reorder: dict[str, list[Receipt]] = {}
        self._reorder_since: dict[str, float] = {}
        self._pending: dict[str, deque[Receipt]] = {}

    def schedule(self, receipt: Receipt) -> None:
        """Send `receipt` once `receipt.due` has passed."""
        if not self._scheduled or receipt.due < self._scheduled[0][0]:
            self._wake.set()
        heapq.heappush(self._scheduled, (receipt.due, next(self._tiebreak), receipt))

    def wake(self) -> None:
        """Make the scheduler look again (e.g. to release held receipts when leaving out_of_order)."""
        self._wake.set()

    def counts(self) -> dict[str, int]:
        return {
            "receipts_scheduled": len(self._scheduled) + sum(len(b) for b in self._reorder.values()),
            "receipts_pending": sum(len(q) for q in self._pending.values()),
            "receipts_outstanding": sum(len(c.outstanding) for c in self._conns),
        }

    def requeue(self, conn: Conn) -> None:
        """A connection is gone: its unacknowledged receipts go back to the front of its queue."""
        if not conn.outstanding or conn.system_id is None:
            return
        queue = self._pending.setdefault(conn.system_id, deque())
        queue.extendleft(reversed(list(conn.outstanding.values())))
        log.info("smsc-sim %s (system_id %s) dropped with %d receipts unacknowledged; requeued",
                 conn.peer, conn.system_id, len(conn.outstanding))
        conn.outstanding.clear()
        self.pump(conn.system_id)

    def acknowledged(self, conn: Conn, sequence: int, status: int) -> None:
        """A deliver_sm_resp: the receipt is settled either way (a refused one is not resent)."""
        receipt = conn.outstanding.pop(sequence, None)
        if receipt is None:
            log.warning("smsc-sim %s: deliver_sm_resp for unknown seq %d", conn.peer, sequence)
            return
        if status == ESME_ROK:
            self._counters["deliver_sm_acked"] += 1
        else:
            self._counters["deliver_sm_nacked"] += 1
            log.info("smsc-sim %s: receipt for smsc message id %s refused with 0x%02x (not resent)",
                     conn.peer, receipt.message_id, status)
        if conn.system_id is not None:
            self.pump(conn.system_id)

    # ---- scheduling ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Move receipts whose delay has passed to their system_id's queue (through the reorder
        buffer in out_of_order mode) and pump them; sleep until the next is due or a submit brings
        an earlier one. Runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            for system_id in self._release_due(time.monotonic()):
                self.pump(system_id)
            deadlines = [self._scheduled[0][0]] if self._scheduled else []
            if self._reorder_since:
                deadlines.append(min(self._reorder_since.values()) + REORDER_MAX_WAIT_S)
            self._wake.clear()
            if not deadlines:
                await self._wake.wait()
                continue
            wait = min(deadlines) - time.monotonic()
            if wait > 0:
                # A timer that sets the event, not asyncio.timeout: no cancellation (an exception) per wake.
                timer = loop.call_later(wait, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()

    def _release_due(self, now: float) -> set[str]:
        """Receipts due by `now` to their queues (or the reorder buffer); the system_ids touched."""
        touched: set[str] = set()
        reorder = self._faults.settings.receipt_mode == "out_of_order"
        while self._scheduled and self._scheduled[0][0] <= now:
            receipt = heapq.heappop(self._scheduled)[2]
            if reorder:
                self._hold_for_reorder(receipt, now, touched)
            else:
                self._pending.setdefault(receipt.system_id, deque()).append(receipt)
                touched.add(receipt.system_id)
        for system_id in list(self._reorder):
            if not reorder or now - self._reorder_since[system_id] >= REORDER_MAX_WAIT_S:
                self._release_reordered(system_id)
                touched.add(system_id)
        return touched

    def _hold_for_reorder(self, receipt: Receipt, now: float, touched: set[str]) -> None:
        held = self._reorder.setdefault(receipt.system_id, [])
        if not held:
            self._reorder_since[receipt.system_id] = now
        held.append(receipt)
        if len(held) >= self._faults.settings.reorder_window:
            self._release_reordered(receipt.system_id)
            touched.add(receipt.system_id)

    def _release_reordered(self, system_id: str) -> None:
        held = self._reorder.pop(system_id, [])
        self._reorder_since.pop(system_id, None)
        self._faults.shuffle(held)
        if len(held) > 1:
            self._faults.counters["receipts_reordered"] += len(held)
            log.debug("smsc-sim fault: %d receipts of system_id %s released shuffled: %s", len(held), system_id,
                      [r.message_id for r in held])
        self._pending.setdefault(system_id, deque()).extend(held)

    # ---- sending ---------------------------------------------------------------------------------

    def pump(self, system_id: str) -> None:
        """Send queued receipts of `system_id` to its receiver-capable binds while their window has room."""
        queue = self._pending.get(system_id)
        if not queue:
            return
        for conn in [c for c in self._conns if c.system_id == system_id and c.can_receive]:
            while queue and len(conn.outstanding) < self._deliver_window:
                self.send(conn, queue.popleft())
            if not queue:
                return

    def send_now(self, conn: Conn, receipt: Receipt) -> bool:
        """before_response: write the receipt ahead of the submit_sm_resp, on this bind if it can
        receive, else on another receiver of the system_id with window room; False if none can."""
        candidates = [conn] if conn.can_receive else []
        candidates += [c for c in self._conns if c is not conn and c.system_id == receipt.system_id and c.can_receive]
        for target in candidates:
            if len(target.outstanding) < self._deliver_window:
                self._faults.counters["receipts_before_response"] += 1
                self.send(target, receipt)
                return True
        return False

    def send(self, conn: Conn, receipt: Receipt) -> None:
        """The receipt as a deliver_sm on `conn` (after a malformed PDU when that fault strikes)."""
        bad = self._faults.malformed_pdu(self._seq)
        if bad is not None:
            kind, data = bad
            log.info("smsc-sim fault: malformed PDU (%s) to %s (system_id %s) ahead of the receipt for %s",
                     kind, conn.peer, conn.system_id, receipt.message_id)
            conn.send_raw(data)
        pdu = receipt_pdu(receipt, self._seq)
        conn.outstanding[pdu.sequence] = receipt
        self._counters["deliver_sm_sent"] += 1
        conn.send(pdu)


def receipt_pdu(receipt: Receipt, seq: SequenceCounter) -> Command:
    """The deliver_sm (esm_class 0x04, TLVs receipted_message_id and message_state) for `receipt`."""
    text = build_receipt_text(
        receipt.message_id,
        receipt.submitted_at,
        datetime.now(UTC),
        stat=receipt.stat,
        # The receipt travels as data_coding 0; keep it to characters every decoder agrees on.
        text=receipt.text[:20].encode("ascii", errors="replace").decode("ascii"),
    )
    return smpp.make_pdu(
        "deliver_sm",
        client=seq,
        service_type="",
        source_addr_ton=1,
        source_addr_npi=1,
        source_addr=receipt.destination,
        dest_addr_ton=5,
        dest_addr_npi=0,
        destination_addr=receipt.source,
        esm_class=ESM_CLASS_RECEIPT,
        data_coding=0,
        short_message=text.encode("ascii"),
        receipted_message_id=receipt.message_id,
        message_state=MESSAGE_STATES[receipt.stat],
    )
