"""One SMPP bind (transceiver, transmitter or receiver) on top of smpplib's `Client`, usable from asyncio.

smpplib does the PDU encoding and the bind (`bind_transceiver` / `bind_transmitter` /
`bind_receiver`); this module adds what it lacks:

- TCP_NODELAY on its socket: with Nagle on, a window of 1 was capped near 110 submit_sm/s;
- one lock around sequence allocation + output buffer, since smpplib has none, and PDUs are made on
  the event loop (submit_sm, deliver_sm_resp) and on the reader thread (enquire_link_resp);
- batched writes instead of smpplib's `send_pdu` (one sendall per PDU): PDUs queued during one loop
  iteration leave in one sendall from the loop thread, which is the only writer;
- our own reader thread, which blocks in `read_pdu` and hands each PDU to the event loop;
- a window of outstanding submit_sm, each awaiting its submit_sm_resp through a Future keyed by
  sequence number, with a per-submit timeout;
- enquire_link when the link is idle, and a dead-link verdict when one goes unanswered;
- a clean unbind on close;
- our own framing of inbound PDUs, so a malformed PDU never kills the reader. A PDU that can be
  framed (command_length 4..64 KiB) but not parsed (a length under the 16-byte header, an unknown
  command id, broken TLVs) is skipped whole: as SMPP v3.4 (2.8, 4.3) asks, a request gets a
  generic_nack and the bind stays up; an unparsable *response* fails the submit_sm it answers with
  `MalformedResponse` (outcome unknown, since the SMSC may have accepted it). A length that cannot
  frame anything, or `MAX_MALFORMED_IN_A_ROW` malformed PDUs with no good one between them (the
  stream is probably out of step), drops the bind: the caller reconnects, and the submits in flight
  fail with `SessionClosed` (outcome unknown);
- a generic_nack answering one of our submit_sm is returned as that submit's result
  (`SubmitResult.generic_nack`), so the caller can retry the message.

Reconnecting is the caller's job: when the connection drops, `is_up` turns False and every pending
submit fails with `SessionClosed`.

The flush is a blocking `sendall` on the event loop thread. That is safe because what we write is
bounded (a window of submit_sm plus acknowledgements, far below the socket buffer), and a
send timeout (SO_SNDTIMEO) turns a peer that stopped reading into a dropped connection instead of a
frozen loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smpplib import command_codes, consts, exceptions, smpp
from smpplib.client import Client
from smpplib.command import Command

from smsc.pdu import (
    ESM_CLASS_RECEIPT,
    ESME_RBINDFAIL,
    ESME_RINVCMDID,
    ESME_RINVCMDLEN,
    ESME_ROK,
    ESME_RSYSERR,
    ReceiptFields,
    as_str,
    parse_receipt,
    receipt_from_tlvs,
)

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0
HEADER_LEN = 16
MIN_FRAME_LEN = 4  # shorter cannot even hold its own length: the stream is lost
MAX_PDU_LEN = 64 * 1024
MAX_MALFORMED_IN_A_ROW = 3
BIND_COMMANDS = {"transceiver": "bind_transceiver", "transmitter": "bind_transmitter", "receiver": "bind_receiver"}
UNBIND_WAIT_S = 2.0
READER_JOIN_S = 2.0


class SessionError(Exception):
    """Base of the errors an `SmppSession` raises."""


class ConnectFailed(SessionError):
    """TCP connect (or the bind exchange) failed at the transport level."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"connect to {host}:{port} failed: {reason}")
        self.host, self.port, self.reason = host, port, reason


class BindFailed(SessionError):
    """The SMSC answered the bind with a non-zero command status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"bind refused with status 0x{status:02x}")
        self.status = status


class SessionClosed(SessionError):
    """The session is not (or no longer) bound; a pending submit's outcome is unknown."""


class MalformedPdu(SessionError):
    """The SMSC sent bytes that are not a valid PDU. `fatal`: its length cannot be trusted, so the
    stream is out of step and the bind must go; otherwise the PDU was skipped whole."""

    def __init__(self, reason: str, *, command_id: int = 0, sequence: int = 0, fatal: bool = False) -> None:
        super().__init__(reason)
        self.command_id, self.sequence, self.fatal = command_id, sequence, fatal


class MalformedResponse(SessionError):
    """The answer to a submit_sm could not be parsed: the SMSC may or may not have accepted it."""


class SubmitTimeout(SessionError):
    """No submit_sm_resp within the timeout; the SMSC may or may not have accepted the message."""

    def __init__(self, sequence: int, timeout_s: float) -> None:
        super().__init__(f"no submit_sm_resp for sequence {sequence} within {timeout_s}s")
        self.sequence, self.timeout_s = sequence, timeout_s


@dataclass(frozen=True)
class SubmitResult:
    """The SMSC's answer to one submit_sm; `message_id` is None unless status is 0.

    `generic_nack` is True when the SMSC answered with generic_nack instead of submit_sm_resp (it
    could not take the PDU at all); `status` is then the nack's status, which may be 0.
    """

    sequence: int
    status: int
    message_id: str | None
    generic_nack: bool = False


@dataclass(frozen=True)
class DeliverSm:
    """A deliver_sm as received: a delivery receipt (`receipt` set) or an MO message."""

    sequence: int
    source: str
    destination: str
    esm_class: int
    data_coding: int
    short_message: bytes
    receipted_message_id: str | None
    message_state: int | None
    receipt: ReceiptFields | None
    message_payload: bytes | None = None  # the TLV, used by SMSCs for texts longer than short_message


def _to_deliver_sm(pdu: Command) -> DeliverSm:
    esm_class = pdu.esm_class or 0
    short_message: bytes = pdu.short_message or b""
    receipted = as_str(pdu.receipted_message_id) or None
    state: int | None = pdu.message_state
    receipt: ReceiptFields | None = None
    if esm_class & ESM_CLASS_RECEIPT or receipted:
        receipt = parse_receipt(short_message.decode("ascii", errors="replace"))
        if receipt is None and receipted:
            receipt = receipt_from_tlvs(receipted, state)
    return DeliverSm(
        sequence=pdu.sequence,
        source=as_str(pdu.source_addr) or "",
        destination=as_str(pdu.destination_addr) or "",
        esm_class=esm_class,
        data_coding=pdu.data_coding or 0,
        short_message=short_message,
        receipted_message_id=receipted,
        message_state=state,
        receipt=receipt,
        message_payload=_as_bytes(getattr(pdu, "message_payload", None)),
    )


def _as_bytes(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return value.encode("latin-1", errors="replace")


class SmppSession:
    """One bind to an SMSC (`bind`: transceiver, transmitter or receiver) with a window of
    outstanding submit_sm. A receiver bind cannot submit; a transmitter bind receives no deliver_sm.

    All public methods must be called from the event loop that called `open()`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        system_id: str,
        password: str,
        system_type: str = "",
        window: int = 10,
        enquire_link_s: float = 30.0,
        on_deliver: Callable[[DeliverSm], None],
        connect_timeout_s: float = 5.0,
        submit_timeout_s: float = 30.0,
        bind: str = "transceiver",
    ) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if bind not in BIND_COMMANDS:
            raise ValueError(f"bind must be one of {sorted(BIND_COMMANDS)}, not {bind!r}")
        self._bind = bind
        self._host, self._port = host, port
        self._system_id, self._password, self._system_type = system_id, password, system_type
        self._window = window
        self._enquire_link_s = enquire_link_s
        self._on_deliver = on_deliver
        self._connect_timeout_s = connect_timeout_s
        self._submit_timeout_s = submit_timeout_s

        self._client: Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # Guards sequence allocation and the output buffer; smpplib has no lock of its own.
        self._write_lock = threading.Lock()
        self._outbuf: list[bytes] = []
        self._flush_scheduled = False
        self._slots = asyncio.Semaphore(window)
        self._pending: dict[int, asyncio.Future[SubmitResult]] = {}
        self._up = False
        self._reader: threading.Thread | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._unbind_done: asyncio.Future[None] | None = None
        self._last_rx = time.monotonic()
        self._enquire_sent_at: float | None = None
        # PDUs from the reader thread; the loop is woken once per batch, not once per PDU.
        self._inbox: deque[Command | MalformedPdu | None] = deque()
        self._wakeup_scheduled = False
        self._malformed = 0

    def __repr__(self) -> str:
        return f"SmppSession({self._system_id}@{self._host}:{self._port}, {self._bind}, up={self._up})"

    # ---- properties ------------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        """True between a successful `open()` and the first of close / unbind / connection loss."""
        return self._up

    @property
    def in_flight(self) -> int:
        """submit_sm sent whose response has not arrived yet."""
        return len(self._pending)

    @property
    def window(self) -> int:
        return self._window

    @property
    def bind(self) -> str:
        return self._bind

    @property
    def can_submit(self) -> bool:
        return self._bind != "receiver"

    @property
    def can_receive(self) -> bool:
        return self._bind != "transmitter"

    @property
    def malformed(self) -> int:
        """Malformed PDUs received on this bind (skipped, or the one that dropped it)."""
        return self._malformed

    # ---- open / close ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and bind (as `bind` says). Raises `ConnectFailed` or `BindFailed`; the session is then closed."""
        if self._client is not None:
            raise SessionError("session already opened")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        client = Client(
            self._host,
            self._port,
            timeout=self._connect_timeout_s,
            allow_unknown_opt_params=True,
            logger_name=f"{__name__}.smpplib",
        )
        binding = self._loop.run_in_executor(None, self._connect_and_bind, client)
        try:
            await asyncio.shield(binding)
        except asyncio.CancelledError:
            # The bind goes on in its thread; close whatever socket it opens instead of leaking it.
            binding.add_done_callback(lambda f: (f.cancelled() or f.exception(), client.disconnect()))
            raise
        self._client = client
        self._up = True
        self._last_rx = time.monotonic()
        self._reader = threading.Thread(
            target=self._reader_main, args=(client,), name=f"smpp-reader-{self._system_id}", daemon=True
        )
        self._reader.start()
        self._keepalive = asyncio.create_task(self._keepalive_loop(), name=f"smpp-keepalive-{self._system_id}")
        log.info("smpp session %s:%d bound as %s (%s, window %d)", self._host, self._port, self._system_id,
                 self._bind, self._window)

    def _connect_and_bind(self, client: Client) -> None:
        """Blocking; runs in an executor thread before any other thread touches `client`."""
        try:
            client.connect()
            sock: socket.socket = client._socket
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            getattr(client, BIND_COMMANDS[self._bind])(
                system_id=self._system_id, password=self._password, system_type=self._system_type
            )
        except exceptions.PDUError as exc:
            client.disconnect()
            status = exc.args[1] if len(exc.args) > 1 else ESME_RBINDFAIL
            log.warning("smpp bind %s at %s:%d refused: 0x%02x", self._system_id, self._host, self._port, status)
            raise BindFailed(int(status)) from exc
        except (exceptions.ConnectionError, OSError) as exc:
            client.disconnect()
            raise ConnectFailed(self._host, self._port, str(exc) or type(exc).__name__) from exc
        # From here on the reader thread blocks in recv until data or shutdown(); only sends time out.
        sock.settimeout(None)
        sec = int(SEND_TIMEOUT_S)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, 0))

    async def close(self) -> None:
        """Unbind (waiting up to 2 s for unbind_resp), close the socket, stop the reader thread.

        Pending submits fail with `SessionClosed`. Idempotent.
        """
        client = self._client
        if client is None:
            return
        loop = asyncio.get_running_loop()
        if self._up:
            self._unbind_done = loop.create_future()
            try:
                self._send("unbind")
            except SessionClosed:
                pass
            else:
                await asyncio.wait({self._unbind_done}, timeout=UNBIND_WAIT_S)
        self._mark_down("closed by us")
        self._shutdown_socket(client)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, READER_JOIN_S)
            self._reader = None
        with self._write_lock:
            client.disconnect()
            self._client = None
        log.info("smpp session %s:%d (%s) closed", self._host, self._port, self._system_id)

    # ---- submit / deliver ------------------------------------------------------------------------

    async def submit(
        self,
        *,
        source: str,
        destination: str,
        short_message: bytes,
        data_coding: int,
        esm_class: int = 0,
        registered_delivery: int = 1,
        source_ton: int = 5,
        source_npi: int = 0,
        dest_ton: int = 1,
        dest_npi: int = 1,
        validity_period: str | None = None,
    ) -> SubmitResult:
        """Send one submit_sm once a window slot is free; return the SMSC's response.

        A non-zero status is returned, not raised (the caller decides about throttling and
        retries). Raises `SessionClosed` if the session is or goes down before the response, and
        `SubmitTimeout` if the response does not come in time; in both cases the SMSC may have
        accepted the message.
        """
        if not self._up:
            raise SessionClosed("session is not bound")
        if not self.can_submit:
            raise SessionError(f"a {self._bind} bind cannot send submit_sm")
        async with self._slots:
            if not self._up:
                raise SessionClosed("session went down while waiting for a window slot")
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[SubmitResult] = loop.create_future()
            seq = self._send(
                "submit_sm",
                service_type="",
                source_addr_ton=source_ton,
                source_addr_npi=source_npi,
                source_addr=source,
                dest_addr_ton=dest_ton,
                dest_addr_npi=dest_npi,
                destination_addr=destination,
                esm_class=esm_class,
                registered_delivery=registered_delivery,
                data_coding=data_coding,
                short_message=short_message,
                validity_period=validity_period,
            )
            # Registering after the send is safe: the response is handled on this loop, which
            # cannot run the reader's callback before we next yield.
            self._pending[seq] = fut
            timer = loop.call_later(self._submit_timeout_s, self._expire, seq)
            try:
                return await fut
            finally:
                timer.cancel()
                self._pending.pop(seq, None)

    def respond_deliver(self, sequence: int, status: int = ESME_ROK) -> None:
        """Acknowledge deliver_sm `sequence`; call only after the receipt/MO is persisted.

        A non-zero status asks the SMSC to deliver it again later. If the session is down the
        acknowledgement cannot be sent; the SMSC will redeliver on a later bind.
        """
        try:
            self._send("deliver_sm_resp", sequence=sequence, status=status)
        except SessionClosed:
            log.info("smpp %s: deliver_sm_resp seq %d not sent, session down", self._system_id, sequence)

    # ---- sending ---------------------------------------------------------------------------------

    def _send(self, name: str, *, sequence: int | None = None, **fields: Any) -> int:
        """Build one PDU and queue its bytes for the next flush; returns its sequence number.

        Requests take the next sequence from smpplib's generator inside the lock, and bytes join the
        output buffer in the same critical section, so sequence numbers go out in order. Raises
        `SessionClosed` if the session is not bound (or smpplib's bind state forbids `name`, e.g. a
        deliver_sm_resp after our unbind was answered). A failed write surfaces later, as the
        session going down.
        """
        with self._write_lock:
            client = self._client
            if client is None or not self._up:
                raise SessionClosed(f"cannot send {name}: session is not bound")
            if client.state not in consts.COMMAND_STATES[name]:
                raise SessionClosed(f"cannot send {name} in bind state {client.state}")
            pdu = smpp.make_pdu(name, client=client, **fields)
            if sequence is not None:
                pdu.sequence = sequence
            self._outbuf.append(pdu.generate())
            wake = not self._flush_scheduled
            self._flush_scheduled = True
        if wake:
            self._schedule_flush()
        return int(pdu.sequence)

    def _schedule_flush(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(self._flush)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: nothing left to send to
                loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        """Write every queued PDU in one sendall. Loop thread only, so writes never interleave.

        Batching matters: one syscall per PDU, each releasing and re-taking the GIL against the
        reader thread, capped a window of 50 near 2,500 submit_sm/s.
        """
        with self._write_lock:
            self._flush_scheduled = False
            data = b"".join(self._outbuf)
            self._outbuf.clear()
            client = self._client
        sock = client._socket if client is not None else None
        if not data or sock is None:
            return
        try:
            sock.sendall(data)
        except OSError as exc:
            # After our unbind the SMSC may close first; losing late acknowledgements then is normal.
            level = logging.INFO if self._unbind_done is not None else logging.WARNING
            log.log(level, "smpp %s: write of %d bytes failed: %r", self._system_id, len(data), exc)
            self._abort(f"write failed: {exc!r}")

    def _expire(self, seq: int) -> None:
        fut = self._pending.pop(seq, None)
        if fut is not None and not fut.done():
            log.warning("smpp %s: no submit_sm_resp for seq %d in %ss", self._system_id, seq, self._submit_timeout_s)
            fut.set_exception(SubmitTimeout(seq, self._submit_timeout_s))

    # ---- reader thread ---------------------------------------------------------------------------

    def _reader_main(self, client: Client) -> None:
        """Blocks reading PDUs; every PDU goes to the loop, enquire_link is also answered here at once.

        A malformed PDU never kills this thread: one that cannot be framed, or a run of them, ends the
        connection (the stream is out of step; the caller re-binds); one framed but unparsable is
        handed to the loop (`_on_malformed`) and reading goes on.
        """
        reason = "connection closed"
        in_a_row = 0
        try:
            while True:
                try:
                    pdu = self._read_pdu(client)
                except MalformedPdu as exc:
                    self._malformed += 1
                    in_a_row += 1
                    if exc.fatal:
                        raise
                    if in_a_row >= MAX_MALFORMED_IN_A_ROW:
                        raise MalformedPdu(f"{in_a_row} malformed PDUs in a row, the last: {exc}", fatal=True) from exc
                    log.warning("smpp %s (%s): %s; skipped", self._system_id, self._bind, exc)
                    self._post(exc)
                    continue
                in_a_row = 0
                if pdu.command == "enquire_link":
                    self._answer_enquire_link(pdu.sequence)
                self._post(pdu)
        except MalformedPdu as exc:
            reason = f"malformed PDU: {exc}"
            log.warning("smpp %s (%s): %s; dropping the bind", self._system_id, self._bind, exc)
            self._shutdown_socket(client)
        except (exceptions.ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc!r}"
        except Exception:
            log.exception("smpp %s: reader thread failed", self._system_id)
            reason = "reader thread failed"
        finally:
            log.debug("smpp %s: reader thread exits (%s)", self._system_id, reason)
            self._post(None)

    @staticmethod
    def _read_pdu(client: Client) -> Command:
        """One PDU, framed by us (smpplib's `read_pdu` trusts the length field blindly).

        Raises `MalformedPdu` (fatal) for a length outside 4..64 KiB, `MalformedPdu` (not fatal, the
        PDU consumed whole) for one shorter than its header or that smpplib cannot parse, and
        smpplib's `ConnectionError` when the peer closed.
        """
        raw_len = client._recv_exact(4)
        (length,) = struct.unpack(">L", raw_len)
        if not MIN_FRAME_LEN <= length <= MAX_PDU_LEN:
            raise MalformedPdu(f"command_length {length} out of {MIN_FRAME_LEN}..{MAX_PDU_LEN}", fatal=True)
        raw = raw_len + (client._recv_exact(length - 4) if length > 4 else b"")
        command_id, seq = (struct.unpack_from(">L", raw, 4)[0] if length >= 8 else 0), (
            struct.unpack_from(">L", raw, 12)[0] if length >= HEADER_LEN else 0)
        if length < HEADER_LEN:
            raise MalformedPdu(f"command_length {length} shorter than the header", command_id=command_id)
        try:
            pdu = smpp.parse_pdu(raw, client=client, allow_unknown_opt_params=True)
        except (exceptions.UnknownCommandError, exceptions.PDUError, struct.error, ValueError, IndexError,
                UnicodeError, TypeError, KeyError, AttributeError) as exc:
            raise MalformedPdu(f"unparsable PDU 0x{command_id:08x} seq {seq} ({length} bytes): {exc!r}",
                               command_id=command_id, sequence=seq) from exc
        if not pdu.is_error() and pdu.command in consts.STATE_SETTERS:
            client.state = consts.STATE_SETTERS[pdu.command]
        return pdu

    def _answer_enquire_link(self, sequence: int) -> None:
        try:
            self._send("enquire_link_resp", sequence=sequence)
        except SessionClosed:
            log.debug("smpp %s: enquire_link_resp seq %d not sent, session down", self._system_id, sequence)

    def _post(self, pdu: Command | MalformedPdu | None) -> None:
        """Queue a PDU (None = connection lost) for the loop; wake it only if no wake-up is pending."""
        self._inbox.append(pdu)
        if self._wakeup_scheduled or self._loop is None:
            return
        self._wakeup_scheduled = True
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody left to tell
            self._loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        # Clear the flag before draining: a PDU appended after this line schedules another drain,
        # one appended before it is drained here, so none is stranded.
        self._wakeup_scheduled = False
        while self._inbox:
            pdu = self._inbox.popleft()
            if pdu is None:
                unbinding = self._unbind_done is not None
                self._mark_down("connection closed after unbind" if unbinding else "connection lost")
                continue
            if isinstance(pdu, MalformedPdu):
                self._on_malformed(pdu)
                continue
            try:
                self._on_pdu(pdu)
            except Exception:
                log.exception("smpp %s: handling %s seq %s failed", self._system_id, pdu.command, pdu.sequence)

    # ---- inbound PDUs (event loop) ---------------------------------------------------------------

    def _on_pdu(self, pdu: Command) -> None:
        self._last_rx = time.monotonic()
        self._enquire_sent_at = None  # any PDU proves the link is alive
        command = pdu.command
        if command in ("submit_sm_resp", "generic_nack"):
            self._on_response(pdu)
        elif command == "deliver_sm":
            self._on_deliver_sm(pdu)
        elif command in ("enquire_link", "enquire_link_resp"):
            pass  # enquire_link was answered on the reader thread
        elif command == "unbind":
            log.info("smpp %s: SMSC sent unbind seq %d", self._system_id, pdu.sequence)
            with contextlib.suppress(SessionClosed):
                self._send("unbind_resp", sequence=pdu.sequence)
            self._abort("unbound by SMSC")
        elif command == "unbind_resp":
            if self._unbind_done is not None and not self._unbind_done.done():
                self._unbind_done.set_result(None)
        elif pdu.is_request():
            log.info("smpp %s: unsupported %s seq %d, generic_nack", self._system_id, command, pdu.sequence)
            with contextlib.suppress(SessionClosed):
                self._send("generic_nack", sequence=pdu.sequence, status=ESME_RINVCMDID)
        else:
            log.info("smpp %s: unexpected %s seq %d ignored", self._system_id, command, pdu.sequence)

    def _on_malformed(self, bad: MalformedPdu) -> None:
        """A skipped PDU: nack a request; fail the submit a response was meant for (outcome unknown)."""
        if bad.command_id & 0x80000000:
            fut = self._pending.pop(bad.sequence, None)
            if fut is not None and not fut.done():
                fut.set_exception(MalformedResponse(f"unparsable response to seq {bad.sequence}: {bad}"))
            return
        status = ESME_RINVCMDID if bad.command_id not in command_codes.commands.values() else ESME_RINVCMDLEN
        with contextlib.suppress(SessionClosed):
            self._send("generic_nack", sequence=bad.sequence, status=status)

    def _on_response(self, pdu: Command) -> None:
        fut = self._pending.pop(pdu.sequence, None)
        if fut is None:
            log.warning(
                "smpp %s: %s status 0x%02x for unknown seq %d (late or unsolicited)",
                self._system_id,
                pdu.command,
                pdu.status,
                pdu.sequence,
            )
            return
        nack = pdu.command == "generic_nack"
        if nack:
            log.warning("smpp %s: generic_nack status 0x%02x for submit_sm seq %d", self._system_id, pdu.status,
                        pdu.sequence)
        message_id = as_str(getattr(pdu, "message_id", None)) if pdu.status == ESME_ROK and not nack else None
        if not fut.done():
            fut.set_result(SubmitResult(sequence=pdu.sequence, status=pdu.status, message_id=message_id or None,
                                        generic_nack=nack))

    def _on_deliver_sm(self, pdu: Command) -> None:
        deliver = _to_deliver_sm(pdu)
        try:
            self._on_deliver(deliver)
        except Exception:
            # The consumer could not take it; a non-zero status makes the SMSC deliver it again.
            log.exception(
                "smpp %s: on_deliver failed for seq %d (smsc message id %s)",
                self._system_id,
                deliver.sequence,
                deliver.receipted_message_id,
            )
            self.respond_deliver(deliver.sequence, ESME_RSYSERR)

    # ---- keep-alive and teardown -----------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        """enquire_link after `enquire_link_s` without inbound PDUs; an unanswered one for as long
        again means the link is dead, and the session is aborted."""
        tick = max(self._enquire_link_s / 4, 0.05)
        while self._up:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if self._enquire_sent_at is not None:
                if now - self._enquire_sent_at > self._enquire_link_s:
                    log.warning("smpp %s: enquire_link unanswered, link dead", self._system_id)
                    self._abort("enquire_link unanswered")
                    return
            elif now - self._last_rx >= self._enquire_link_s:
                with contextlib.suppress(SessionClosed):
                    self._send("enquire_link")
                    self._enquire_sent_at = now

    def _abort(self, reason: str) -> None:
        """Mark down and shut the socket; the reader thread then wakes and exits."""
        self._mark_down(reason)
        client = self._client
        if client is not None:
            self._shutdown_socket(client)

    @staticmethod
    def _shutdown_socket(client: Client) -> None:
        sock = client._socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _mark_down(self, reason: str) -> None:
        """Loop thread only. Fails pending submits with SessionClosed; idempotent."""
        was_up, self._up = self._up, False
        if was_up:
            log.info("smpp session %s:%d (%s) down: %s", self._host, self._port, self._system_id, reason)
        pending, self._pending = self._pending, {}
        for seq, fut in pending.items():
            if not fut.done():
                fut.set_exception(SessionClosed(f"{reason} (seq {seq})"))
        if self._unbind_done is not None and not self._unbind_done.done():
            self._unbind_done.set_result(None)
        keepalive, self._keepalive = self._keepalive, None
        if keepalive is not None and keepalive is not asyncio.current_task():
            keepalive.cancel()
