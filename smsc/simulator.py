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

Throughput: responses are written without awaiting drain per PDU; the reader drains only when the
transport buffer grows large, so one core serves several thousand submit_sm/s.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    ) -> None:
        if host != "127.0.0.1":
            raise ValueError("the simulator listens on 127.0.0.1 only")
        if receipt_stat not in MESSAGE_STATES:
            raise ValueError(f"unknown receipt stat {receipt_stat!r}")
        self._host = host
        self._requested_port = port
        self._port: int | None = None
        self._receipt_delay_s = receipt_delay_s
        self._journal_path = Path(journal_path) if journal_path is not None else None
        self._receipt_stat = receipt_stat
        self._credentials = dict(credentials) if credentials is not None else None
        self._deliver_window = deliver_window

        self._seq = SequenceCounter()
        # The random prefix keeps ids unique across restarts; the counter keeps them unique within one.
        self._id_prefix = secrets.token_hex(4)
        self._id_counter = 0

        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._scheduled: deque[_Receipt] = deque()
        self._scheduled_event = asyncio.Event()
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
        log.info("smsc-sim started on %s:%d (journal %s)", self._host, self._port, self._journal_path)

    async def stop(self) -> None:
        """Stop accepting, send unbind to every bound session, wait briefly, close all, flush the journal."""
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
        log.info("smsc-sim on port %s stopped: %s", self._port, self.stats())

    def stats(self) -> dict[str, int]:
        """Counters since start, plus current binds and receipts not yet acknowledged."""
        return {
            **self._counters,
            "binds_active": sum(1 for c in self._conns if c.mode is not None),
            "receipts_scheduled": len(self._scheduled),
            "receipts_pending": sum(len(q) for q in self._pending.values()),
            "receipts_outstanding": sum(len(c.outstanding) for c in self._conns),
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
                self._dispatch(conn, raw)
            if conn.writer.transport.get_write_buffer_size() > DRAIN_ABOVE:
                await conn.writer.drain()
        if conn.closing:
            self._flush(conn)
            with contextlib.suppress(ConnectionError, OSError):
                await conn.writer.drain()

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
        if conn.writer.is_closing():
            return
        if not conn.out:
            asyncio.get_running_loop().call_soon(self._flush, conn)
        conn.out.append(pdu.generate())

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
        self._id_counter += 1
        message_id = f"{self._id_prefix}{self._id_counter:010x}"
        self._respond(conn, "submit_sm_resp", pdu.sequence, message_id=message_id)
        now = datetime.now(UTC)
        source, destination = as_str(pdu.source_addr) or "", as_str(pdu.destination_addr) or ""
        payload: bytes = pdu.short_message or b""
        esm_class, data_coding = pdu.esm_class or 0, pdu.data_coding or 0
        udh, body = split_udh(payload, esm_class)
        text = decode_short_message(body, data_coding)
        registered = pdu.registered_delivery or 0
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
        if self._wants_receipt(registered):
            self._scheduled.append(
                _Receipt(
                    due=time.monotonic() + self._receipt_delay_s,
                    system_id=conn.system_id,
                    message_id=message_id,
                    source=source,
                    destination=destination,
                    submitted_at=now,
                    text=text,
                )
            )
            self._scheduled_event.set()

    def _wants_receipt(self, registered_delivery: int) -> bool:
        """Bits 0-1: 1 = receipt on any final outcome, 2 = on failure only."""
        wanted = registered_delivery & 0x03
        return wanted == 1 or (wanted == 2 and self._receipt_stat != "DELIVRD")

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
        """Move receipts whose delay has passed to their system_id's queue; the delay is constant, so
        the scheduled deque is already in due order and a single sleeper suffices."""
        while True:
            if not self._scheduled:
                self._scheduled_event.clear()
                await self._scheduled_event.wait()
                continue
            wait = self._scheduled[0].due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            now = time.monotonic()
            touched: set[str] = set()
            while self._scheduled and self._scheduled[0].due <= now:
                receipt = self._scheduled.popleft()
                self._pending.setdefault(receipt.system_id, deque()).append(receipt)
                touched.add(receipt.system_id)
            for system_id in touched:
                self._pump(system_id)

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
        text = build_receipt_text(
            receipt.message_id,
            receipt.submitted_at,
            datetime.now(UTC),
            stat=self._receipt_stat,
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
            message_state=MESSAGE_STATES[self._receipt_stat],
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


async def run_simulator(args: Any) -> None:
    """Run a simulator configured from a settings-like object until cancelled.

    Reads attributes `port` (default 2775), `receipt_delay_s` (0.2), `journal_path` (None) and
    `receipt_stat` ("DELIVRD"); missing ones take the defaults. Always listens on 127.0.0.1.
    """
    sim = Simulator(
        port=int(getattr(args, "port", 2775)),
        receipt_delay_s=float(getattr(args, "receipt_delay_s", 0.2)),
        journal_path=getattr(args, "journal_path", None),
        receipt_stat=str(getattr(args, "receipt_stat", "DELIVRD")),
    )
    await sim.start()
    log.info("smsc-sim listening on 127.0.0.1:%d", sim.port)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()
