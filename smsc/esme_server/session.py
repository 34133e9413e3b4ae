"""One ESME connection: framing, the bind state, the window, and the answer to each PDU.

Every PDU is answered (or, for a response, matched); a PDU that cannot be decoded gets a
generic_nack and the session goes on. Only a broken length (the stream cannot be re-synchronised)
closes the connection, and only this one. The work that waits on the store (bind, submit, query,
cancel) runs in its own task so the read loop keeps reading; the window caps those in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import TYPE_CHECKING, Any

from smpplib import command_codes, exceptions, smpp

from core import metrics
from smsc.esme_server import wire
from smsc.pdu import ESME_RINVBNDSTS, ESME_RINVCMDID, ESME_RINVCMDLEN, ESME_RMSGQFUL, SequenceCounter
from smsc.pdu_codec import decode_deliver_sm

if TYPE_CHECKING:
    from core.store.smpp_accounts import SmppAccount
    from smsc.esme_server.server import EsmeServer

log = logging.getLogger(__name__)

READ_CHUNK = 64 * 1024
_PARSE_ERRORS = (struct.error, IndexError, ValueError, UnicodeError, TypeError, exceptions.PDUError)


class EsmeSession:
    """What the server and the receipt sender know of one connection."""

    def __init__(self, server: EsmeServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.ip, self.peer = str(peer[0]), f"{peer[0]}:{peer[1]}"
        self.account: SmppAccount | None = None
        self.mode: str | None = None  # "tx" | "rx" | "trx" once bound
        self.binding = False
        self.bind_id: str | None = None  # its lease in the store (core/store/esme_binds.py) while bound
        self.closing = False
        self.outstanding = 0  # requests received and not yet answered (the window)
        self.sequence = SequenceCounter()
        self.pending: dict[int, asyncio.Future[int]] = {}  # our deliver_sm sequence -> its resp status
        self._out: list[bytes] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def can_receive(self) -> bool:
        return self.mode in ("rx", "trx") and not self.closing

    @property
    def can_transmit(self) -> bool:
        return self.mode in ("tx", "trx") and not self.closing

    # ---- writing ---------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue bytes; what is queued in one loop iteration leaves in one write."""
        if self.writer.is_closing():
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        data = b"".join(self._out)
        self._out.clear()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def answer(self, data: bytes) -> None:
        """Send the response of a request counted in the window."""
        self.outstanding -= 1
        self.send(data)

    def nack(self, sequence: int, status: int) -> None:
        self.send(wire.header_only(wire.GENERIC_NACK, sequence, status))

    def deliver(self, fields: dict[str, Any]) -> asyncio.Future[int]:
        """Send a deliver_sm; the future gets the status of its deliver_sm_resp (or generic_nack)."""
        seq = self.sequence.next_sequence()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        fut.add_done_callback(lambda _: self.pending.pop(seq, None))
        self.send(wire.request("deliver_sm", seq, **fields))
        return fut

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- reading ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and answer PDUs until the ESME unbinds or goes away."""
        buf = bytearray()
        try:
            while not self.closing:
                chunk = await self.reader.read(READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                self._handle_complete(buf)
        except (ConnectionError, OSError) as e:
            log.info("esme-server %s (system_id %s): connection lost: %s", self.peer, self.system_id, e)
        finally:
            await self.close()

    def _handle_complete(self, buf: bytearray) -> None:
        while len(buf) >= 4 and not self.closing:
            (length,) = struct.unpack_from(">L", buf)
            if length < wire.HEADER_LEN or length > wire.MAX_PDU_LEN:
                seq = struct.unpack_from(">L", buf, 12)[0] if len(buf) >= 16 else 0
                log.warning("esme-server %s: PDU length %d; closing this connection", self.peer, length)
                self.nack(seq, ESME_RINVCMDLEN)
                self.closing = True
                return
            if len(buf) < length:
                return
            raw = bytes(buf[:length])
            del buf[:length]
            self._dispatch(raw)

    def _dispatch(self, raw: bytes) -> None:
        _, command_id, status, seq = wire.HEADER.unpack_from(raw)
        if command_id & wire.RESPONSE_BIT:
            self._on_response(command_id, status, seq)
            return
        if command_id == wire.CANCEL_SM:
            self._on_cancel(raw, seq)
            return
        try:
            name = command_codes.get_command_name(command_id)
            if command_id == wire.SUBMIT_SM:
                # smpplib reads a truncated body leniently (missing fields come out empty); the strict
                # walker of deliver_sm (same body layout as submit_sm) refuses one that overruns.
                decode_deliver_sm(raw, seq)
            pdu = smpp.parse_pdu(raw, client=self.sequence, allow_unknown_opt_params=True)
        except exceptions.UnknownCommandError:
            log.info("esme-server %s: unknown command 0x%08x seq %d", self.peer, command_id, seq)
            self.nack(seq, ESME_RINVCMDID)
            return
        except _PARSE_ERRORS as e:
            log.info("esme-server %s: malformed PDU 0x%08x seq %d: %s", self.peer, command_id, seq, e)
            self.nack(seq, ESME_RINVCMDLEN)
            return
        metrics.ESME_PDUS.labels(command=name).inc()
        self._on_request(command_id, name, pdu)

    def _on_response(self, command_id: int, status: int, seq: int) -> None:
        if command_id in (wire.DELIVER_SM | wire.RESPONSE_BIT, wire.GENERIC_NACK):
            fut = self.pending.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result(status)

    def _on_request(self, command_id: int, name: str, pdu: Any) -> None:
        seq = pdu.sequence
        if command_id in wire.BIND_MODES:
            self.spawn(self.server.bind(self, pdu, wire.BIND_MODES[command_id]))
        elif command_id == wire.ENQUIRE_LINK:
            self.send(wire.response("enquire_link_resp", seq))
        elif command_id == wire.UNBIND:
            self.send(wire.response("unbind_resp", seq))
            self.closing = True
        elif command_id in (wire.SUBMIT_SM, wire.QUERY_SM):
            if not self._admit(name, seq):
                return
            handler = self.server.submit if command_id == wire.SUBMIT_SM else self.server.query
            self.spawn(handler(self, pdu))
        else:
            log.info("esme-server %s: unsupported %s seq %d", self.peer, name, seq)
            self.nack(seq, ESME_RINVCMDID)

    def _admit(self, name: str, seq: int) -> bool:
        """Whether a request may go on: bound to transmit and within the window (counted if so)."""
        if not self.can_transmit:
            self.send(wire.response(f"{name}_resp", seq, ESME_RINVBNDSTS))
            return False
        assert self.account is not None
        if self.outstanding >= self.account.window:
            self.send(wire.response(f"{name}_resp", seq, ESME_RMSGQFUL))
            return False
        self.outstanding += 1
        return True

    def _on_cancel(self, raw: bytes, seq: int) -> None:
        try:
            request = wire.decode_cancel_sm(raw)
        except ValueError as e:
            log.info("esme-server %s: malformed cancel_sm seq %d: %s", self.peer, seq, e)
            self.nack(seq, ESME_RINVCMDLEN)
            return
        metrics.ESME_PDUS.labels(command="cancel_sm").inc()
        if not self.can_transmit:
            self.send(wire.header_only(wire.CANCEL_SM_RESP, seq, ESME_RINVBNDSTS))
            return
        self.outstanding += 1
        self.spawn(self.server.cancel(self, request, seq))

    # ---- closing ---------------------------------------------------------------------------------

    @property
    def system_id(self) -> str | None:
        return self.account.system_id if self.account else None

    async def close(self) -> None:
        """Forget the bind; deliver_sm still unanswered are failed (the receipt sender resends them)."""
        self.closing = True
        await self.server.unbound(self)
        for fut in self.pending.values():
            if not fut.done():
                fut.cancel()
        self.pending.clear()
        self._flush()
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
        # Submits in flight are not cancelled: their commit goes on (an ESME that left before its
        # submit_sm_resp may submit again: SMPP has no idempotency key), their answer goes nowhere.
