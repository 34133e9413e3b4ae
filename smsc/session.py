"""One SMPP bind (transceiver, transmitter or receiver), usable from asyncio: the bind, the window of
outstanding submit_sm, keep-alive and teardown. The bytes on the wire are smsc/link.py's job.

smpplib does the bind (`bind_transceiver` / `bind_transmitter` / `bind_receiver`), unbind and
enquire_link; submit_sm, deliver_sm_resp and what comes back per message are encoded by
smsc/pdu_codec.py. This module adds:

- TCP_NODELAY on the socket: with Nagle on, a window of 1 was capped near 110 submit_sm/s;
- a window of outstanding submit_sm: each awaits its submit_sm_resp through a Future keyed by
  sequence number; the per-submit timeout is checked by one sweep per session, not a timer each;
- enquire_link when the link is idle, and a dead-link verdict when one goes unanswered;
- a clean unbind on close;
- malformed PDUs never kill the session (SMPP v3.4, 2.8 and 4.3): a request gets a generic_nack and
  the bind stays up; an unparsable *response* fails the submit_sm it answers with
  `MalformedResponse` (outcome unknown, since the SMSC may have accepted it). A stream out of step
  drops the bind (smsc/link.py): the caller reconnects, and the submits in flight fail with
  `SessionClosed` (outcome unknown);
- a generic_nack answering one of our submit_sm is returned as that submit's result
  (`SubmitResult.generic_nack`), so the caller can retry the message.

Reconnecting is the caller's job: when the connection drops, `is_up` turns False and every pending
submit fails with `SessionClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

from smpplib import command_codes, exceptions
from smpplib.client import Client
from smpplib.command import Command

from smsc import pdu_codec as codec
from smsc.link import Inbound, SmppLink
from smsc.pdu import ESME_RBINDFAIL, ESME_RINVCMDID, ESME_RINVCMDLEN, ESME_ROK, ESME_RSYSERR
from smsc.pdu_codec import DeliverSm
from smsc.session_errors import (
    BindFailed,
    ConnectFailed,
    MalformedPdu,
    MalformedResponse,
    SessionClosed,
    SessionError,
    SubmitResult,
    SubmitTimeout,
)

log = logging.getLogger(__name__)

__all__ = ["BindFailed", "ConnectFailed", "DeliverSm", "MalformedPdu", "MalformedResponse", "SessionClosed",
           "SessionError", "SmppSession", "SubmitResult", "SubmitTimeout"]

SEND_TIMEOUT_S = 10.0
BIND_COMMANDS = {"transceiver": "bind_transceiver", "transmitter": "bind_transmitter", "receiver": "bind_receiver"}
UNBIND_WAIT_S = 2.0
READER_JOIN_S = 2.0
SWEEP_MAX_S = 1.0  # how late a submit timeout may fire at most


class SmppSession:
    """One bind to an SMSC (`bind`: transceiver, transmitter or receiver) with a window of
    outstanding submit_sm. A receiver bind cannot submit; a transmitter bind receives no deliver_sm.

    All public methods must be called from the event loop that called `open()`.
    """

    def __init__(self, host: str, port: int, *, system_id: str, password: str, system_type: str = "",
                 window: int = 10, enquire_link_s: float = 30.0, on_deliver: Callable[[DeliverSm], None],
                 connect_timeout_s: float = 5.0, submit_timeout_s: float = 30.0, bind: str = "transceiver") -> None:
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
        self._link: SmppLink | None = None
        self._opened = False
        self._slots = asyncio.Semaphore(window)
        self._pending: dict[int, asyncio.Future[SubmitResult]] = {}
        self._deadlines: deque[tuple[float, int]] = deque()  # (monotonic deadline, seq), in send order
        self._keepalive: asyncio.Task[None] | None = None
        self._unbind_done: asyncio.Future[None] | None = None
        self._last_rx = time.monotonic()
        self._enquire_sent_at: float | None = None

    def __repr__(self) -> str:
        return f"SmppSession({self._system_id}@{self._host}:{self._port}, {self._bind}, up={self.is_up})"

    # ---- properties ------------------------------------------------------------------------------

    @property
    def is_up(self) -> bool:
        """True between a successful `open()` and the first of close / unbind / connection loss."""
        return self._link is not None and self._link.up

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
        return self._link.malformed if self._link is not None else 0

    # ---- open / close ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and bind (as `bind` says). Raises `ConnectFailed` or `BindFailed`; the session is then closed."""
        if self._opened:
            raise SessionError("session already opened")
        self._opened = True
        loop = asyncio.get_running_loop()
        client = Client(self._host, self._port, timeout=self._connect_timeout_s, allow_unknown_opt_params=True,
                        logger_name=f"{__name__}.smpplib")
        binding = loop.run_in_executor(None, self._connect_and_bind, client)
        try:
            await asyncio.shield(binding)
        except asyncio.CancelledError:
            # The bind goes on in its thread; close whatever socket it opens instead of leaking it.
            binding.add_done_callback(lambda f: (f.cancelled() or f.exception(), client.disconnect()))
            raise
        self._link = SmppLink(client, loop, f"{self._system_id} ({self._bind})", self._on_batch, self._abort)
        self._last_rx = time.monotonic()
        self._link.start()
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
                system_id=self._system_id, password=self._password, system_type=self._system_type)
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
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(SEND_TIMEOUT_S), 0))

    async def close(self) -> None:
        """Unbind (waiting up to 2 s for unbind_resp), close the socket, stop the reader thread.

        Pending submits fail with `SessionClosed`. Idempotent.
        """
        link = self._link
        if link is None or link.client is None:
            return
        if link.up:
            self._unbind_done = asyncio.get_running_loop().create_future()
            link.quiet = True
            try:
                link.send("unbind")
            except SessionClosed:
                pass
            else:
                await asyncio.wait({self._unbind_done}, timeout=UNBIND_WAIT_S)
        self._mark_down("closed by us")
        await link.stop(READER_JOIN_S)
        log.info("smpp session %s:%d (%s) closed", self._host, self._port, self._system_id)

    # ---- submit / deliver ------------------------------------------------------------------------

    async def submit(self, *, source: str, destination: str, short_message: bytes, data_coding: int,
                     esm_class: int = 0, registered_delivery: int = 1, source_ton: int = 5, source_npi: int = 0,
                     dest_ton: int = 1, dest_npi: int = 1, validity_period: str | None = None) -> SubmitResult:
        """Send one submit_sm once a window slot is free; return the SMSC's response.

        A non-zero status is returned, not raised (the caller decides about throttling and
        retries). Raises `SessionClosed` if the session is or goes down before the response, and
        `SubmitTimeout` if the response does not come in time; in both cases the SMSC may have
        accepted the message.
        """
        if not self.is_up:
            raise SessionClosed("session is not bound")
        if not self.can_submit:
            raise SessionError(f"a {self._bind} bind cannot send submit_sm")
        async with self._slots:
            link = self._link
            if link is None or not link.up:
                raise SessionClosed("session went down while waiting for a window slot")
            fut: asyncio.Future[SubmitResult] = asyncio.get_running_loop().create_future()

            def encode(seq: int) -> bytes:
                return codec.submit_sm(seq, source=source, destination=destination, short_message=short_message,
                                       data_coding=data_coding, esm_class=esm_class,
                                       registered_delivery=registered_delivery, source_ton=source_ton,
                                       source_npi=source_npi, dest_ton=dest_ton, dest_npi=dest_npi,
                                       validity_period=validity_period)

            seq = link.send("submit_sm", encode=encode)
            # Registering after the send is safe: the response is handled on this loop, which
            # cannot run the reader's callback before we next yield.
            self._pending[seq] = fut
            self._deadlines.append((time.monotonic() + self._submit_timeout_s, seq))
            try:
                return await fut
            finally:
                self._pending.pop(seq, None)

    def respond_deliver(self, sequence: int, status: int = ESME_ROK) -> None:
        """Acknowledge deliver_sm `sequence`; call only after the receipt/MO is persisted.

        A non-zero status asks the SMSC to deliver it again later. If the session is down the
        acknowledgement cannot be sent; the SMSC will redeliver on a later bind.
        """
        try:
            self._send_fast("deliver_sm_resp", sequence, codec.deliver_sm_resp(sequence, status))
        except SessionClosed:
            log.info("smpp %s: deliver_sm_resp seq %d not sent, session down", self._system_id, sequence)

    def _send_fast(self, name: str, sequence: int, data: bytes) -> None:
        link = self._link
        if link is None:
            raise SessionClosed(f"cannot send {name}: session is not bound")
        link.send(name, sequence=sequence, encode=lambda _: data)

    def _sweep_timeouts(self) -> None:
        """Fail the submits whose response is overdue (deadlines are in send order)."""
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, seq = deadlines.popleft()
            fut = self._pending.pop(seq, None)
            if fut is not None and not fut.done():
                log.warning("smpp %s: no submit_sm_resp for seq %d in %ss", self._system_id, seq,
                            self._submit_timeout_s)
                fut.set_exception(SubmitTimeout(seq, self._submit_timeout_s))
        while deadlines and deadlines[0][1] not in self._pending:
            deadlines.popleft()  # answered long ago: keep the queue short

    # ---- inbound PDUs (event loop) ---------------------------------------------------------------

    def _on_batch(self, batch: list[Inbound]) -> None:
        """What one read of the socket brought, in order."""
        if batch[-1] is not None or len(batch) > 1:
            self._last_rx = time.monotonic()
            self._enquire_sent_at = None  # any PDU proves the link is alive
        for item in batch:
            if item is None:
                unbinding = self._unbind_done is not None
                self._mark_down("connection closed after unbind" if unbinding else "connection lost")
            elif isinstance(item, MalformedPdu):
                self._on_malformed(item)
            elif isinstance(item, codec.Header):
                if item.command_id in (codec.SUBMIT_SM_RESP, codec.GENERIC_NACK):
                    self._on_response(item)
                # enquire_link was answered on the reader thread; enquire_link_resp only proves life
            elif isinstance(item, DeliverSm):
                self._on_deliver_sm(item)
            else:
                try:
                    self._on_other(item)
                except Exception:
                    log.exception("smpp %s: handling %s seq %s failed", self._system_id, item.command, item.sequence)

    def _on_other(self, pdu: Command) -> None:
        """The rare PDUs smpplib parsed: unbind, unbind_resp, an unsupported request."""
        command = pdu.command
        if command == "unbind":
            log.info("smpp %s: SMSC sent unbind seq %d", self._system_id, pdu.sequence)
            with contextlib.suppress(SessionClosed):
                assert self._link is not None
                self._link.send("unbind_resp", sequence=pdu.sequence)
            self._abort("unbound by SMSC")
        elif command == "unbind_resp":
            if self._unbind_done is not None and not self._unbind_done.done():
                self._unbind_done.set_result(None)
        elif pdu.is_request():
            log.info("smpp %s: unsupported %s seq %d, generic_nack", self._system_id, command, pdu.sequence)
            self._nack(pdu.sequence, ESME_RINVCMDID)
        else:
            log.info("smpp %s: unexpected %s seq %d ignored", self._system_id, command, pdu.sequence)

    def _nack(self, sequence: int, status: int) -> None:
        with contextlib.suppress(SessionClosed):
            self._send_fast("generic_nack", sequence, codec.header_only(codec.GENERIC_NACK, sequence, status))

    def _on_malformed(self, bad: MalformedPdu) -> None:
        """A skipped PDU: nack a request; fail the submit a response was meant for (outcome unknown)."""
        if bad.command_id & 0x80000000:
            fut = self._pending.pop(bad.sequence, None)
            if fut is not None and not fut.done():
                fut.set_exception(MalformedResponse(f"unparsable response to seq {bad.sequence}: {bad}"))
            return
        self._nack(bad.sequence, ESME_RINVCMDID if bad.command_id not in command_codes.commands.values()
                   else ESME_RINVCMDLEN)

    def _on_response(self, pdu: codec.Header) -> None:
        fut = self._pending.pop(pdu.sequence, None)
        if fut is None:
            log.warning("smpp %s: %s status 0x%02x for unknown seq %d (late or unsolicited)", self._system_id,
                        pdu.command, pdu.status, pdu.sequence)
            return
        nack = pdu.command_id == codec.GENERIC_NACK
        if nack:
            log.warning("smpp %s: generic_nack status 0x%02x for submit_sm seq %d", self._system_id, pdu.status,
                        pdu.sequence)
        message_id = pdu.message_id if pdu.status == ESME_ROK and not nack else None
        if not fut.done():
            fut.set_result(SubmitResult(pdu.sequence, pdu.status, message_id or None, nack))

    def _on_deliver_sm(self, deliver: DeliverSm) -> None:
        try:
            self._on_deliver(deliver)
        except Exception:
            # The consumer could not take it; a non-zero status makes the SMSC deliver it again.
            log.exception("smpp %s: on_deliver failed for seq %d (smsc message id %s)", self._system_id,
                          deliver.sequence, deliver.receipted_message_id)
            self.respond_deliver(deliver.sequence, ESME_RSYSERR)

    # ---- keep-alive and teardown -----------------------------------------------------------------

    async def _keepalive_loop(self) -> None:
        """enquire_link after `enquire_link_s` without inbound PDUs; an unanswered one for as long
        again means the link is dead, and the session is aborted. Also sweeps submit timeouts."""
        tick = max(min(self._enquire_link_s / 4, self._submit_timeout_s / 4, SWEEP_MAX_S), 0.05)
        while self.is_up:
            await asyncio.sleep(tick)
            self._sweep_timeouts()
            now = time.monotonic()
            if self._enquire_sent_at is not None:
                if now - self._enquire_sent_at > self._enquire_link_s:
                    log.warning("smpp %s: enquire_link unanswered, link dead", self._system_id)
                    self._abort("enquire_link unanswered")
                    return
            elif now - self._last_rx >= self._enquire_link_s and self._link is not None:
                with contextlib.suppress(SessionClosed):
                    self._link.send("enquire_link")
                    self._enquire_sent_at = now

    def _abort(self, reason: str) -> None:
        """Mark down and shut the socket; the reader thread then wakes and exits."""
        self._mark_down(reason)
        if self._link is not None:
            self._link.shutdown()

    def _mark_down(self, reason: str) -> None:
        """Loop thread only. Fails pending submits with SessionClosed; idempotent."""
        link = self._link
        was_up = link is not None and link.up
        if link is not None:
            link.up = False
        if was_up:
            log.info("smpp session %s:%d (%s) down: %s", self._host, self._port, self._system_id, reason)
        pending, self._pending = self._pending, {}
        self._deadlines.clear()
        for seq, fut in pending.items():
            if not fut.done():
                fut.set_exception(SessionClosed(f"{reason} (seq {seq})"))
        if self._unbind_done is not None and not self._unbind_done.done():
            self._unbind_done.set_result(None)
        keepalive, self._keepalive = self._keepalive, None
        if keepalive is not None and keepalive is not asyncio.current_task():
            keepalive.cancel()
