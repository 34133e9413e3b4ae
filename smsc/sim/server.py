"""SMSC simulator: an SMPP v3.4 server on asyncio streams that answers submit_sm and sends receipts.

What it does:

- bind_transmitter / bind_receiver / bind_transceiver (any credentials unless `credentials` is set);
- submit_sm -> submit_sm_resp with a message id unique across restarts (random prefix + counter);
- a delivery receipt (deliver_sm, esm_class 0x04, TLVs receipted_message_id and message_state)
  `receipt_delay_s` after each submit_sm whose registered_delivery asks for one, sent to any
  receiver-capable bind of the same system_id, with at most `deliver_window` unacknowledged per bind;
- enquire_link, unbind, generic_nack for commands it does not know.

It never retransmits a receipt on its own (no timer, no resend on a non-zero deliver_sm_resp); a
receipt still unacknowledged when its bind drops is queued again for the next bind of that system_id,
as a real SMSC keeps receipts until acknowledged.

Faults (error ratio, throttling, dropped connections, refused binds, receipts late / never / out of
order / before the response / with a stat mix, malformed PDUs) are switched by `FaultSettings`
(`smsc.sim.faults`, all off by default): at construction (`faults=`), from Python
(`set_faults(**changes)`, `replace_faults`, `reset`) or over HTTP when `control_port` is given
(`smsc.sim.control`). `stats()` includes per-second submit_sm counts per system_id (last 60 s).
Several simulators can run in one process or side by side, each on its own ports.

This module owns the sockets and the lifecycle; the answers to each PDU are in `smsc.sim.handlers`,
the receipts in `smsc.sim.receipts`, the journal in `smsc.sim.journal`.

Throughput: responses are written without awaiting drain per PDU; the reader drains only when the
transport buffer grows large, so one core serves several thousand submit_sm/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smpplib import smpp

from smsc.pdu import ESME_RINVCMDLEN, MESSAGE_STATES, SequenceCounter
from smsc.sim.control import ControlServer
from smsc.sim.faults import FaultEngine, FaultSettings
from smsc.sim.handlers import HEADER, PduHandlers
from smsc.sim.journal import Journal
from smsc.sim.receipts import ReceiptQueues
from smsc.sim.sessions import Conn

log = logging.getLogger(__name__)

MAX_PDU_LEN = 64 * 1024
READ_CHUNK = 256 * 1024
DRAIN_ABOVE = 1024 * 1024
STOP_GRACE_S = 1.0


def _protocol_counters() -> dict[str, int]:
    return {
        "binds_total": 0,
        "submit_sm": 0,
        "deliver_sm_sent": 0,
        "deliver_sm_acked": 0,
        "deliver_sm_nacked": 0,
        "enquire_link_received": 0,
        "enquire_link_resp_received": 0,
        "unbind_received": 0,
        "generic_nack_sent": 0,
    }


class Simulator:
    """An SMPP server for tests, benchmarks and `msgcore smsc-sim`; listens on 127.0.0.1 only."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 2775,
        receipt_delay_s: float = 0.2,
        journal_path: str | Path | None = None,
        receipt_stat: str = "DELIVRD",
        *,
        credentials: Mapping[str, str] | None = None,
        deliver_window: int = 100,
        faults: FaultSettings | Mapping[str, Any] | None = None,
        control_port: int | None = None,
    ) -> None:
        """`receipt_delay_s` and `receipt_stat` are the base receipt settings; fields set explicitly
        in `faults` take precedence over them. `control_port` (0 = ephemeral) starts the HTTP
        control API on 127.0.0.1 (see `smsc.sim.control`)."""
        if host != "127.0.0.1":
            raise ValueError("the simulator listens on 127.0.0.1 only")
        if receipt_stat not in MESSAGE_STATES:
            raise ValueError(f"unknown receipt stat {receipt_stat!r}")
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._faults = FaultEngine(_initial_faults(receipt_delay_s, receipt_stat, faults))
        self._requested_control_port = control_port
        self._control: ControlServer | None = None
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: set[Conn] = set()
        self._counters = _protocol_counters()
        self._seq = SequenceCounter()
        self._journal = Journal(journal_path)
        self._receipts = ReceiptQueues(self._conns, self._faults, self._seq, deliver_window, self._counters)
        self._pdus = PduHandlers(self._faults, self._receipts, self._journal, self._seq, self._counters, credentials)

    # ---- faults and figures ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually listened on (the ephemeral one when constructed with port 0)."""
        if self._port is None:
            raise RuntimeError("simulator not started")
        return self._port

    @property
    def control_port(self) -> int | None:
        """The control API's port once started (None without one)."""
        return self._control.port if self._control is not None else None

    @property
    def faults(self) -> FaultSettings:
        """The fault settings in force."""
        return self._faults.settings

    def set_faults(self, **changes: Any) -> FaultSettings:
        """Merge `changes` into the fault settings (validated; pydantic's ValidationError on bad input)."""
        new = self._faults.update(changes)
        log.info("smsc-sim port %s: faults changed %s; active: %s", self._port, sorted(changes), new.active())
        if "receipt_mode" in changes:
            self._receipts.wake()  # the scheduler releases held receipts when leaving out_of_order
        return new

    def replace_faults(self, settings: FaultSettings | Mapping[str, Any]) -> FaultSettings:
        """Replace all fault settings; fields not given take the model's defaults (all faults off)."""
        data = settings.model_dump() if isinstance(settings, FaultSettings) else dict(settings)
        new = self._faults.update(data, replace=True)
        log.info("smsc-sim port %s: faults replaced; active: %s", self._port, new.active())
        self._receipts.wake()
        return new

    def reset(self) -> FaultSettings:
        """Fault settings back to those given at construction; fault counters and rates cleared."""
        new = self._faults.reset()
        log.info("smsc-sim port %s: faults reset; active: %s", self._port, new.active())
        self._receipts.wake()
        return new

    def stats(self) -> dict[str, Any]:
        """Counters since start, current binds and receipts not yet acknowledged, fault counters
        (since start or `reset`), and `submit_per_second`: per system_id, one entry per second of the
        last 60 with submit_sm `received`, `ok`, `throttled` and `failed`."""
        return {
            **self._counters,
            "binds_active": sum(1 for c in self._conns if c.mode is not None),
            **self._receipts.counts(),
            **self._faults.snapshot(),
        }

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen and start the receipt and journal tasks; returns once the socket is bound."""
        self._journal.open()
        self._server = await asyncio.start_server(self._handle, self._host, self._requested_port)
        self._port = self._server.sockets[0].getsockname()[1]
        self._tasks = [
            asyncio.create_task(self._receipts.run(), name="smsc-sim-receipts"),
            asyncio.create_task(self._journal.flusher(), name="smsc-sim-journal"),
        ]
        if self._requested_control_port is not None:
            self._control = ControlServer(self, self._requested_control_port)
            await self._control.start()
        log.info("smsc-sim started on %s:%d (journal %s, control port %s, faults %s)", self._host, self._port,
                 self._journal.path, self.control_port, self._faults.settings.active())

    async def stop(self) -> None:
        """Stop accepting, send unbind to every bound session, wait briefly, close all, flush the journal."""
        if self._control is not None:
            await self._control.stop()
            self._control = None
        if self._server is not None:
            self._server.close()
        await self._close_connections()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._journal.close()
        stats = self.stats()
        stats.pop("submit_per_second")
        log.info("smsc-sim on port %s stopped: %s", self._port, stats)

    async def _close_connections(self) -> None:
        """Unbind every bound session, give them STOP_GRACE_S to go, then close what is left."""
        for conn in list(self._conns):
            if conn.mode is not None and not conn.closing:
                conn.send(smpp.make_pdu("unbind", client=self._seq))
        deadline = time.monotonic() + STOP_GRACE_S
        while self._conns and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        handler_tasks = [c.task for c in self._conns if c.task is not None]
        for conn in list(self._conns):
            conn.closing = True
            conn.flush()
            conn.writer.close()
        if handler_tasks:
            await asyncio.wait(handler_tasks, timeout=STOP_GRACE_S)

    async def ping_sessions(self, timeout_s: float = 2.0) -> int:
        """Send enquire_link to every bound session; the number that answered within `timeout_s`."""
        loop = asyncio.get_running_loop()
        waits: list[asyncio.Future[None]] = []
        for conn in self._conns:
            if conn.mode is None or conn.closing:
                continue
            pdu = smpp.make_pdu("enquire_link", client=self._seq)
            fut: asyncio.Future[None] = loop.create_future()
            conn.pings[pdu.sequence] = fut
            waits.append(fut)
            conn.send(pdu)
        if not waits:
            return 0
        done, _ = await asyncio.wait(waits, timeout=timeout_s)
        for fut in waits:
            fut.cancel()
        return sum(1 for f in done if not f.cancelled() and f.exception() is None)

    # ---- connection handling ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        conn = Conn(peer=f"{addr[0]}:{addr[1]}" if addr else "?", writer=writer, task=asyncio.current_task())
        self._conns.add(conn)
        log.debug("smsc-sim connection from %s", conn.peer)
        try:
            await self._read_loop(conn, reader)
        except (ConnectionError, OSError) as exc:
            log.info("smsc-sim connection %s (system_id %s) dropped: %s", conn.peer, conn.system_id, exc)
        except Exception:
            log.exception("smsc-sim connection %s (system_id %s) failed", conn.peer, conn.system_id)
        finally:
            self._drop(conn)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _read_loop(self, conn: Conn, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        while not conn.closing:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                return
            buf += chunk
            self._handle_complete_pdus(conn, buf)
            if conn.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                await conn.writer.drain()
        if conn.closing:
            conn.flush()
            with contextlib.suppress(ConnectionError, OSError):
                await conn.writer.drain()

    def _handle_complete_pdus(self, conn: Conn, buf: bytearray) -> None:
        """Handle every complete PDU in `buf` (removing it) before yielding: responses are batched
        into the transport buffer and leave in few syscalls. A bad length closes the connection."""
        while len(buf) >= 4 and not conn.closing:
            (length,) = struct.unpack_from(">L", buf)
            if length < 16 or length > MAX_PDU_LEN:
                log.warning("smsc-sim %s sent a PDU of length %d; closing", conn.peer, length)
                seq = struct.unpack_from(">L", buf, 12)[0] if len(buf) >= 16 else 0
                self._pdus.nack(conn, seq, ESME_RINVCMDLEN)
                conn.closing = True
                return
            if len(buf) < length:
                return
            raw = bytes(buf[:length])
            del buf[:length]
            conn.pdus_received += 1
            if self._faults.should_drop(conn.pdus_received):
                self._fault_drop(conn, raw)
                return
            self._pdus.dispatch(conn, raw)

    def _fault_drop(self, conn: Conn, raw: bytes) -> None:
        """drop_after_pdus: handle this last PDU, lose its response, and close the connection."""
        keep = len(conn.out)
        self._pdus.dispatch(conn, raw)
        lost = len(conn.out) - keep
        del conn.out[keep:]
        conn.closing = True
        self._faults.counters["connections_dropped"] += 1
        _, command_id, _, seq = HEADER.unpack_from(raw)
        log.warning(
            "smsc-sim fault: dropping %s (system_id %s) after %d PDUs; last PDU 0x%08x seq %d handled, "
            "%d response PDU(s) lost",
            conn.peer,
            conn.system_id,
            conn.pdus_received,
            command_id,
            seq,
            lost,
        )

    def _drop(self, conn: Conn) -> None:
        """Forget a connection; its unacknowledged receipts go back to the front of its queue."""
        self._conns.discard(conn)
        for fut in conn.pings.values():
            fut.cancel()
        self._receipts.requeue(conn)
        if conn.mode is not None:
            log.info("smsc-sim unbound %s (system_id %s, %s)", conn.peer, conn.system_id, conn.mode)


def _initial_faults(
    receipt_delay_s: float, receipt_stat: str, faults: FaultSettings | Mapping[str, Any] | None
) -> FaultSettings:
    """The constructor's receipt settings, overridden by the fields `faults` sets explicitly."""
    base = FaultSettings(receipt_delay_s=receipt_delay_s, receipt_stat=receipt_stat)
    if faults is None:
        return base
    explicit = faults.model_dump(include=faults.model_fields_set) if isinstance(faults, FaultSettings) else dict(faults)
    return FaultSettings.model_validate({**base.model_dump(), **explicit})


async def run_simulator(args: Any) -> None:
    """Run a simulator configured from a settings-like object until cancelled.

    Reads attributes `port` (default 2775), `receipt_delay_s` (0.2), `journal_path` (None),
    `receipt_stat` ("DELIVRD"), `control_port` (None) and `faults` (None: a FaultSettings or a
    mapping); missing ones take the defaults. Always listens on 127.0.0.1.
    """
    sim = Simulator(
        port=int(getattr(args, "port", 2775)),
        receipt_delay_s=float(getattr(args, "receipt_delay_s", 0.2)),
        journal_path=getattr(args, "journal_path", None),
        receipt_stat=str(getattr(args, "receipt_stat", "DELIVRD")),
        faults=getattr(args, "faults", None),
        control_port=getattr(args, "control_port", None),
    )
    await sim.start()
    log.info("smsc-sim listening on 127.0.0.1:%d", sim.port)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
