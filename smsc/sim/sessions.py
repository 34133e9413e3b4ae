"""The simulator's per-connection state and its write path, and the receipt a submit_sm earns.

Everything here is touched from the simulator's event loop only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from smpplib.command import Command


@dataclass
class Receipt:
    """A delivery receipt owed for one accepted submit_sm; `due` is a time.monotonic() value."""

    due: float
    system_id: str
    message_id: str
    source: str
    destination: str
    submitted_at: datetime
    text: str
    stat: str = "DELIVRD"


@dataclass(eq=False)
class Conn:
    """One TCP connection and its bind state."""

    peer: str
    writer: asyncio.StreamWriter
    system_id: str | None = None
    mode: str | None = None  # "tx" | "rx" | "trx" once bound
    closing: bool = False
    outstanding: dict[int, Receipt] = field(default_factory=dict)  # deliver_sm sequence -> its receipt
    pings: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    out: list[bytes] = field(default_factory=list)
    pdus_received: int = 0

    @property
    def can_receive(self) -> bool:
        return self.mode in ("rx", "trx") and not self.closing

    @property
    def can_transmit(self) -> bool:
        return self.mode in ("tx", "trx")

    def send(self, pdu: Command) -> None:
        """Queue a PDU; everything queued in one loop iteration leaves in one write.

        asyncio's transport.write issues a send() at once when its buffer is empty, so writing each
        PDU separately costs a syscall per PDU; batching them was worth several times the throughput.
        """
        self.send_raw(pdu.generate())

    def send_raw(self, data: bytes) -> None:
        if self.writer.is_closing():
            return
        if not self.out:
            asyncio.get_running_loop().call_soon(self.flush)
        self.out.append(data)

    def flush(self) -> None:
        """Write what is queued now (also called at close, so nothing queued is left behind)."""
        data = b"".join(self.out)
        self.out.clear()
        if data and not self.writer.is_closing():
            self.writer.write(data)
