"""SMSC simulator: an SMPP v3.4 server on asyncio streams that answers submit_sm and sends receipts.

PDUs are encoded and decoded with smpplib's PDU classes. What it does:

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
(`smsc.sim_faults`, all off by default): at construction (`faults=`), from Python
(`set_faults(**changes)`, `replace_faults`, `reset`) or over HTTP when `control_port` is given
(`smsc.sim_control`). `stats()` includes per-second submit_sm counts per system_id (last 60 s).
Several simulators can run in one process or side by side, each on its own ports.

Throughput: responses are written without awaiting drain per PDU; the reader drains only when the
transport buffer grows large, so one core serves several thousand submit_sm/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import secrets
import struct
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from smpplib import command_codes, exceptions, smpp
from smpplib.command import Command

from core.domain.encoding import decode_short_message, split_udh
from smsc.pdu import (
    ESM_CLASS_RECEIPT,
    ESME_RALYBND,
    ESME_RBINDFAIL,
    ESME_RINVBNDSTS,
    ESME_RINVCMDID,
    ESME_RINVCMDLEN,
    ESME_RINVPASWD,
    ESME_RINVSYSID,
    ESME_ROK,
    MESSAGE_STATES,
    SequenceCounter,
    as_str,
    build_receipt_text,
)
from smsc.sim_faults import REORDER_MAX_WAIT_S, FaultEngine, FaultSettings

log = logging.getLogger(__name__)

HEADER = struct.Struct(">LLLL")
MAX_PDU_LEN = 64 * 1024
READ_CHUNK = 256 * 1024
DRAIN_ABOVE = 1024 * 1024
JOURNAL_FLUSH_S = 0.2
STOP_GRACE_S = 1.0

_BIND_MODES = {"bind_transmitter": "tx", "bind_receiver": "rx", "bind_transceiver": "trx"}


@dataclass
class _Receipt:
    due: float
    system_id: str
    message_id: str
    source: str
    destination: str
    submitted_at: datetime
    text: str
    stat: str = "DELIVRD"


@dataclass(eq=False)
class _Conn:
    """One TCP connection and its bind state; touched only from the event loop."""

    peer: str
    writer: asyncio.StreamWriter
    system_id: str | None = None
    mode: str | None = None  # "tx" | "rx" | "trx" once bound
    closing: bool = False
    outstanding: dict[int, _Receipt] = field(default_factory=dict)
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
        control API on 127.0.0.1 (see `smsc.sim_control`)."""
        if host != "127.0.0.1":
            raise ValueError("the simulator listens on 127.0.0.1 only")
        if receipt_stat not in MESSAGE_STATES:
            raise ValueError(f"unknown receipt stat {receipt_stat!r}")
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._journal_path = Path(journal_path) if journal_path is not None else None
        self._credentials = dict(credentials) if credentials is not None else None
        self._deliver_window = deliver_window
        self._faults = FaultEngine(_initial_faults(receipt_delay_s, receipt_stat, faults))
        self._requested_control_port = control_port
        self._control: Any = None  # smsc.sim_control.ControlServer once started

        self._seq = SequenceCounter()
        # The random prefix keeps ids unique across restarts; the counter keeps them unique within one.
        self._id_prefix = secrets.token_hex(4)
        self._id_counter = 0

        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        # Heap of (due, tiebreak, receipt): jitter and live changes of the delay break due order.
        self._scheduled: list[tuple[float, int, _Receipt]] = []
        self._tiebreak = itertools.count()
        self._scheduled_event = asyncio.Event()
        # out_of_order: receipts held per system_id until a group is full or has waited long enough.
        self._reorder: dict[str, list[_Receipt]] = {}
        self._reorder_since: dict[str, float] = {}
        self._pending: dict[str, deque[_Receipt]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._journal_buf: list[str] = []
        self._journal_file: IO[str] | None = None
        self._counters = {
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

    # ---- lifecycle -------------------------------------------------------------------------------

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
            self._scheduled_event.set()  # the scheduler releases held receipts when leaving out_of_order
        return new

    def replace_faults(self, settings: FaultSettings | Mapping[str, Any]) -> FaultSettings:
        """Replace all fault settings; fields not given take the model's defaults (all faults off)."""
        data = settings.model_dump() if isinstance(settings, FaultSettings) else dict(settings)
        new = self._faults.update(data, replace=True)
        log.info("smsc-sim port %s: faults replaced; active: %s", self._port, new.active())
        self._scheduled_event.set()
        return new

    def reset(self) -> FaultSettings:
        """Fault settings back to those given at construction; fault counters and rates cleared."""
        new = self._faults.reset()
        log.info("smsc-sim port %s: faults reset; active: %s", self._port, new.active())
        self._scheduled_event.set()
        return new

    async def start(self) -> None:
        """Listen and start the receipt and journal tasks; returns once the socket is bound."""
        if self._journal_path is not None:
            self._journal_path.parent.mkdir(parents=True, exist_ok=True)
            self._journal_file = self._journal_path.open("a", encoding="utf-8")
        self._server = await asyncio.start_server(self._handle, self._host, self._requested_port)
        self._port = self._server.sockets[0].getsockname()[1]
        self._tasks = [
            asyncio.create_task(self._receipt_scheduler(), name="smsc-sim-receipts"),
            asyncio.create_task(self._journal_flusher(), name="smsc-sim-journal"),
        ]
        if self._requested_control_port is not None:
            from smsc.sim_control import ControlServer

            self._control = ControlServer(self, self._requested_control_port)
            await self._control.start()
        log.info("smsc-sim started on %s:%d (journal %s, control port %s, faults %s)", self._host, self._port,
                 self._journal_path, self.control_port, self._faults.settings.active())

    async def stop(self) -> None:
        """Stop accepting, send unbind to every bound session, wait briefly, close all, flush the journal."""
        if self._control is not None:
            await self._control.stop()
            self._control = None
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            if conn.mode is not None and not conn.closing:
                self._send(conn, smpp.make_pdu("unbind", client=self._seq))
        deadline = time.monotonic() + STOP_GRACE_S
        while self._conns and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        handler_tasks = [c.task for c in self._conns if c.task is not None]
        for conn in list(self._conns):
            conn.closing = True
            self._flush(conn)
            conn.writer.close()
        if handler_tasks:
            await asyncio.wait(handler_tasks, timeout=STOP_GRACE_S)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._flush_journal()
        if self._journal_file is not None:
            self._journal_file.close()
            self._journal_file = None
        stats = self.stats()
        stats.pop("submit_per_second")
        log.info("smsc-sim on port %s stopped: %s", self._port, stats)

    def stats(self) -> dict[str, Any]:
        """Counters since start, current binds and receipts not yet acknowledged, fault counters
        (since start or `reset`), and `submit_per_second`: per system_id, one entry per second of the
        last 60 with submit_sm `received`, `ok`, `throttled` and `failed`."""
        return {
            **self._counters,
            "binds_active": sum(1 for c in self._conns if c.mode is not None),
            "receipts_scheduled": len(self._scheduled) + sum(len(b) for b in self._reorder.values()),
            "receipts_pending": sum(len(q) for q in self._pending.values()),
            "receipts_outstanding": sum(len(c.outstanding) for c in self._conns),
            **self._faults.snapshot(),
        }

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
            self._send(conn, pdu)
        if not waits:
            return 0
        done, _ = await asyncio.wait(waits, timeout=timeout_s)
        for fut in waits:
            fut.cancel()
        return sum(1 for f in done if not f.cancelled() and f.exception() is None)

    # ---- connection handling ---------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")
        conn = _Conn(peer=f"{addr[0]}:{addr[1]}" if addr else "?", writer=writer, task=asyncio.current_task())
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

    async def _read_loop(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        while not conn.closing:
            chunk = await reader.read(READ_CHUNK)
            if not chunk:
                return
            buf += chunk
            # Handle every complete PDU in the chunk before yielding: responses are batched into
            # the transport buffer and leave in few syscalls.
            while len(buf) >= 4 and not conn.closing:
                (length,) = struct.unpack_from(">L", buf)
                if length < 16 or length > MAX_PDU_LEN:
                    log.warning("smsc-sim %s sent a PDU of length %d; closing", conn.peer, length)
                    seq = struct.unpack_from(">L", buf, 12)[0] if len(buf) >= 16 else 0
                    self._nack(conn, seq, ESME_RINVCMDLEN)
                    conn.closing = True
                    break
                if len(buf) < length:
                    break
                raw = bytes(buf[:length])
                del buf[:length]
                conn.pdus_received += 1
                if self._faults.should_drop(conn.pdus_received):
                    self._fault_drop(conn, raw)
                    break
                self._dispatch(conn, raw)
            if conn.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                await conn.writer.drain()
        if conn.closing:
            self._flush(conn)
            with contextlib.suppress(ConnectionError, OSError):
                await conn.writer.drain()

    def _fault_drop(self, conn: _Conn, raw: bytes) -> None:
        """drop_after_pdus: handle this last PDU, lose its response, and close the connection."""
        keep = len(conn.out)
        self._dispatch(conn, raw)
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

    def _drop(self, conn: _Conn) -> None:
        """Forget a connection; its unacknowledged receipts go back to the front of its queue."""
        self._conns.discard(conn)
        for fut in conn.pings.values():
            fut.cancel()
        if conn.outstanding and conn.system_id is not None:
            queue = self._pending.setdefault(conn.system_id, deque())
            queue.extendleft(reversed(list(conn.outstanding.values())))
            log.info(
                "smsc-sim %s (system_id %s) dropped with %d receipts unacknowledged; requeued",
                conn.peer,
                conn.system_id,
                len(conn.outstanding),
            )
            conn.outstanding.clear()
            self._pump(conn.system_id)
        if conn.mode is not None:
            log.info("smsc-sim unbound %s (system_id %s, %s)", conn.peer, conn.system_id, conn.mode)

    def _send(self, conn: _Conn, pdu: Command) -> None:
        """Queue a PDU; everything queued in one loop iteration leaves in one write.

        asyncio's transport.write issues a send() at once when its buffer is empty, so writing each
        PDU separately costs a syscall per PDU; batching them was worth several times the throughput.
        """
        self._send_raw(conn, pdu.generate())

    def _send_raw(self, conn: _Conn, data: bytes) -> None:
        if conn.writer.is_closing():
            return
        if not conn.out:
            asyncio.get_running_loop().call_soon(self._flush, conn)
        conn.out.append(data)

    @staticmethod
    def _flush(conn: _Conn) -> None:
        data = b"".join(conn.out)
        conn.out.clear()
        if data and not conn.writer.is_closing():
            conn.writer.write(data)

    def _respond(self, conn: _Conn, name: str, seq: int, status: int = ESME_ROK, **fields: Any) -> None:
        resp = smpp.make_pdu(name, client=self._seq, status=status, **fields)
        resp.sequence = seq
        self._send(conn, resp)

    def _nack(self, conn: _Conn, seq: int, status: int) -> None:
        self._counters["generic_nack_sent"] += 1
        self._respond(conn, "generic_nack", seq, status)

    # ---- dispatch --------------------------------------------------------------------------------

    def _dispatch(self, conn: _Conn, raw: bytes) -> None:
        _, command_id, _, seq = HEADER.unpack_from(raw)
        try:
            name = command_codes.get_command_name(command_id)
            pdu = smpp.parse_pdu(raw, client=self._seq, allow_unknown_opt_params=True)
        except exceptions.UnknownCommandError:
            log.warning("smsc-sim %s: unknown command 0x%08x seq %d", conn.peer, command_id, seq)
            self._nack(conn, seq, ESME_RINVCMDID)
            return
        except (struct.error, IndexError, ValueError, UnicodeError, exceptions.PDUError) as exc:
            log.warning("smsc-sim %s: malformed PDU 0x%08x seq %d: %s", conn.peer, command_id, seq, exc)
            self._nack(conn, seq, ESME_RINVCMDLEN)
            return
        handler = self._handlers.get(name)
        if handler is not None:
            handler(self, conn, pdu)
        elif command_id & 0x80000000:
            log.info("smsc-sim %s: ignoring unexpected %s seq %d", conn.peer, name, seq)
        else:
            log.info("smsc-sim %s: unsupported %s seq %d", conn.peer, name, seq)
            self._nack(conn, seq, ESME_RINVCMDID)

    def _on_bind(self, conn: _Conn, pdu: Command) -> None:
        resp_name = f"{pdu.command}_resp"
        system_id = as_str(pdu.system_id) or ""
        if conn.mode is not None:
            self._respond(conn, resp_name, pdu.sequence, ESME_RALYBND)
            return
        if self._faults.binds_refused():
            log.warning("smsc-sim fault: bind of %s refused for system_id %s (0x%02x, %.1fs left)", conn.peer,
                        system_id, ESME_RBINDFAIL, self._faults.refuse_binds_remaining_s())
            self._respond(conn, resp_name, pdu.sequence, ESME_RBINDFAIL)
            return
        status = self._check_credentials(system_id, as_str(pdu.password) or "")
        if status != ESME_ROK:
            log.warning("smsc-sim %s: bind refused for system_id %s (0x%02x)", conn.peer, system_id, status)
            self._respond(conn, resp_name, pdu.sequence, status)
            return
        conn.system_id = system_id
        conn.mode = _BIND_MODES[pdu.command]
        self._counters["binds_total"] += 1
        self._respond(conn, resp_name, pdu.sequence, system_id="msgcore-sim")
        log.info("smsc-sim bound %s as %s (system_id %s)", conn.peer, conn.mode, system_id)
        if conn.can_receive:
            self._pump(system_id)

    def _check_credentials(self, system_id: str, password: str) -> int:
        if self._credentials is None:
            return ESME_ROK
        if system_id not in self._credentials:
            return ESME_RINVSYSID
        if self._credentials[system_id] != password:
            return ESME_RINVPASWD
        return ESME_ROK

    def _on_submit_sm(self, conn: _Conn, pdu: Command) -> None:
        if not conn.can_transmit or conn.system_id is None:
            self._respond(conn, "submit_sm_resp", pdu.sequence, ESME_RINVBNDSTS)
            return
        self._counters["submit_sm"] += 1
        faults = self._faults
        status = faults.submit_status(conn.system_id, conn.peer, time.monotonic())
        if status != ESME_ROK:
            log.debug("smsc-sim fault: submit_sm seq %d from %s (system_id %s) answered 0x%02x",
                      pdu.sequence, conn.peer, conn.system_id, status)
            self._respond(conn, "submit_sm_resp", pdu.sequence, status)
            return
        self._id_counter += 1
        message_id = f"{self._id_prefix}{self._id_counter:010x}"
        now = datetime.now(UTC)
        source, destination = as_str(pdu.source_addr) or "", as_str(pdu.destination_addr) or ""
        payload: bytes = pdu.short_message or b""
        esm_class, data_coding = pdu.esm_class or 0, pdu.data_coding or 0
        udh, body = split_udh(payload, esm_class)
        text = decode_short_message(body, data_coding)
        registered = pdu.registered_delivery or 0
        receipt: _Receipt | None = None
        stat = faults.receipt_stat()
        if self._wants_receipt(registered, stat):
            receipt = _Receipt(
                due=0.0,
                system_id=conn.system_id,
                message_id=message_id,
                source=source,
                destination=destination,
                submitted_at=now,
                text=text,
                stat=stat,
            )
            mode = faults.settings.receipt_mode
            if mode == "never":
                faults.counters["receipts_withheld"] += 1
                log.debug("smsc-sim fault: receipt for smsc message id %s withheld", message_id)
                receipt = None
            elif mode == "before_response" and self._send_receipt_now(conn, receipt):
                receipt = None
        self._respond(conn, "submit_sm_resp", pdu.sequence, message_id=message_id)
        self._journal(
            at=now.isoformat(),
            system_id=conn.system_id,
            message_id=message_id,
            source=source,
            destination=destination,
            esm_class=esm_class,
            data_coding=data_coding,
            short_message_hex=payload.hex(),
            text=text,
            udh_hex=udh.hex() if udh is not None else None,
            registered_delivery=registered,
        )
        if receipt is not None:
            receipt.due = time.monotonic() + faults.receipt_delay()
            if not self._scheduled or receipt.due < self._scheduled[0][0]:
                self._scheduled_event.set()
            heapq.heappush(self._scheduled, (receipt.due, next(self._tiebreak), receipt))

    def _send_receipt_now(self, conn: _Conn, receipt: _Receipt) -> bool:
        """before_response: write the receipt ahead of the submit_sm_resp, on this bind if it can
        receive, else on another receiver of the system_id with window room; False if none can."""
        candidates = [conn] if conn.can_receive else []
        candidates += [c for c in self._conns if c is not conn and c.system_id == receipt.system_id and c.can_receive]
        for target in candidates:
            if len(target.outstanding) < self._deliver_window:
                self._faults.counters["receipts_before_response"] += 1
                self._send_receipt(target, receipt)
                return True
        return False

    def _wants_receipt(self, registered_delivery: int, stat: str | None = None) -> bool:
        """Bits 0-1: 1 = receipt on any final outcome, 2 = on failure only."""
        wanted = registered_delivery & 0x03
        return wanted == 1 or (wanted == 2 and (stat or self._faults.settings.receipt_stat) != "DELIVRD")

    def _on_deliver_sm_resp(self, conn: _Conn, pdu: Command) -> None:
        receipt = conn.outstanding.pop(pdu.sequence, None)
        if receipt is None:
            log.warning("smsc-sim %s: deliver_sm_resp for unknown seq %d", conn.peer, pdu.sequence)
            return
        if pdu.status == ESME_ROK:
            self._counters["deliver_sm_acked"] += 1
        else:
            self._counters["deliver_sm_nacked"] += 1
            log.info(
                "smsc-sim %s: receipt for smsc message id %s refused with 0x%02x (not resent)",
                conn.peer,
                receipt.message_id,
                pdu.status,
            )
        if conn.system_id is not None:
            self._pump(conn.system_id)

    def _on_enquire_link(self, conn: _Conn, pdu: Command) -> None:
        self._counters["enquire_link_received"] += 1
        self._respond(conn, "enquire_link_resp", pdu.sequence)

    def _on_enquire_link_resp(self, conn: _Conn, pdu: Command) -> None:
        self._counters["enquire_link_resp_received"] += 1
        fut = conn.pings.pop(pdu.sequence, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_unbind(self, conn: _Conn, pdu: Command) -> None:
        self._counters["unbind_received"] += 1
        log.info("smsc-sim %s (system_id %s) asked to unbind, seq %d", conn.peer, conn.system_id, pdu.sequence)
        self._respond(conn, "unbind_resp", pdu.sequence)
        conn.closing = True

    def _on_unbind_resp(self, conn: _Conn, pdu: Command) -> None:
        conn.closing = True

    def _on_generic_nack(self, conn: _Conn, pdu: Command) -> None:
        log.warning("smsc-sim %s: generic_nack 0x%02x for seq %d", conn.peer, pdu.status, pdu.sequence)

    _handlers: dict[str, Any] = {
        "bind_transmitter": _on_bind,
        "bind_receiver": _on_bind,
        "bind_transceiver": _on_bind,
        "submit_sm": _on_submit_sm,
        "deliver_sm_resp": _on_deliver_sm_resp,
        "enquire_link": _on_enquire_link,
        "enquire_link_resp": _on_enquire_link_resp,
        "unbind": _on_unbind,
        "unbind_resp": _on_unbind_resp,
        "generic_nack": _on_generic_nack,
    }

    # ---- receipts --------------------------------------------------------------------------------

    async def _receipt_scheduler(self) -> None:
        """Move receipts whose delay has passed to their system_id's queue (through the reorder
        buffer in out_of_order mode) and pump them; sleep until the next is due or a submit brings
        an earlier one."""
        while True:
            now = time.monotonic()
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
            for system_id in touched:
                self._pump(system_id)
            deadlines = [self._scheduled[0][0]] if self._scheduled else []
            if self._reorder_since:
                deadlines.append(min(self._reorder_since.values()) + REORDER_MAX_WAIT_S)
            self._scheduled_event.clear()
            if not deadlines:
                await self._scheduled_event.wait()
                continue
            wait = min(deadlines) - time.monotonic()
            if wait > 0:
                # A timer that sets the event, not asyncio.timeout: no cancellation (an exception) per wake.
                timer = asyncio.get_running_loop().call_later(wait, self._scheduled_event.set)
                try:
                    await self._scheduled_event.wait()
                finally:
                    timer.cancel()

    def _hold_for_reorder(self, receipt: _Receipt, now: float, touched: set[str]) -> None:
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

    def _pump(self, system_id: str) -> None:
        """Send queued receipts of `system_id` to its receiver-capable binds while their window has room."""
        queue = self._pending.get(system_id)
        if not queue:
            return
        for conn in [c for c in self._conns if c.system_id == system_id and c.can_receive]:
            while queue and len(conn.outstanding) < self._deliver_window:
                self._send_receipt(conn, queue.popleft())
            if not queue:
                return

    def _send_receipt(self, conn: _Conn, receipt: _Receipt) -> None:
        bad = self._faults.malformed_pdu(self._seq)
        if bad is not None:
            kind, data = bad
            log.info("smsc-sim fault: malformed PDU (%s) to %s (system_id %s) ahead of the receipt for %s",
                     kind, conn.peer, conn.system_id, receipt.message_id)
            self._send_raw(conn, data)
        text = build_receipt_text(
            receipt.message_id,
            receipt.submitted_at,
            datetime.now(UTC),
            stat=receipt.stat,
            # The receipt travels as data_coding 0; keep it to characters every decoder agrees on.
            text=receipt.text[:20].encode("ascii", errors="replace").decode("ascii"),
        )
        pdu = smpp.make_pdu(
            "deliver_sm",
            client=self._seq,
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
        conn.outstanding[pdu.sequence] = receipt
        self._counters["deliver_sm_sent"] += 1
        self._send(conn, pdu)

    # ---- journal ---------------------------------------------------------------------------------

    def _journal(self, **entry: Any) -> None:
        if self._journal_file is not None:
            self._journal_buf.append(json.dumps(entry, ensure_ascii=False) + "\n")

    def _flush_journal(self) -> None:
        if self._journal_file is None or not self._journal_buf:
            return
        lines, self._journal_buf = self._journal_buf, []
        # A few hundred KB at most per flush: a blocking write is cheaper than a thread hop.
        self._journal_file.write("".join(lines))
        self._journal_file.flush()

    async def _journal_flusher(self) -> None:
        while True:
            await asyncio.sleep(JOURNAL_FLUSH_S)
            self._flush_journal()


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
