"""The byte stream of one SMPP bind: batched writes from the event loop, and a reader thread that
frames and decodes what the SMSC sends and hands it to the loop one batch per socket read.

- One lock around sequence allocation + output buffer (smpplib has none), since PDUs are made on the
  event loop (submit_sm, deliver_sm_resp) and on the reader thread (enquire_link_resp).
- Writes are batched: PDUs queued during one loop iteration leave in one sendall from the loop
  thread, the only writer. One syscall per PDU, each releasing and re-taking the GIL against the
  reader thread, capped a window of 50 near 2,500 submit_sm/s. The sendall blocks the loop, which is
  safe because what we write is bounded (a window of submit_sm plus acknowledgements, far below the
  socket buffer), and SO_SNDTIMEO turns a peer that stopped reading into a dropped connection.
- The reader reads whole buffers and splits PDUs by command_length itself (smpplib's `read_pdu`
  trusts it blindly). The hot commands are decoded by smsc/pdu_codec.py, the rest by smpplib. A PDU
  that can be framed (4..64 KiB) but not parsed is handed over as a `MalformedPdu` and reading goes
  on; a length that cannot frame anything, or MAX_MALFORMED_IN_A_ROW malformed PDUs with no good one
  between them (the stream is probably out of step), ends the connection.
- enquire_link is answered on the reader thread at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from smpplib import consts, exceptions, smpp
from smpplib.client import Client
from smpplib.command import Command

from smsc import pdu_codec as codec
from smsc.session_errors import MalformedPdu, SessionClosed

log = logging.getLogger(__name__)

MIN_FRAME_LEN = 4  # shorter cannot even hold its own length: the stream is lost
MAX_PDU_LEN = 64 * 1024
MAX_MALFORMED_IN_A_ROW = 3
RECV_BYTES = 256 * 1024
_LEN = struct.Struct(">L")
_SMPPLIB_ERRORS = (exceptions.UnknownCommandError, exceptions.PDUError, struct.error, ValueError, IndexError,
                   UnicodeError, TypeError, KeyError, AttributeError)

# What the reader hands over: a decoded PDU, a skipped malformed one, or None (connection lost).
Inbound = codec.Header | codec.DeliverSm | Command | MalformedPdu | None
Encoder = Callable[[int], bytes]


class SmppLink:
    """The socket of a bound smpplib `Client`. `on_batch` runs on the loop with what one read brought;
    `on_write_failed` when a write fails (the caller marks the bind down)."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop, name: str,
                 on_batch: Callable[[list[Inbound]], None], on_write_failed: Callable[[str], None]) -> None:
        self.client: Client | None = client
        self.name = name
        self.up = True
        self.quiet = False  # after our unbind the SMSC may close first: write errors are then normal
        self.malformed = 0
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._on_batch = on_batch
        self._on_write_failed = on_write_failed
        self._lock = threading.Lock()
        self._outbuf: list[bytes] = []
        self._flush_scheduled = False
        self._inbox: deque[list[Inbound]] = deque()
        self._wakeup_scheduled = False
        self._reader = threading.Thread(target=self._reader_main, args=(client,), name=f"smpp-reader-{name}",
                                        daemon=True)

    def start(self) -> None:
        self._reader.start()

    async def stop(self, join_s: float) -> None:
        """Shut the socket, wait for the reader thread, disconnect."""
        client = self.client
        if client is None:
            return
        self.shutdown()
        if self._reader.is_alive():
            await asyncio.to_thread(self._reader.join, join_s)
        with self._lock:
            client.disconnect()
            self.client = None

    def shutdown(self) -> None:
        client = self.client
        sock = client._socket if client is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # ---- writing ----------------------------------------------------------------------------------

    def send(self, name: str, *, sequence: int | None = None, encode: Encoder | None = None,
             **fields: Any) -> int:
        """Queue one PDU's bytes for the next flush; returns its sequence number.

        `encode(sequence)` builds the bytes (smsc/pdu_codec.py); without it smpplib builds the PDU from
        `fields`. Requests take the next sequence from smpplib's generator inside the lock, and bytes
        join the buffer in the same critical section, so sequence numbers go out in order. Raises
        `SessionClosed` if the link is down or smpplib's bind state forbids `name` (e.g. a
        deliver_sm_resp after our unbind was answered). A failed write surfaces later (`on_write_failed`).
        """
        with self._lock:
            client = self.client
            if client is None or not self.up:
                raise SessionClosed(f"cannot send {name}: session is not bound")
            if client.state not in consts.COMMAND_STATES[name]:
                raise SessionClosed(f"cannot send {name} in bind state {client.state}")
            if encode is not None:
                if sequence is None:
                    sequence = client.next_sequence()
                self._outbuf.append(encode(sequence))
            else:
                pdu = smpp.make_pdu(name, client=client, **fields)
                if sequence is not None:
                    pdu.sequence = sequence
                sequence = int(pdu.sequence)
                self._outbuf.append(pdu.generate())
            wake = not self._flush_scheduled
            self._flush_scheduled = True
        if wake:
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._flush)
            else:
                with contextlib.suppress(RuntimeError):  # loop closed: nothing left to send to
                    self._loop.call_soon_threadsafe(self._flush)
        return sequence

    def _flush(self) -> None:
        """Write every queued PDU in one sendall (loop thread only, so writes never interleave)."""
        with self._lock:
            self._flush_scheduled = False
            data = b"".join(self._outbuf)
            self._outbuf.clear()
            client = self.client
        sock = client._socket if client is not None else None
        if not data or sock is None:
            return
        try:
            sock.sendall(data)
        except OSError as exc:
            log.log(logging.INFO if self.quiet else logging.WARNING, "smpp %s: write of %d bytes failed: %r",
                    self.name, len(data), exc)
            self._on_write_failed(f"write failed: {exc!r}")

    # ---- reading (reader thread) ------------------------------------------------------------------

    def _reader_main(self, client: Client) -> None:
        reason = "connection closed"
        try:
            self._read_forever(client)
        except MalformedPdu as exc:
            reason = f"malformed PDU: {exc}"
            log.warning("smpp %s: %s; dropping the bind", self.name, exc)
            self.shutdown()
        except (exceptions.ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc!r}"
        except Exception:
            log.exception("smpp %s: reader thread failed", self.name)
            reason = "reader thread failed"
        finally:
            log.debug("smpp %s: reader thread exits (%s)", self.name, reason)
            self._post([None])

    def _read_forever(self, client: Client) -> None:
        sock: socket.socket = client._socket
        buf = bytearray()
        in_a_row = 0
        while True:
            chunk = sock.recv(RECV_BYTES)
            if not chunk:
                raise exceptions.ConnectionError("connection closed by the SMSC")
            buf += chunk
            batch: list[Inbound] = []
            pos = 0
            try:
                while len(buf) - pos >= 4:
                    (length,) = _LEN.unpack_from(buf, pos)
                    if not MIN_FRAME_LEN <= length <= MAX_PDU_LEN:
                        self.malformed += 1
                        raise MalformedPdu(f"command_length {length} out of {MIN_FRAME_LEN}..{MAX_PDU_LEN}",
                                           fatal=True)
                    if len(buf) - pos < length:
                        break
                    raw = bytes(buf[pos: pos + length])
                    pos += length
                    in_a_row = self._take(client, raw, batch, in_a_row)
            finally:
                del buf[:pos]
                if batch:
                    self._post(batch)

    def _take(self, client: Client, raw: bytes, batch: list[Inbound], in_a_row: int) -> int:
        """Decode one framed PDU into `batch`; returns the new count of malformed PDUs in a row."""
        try:
            item = self._decode(client, raw)
        except MalformedPdu as exc:
            self.malformed += 1
            if in_a_row + 1 >= MAX_MALFORMED_IN_A_ROW:
                raise MalformedPdu(f"{in_a_row + 1} malformed PDUs in a row, the last: {exc}", fatal=True) from exc
            log.warning("smpp %s: %s; skipped", self.name, exc)
            batch.append(exc)
            return in_a_row + 1
        if isinstance(item, codec.Header) and item.command_id == codec.ENQUIRE_LINK:
            with contextlib.suppress(SessionClosed):
                self.send("enquire_link_resp", sequence=item.sequence,
                          encode=lambda seq: codec.header_only(codec.ENQUIRE_LINK_RESP, seq))
        batch.append(item)
        return 0

    @staticmethod
    def _decode(client: Client, raw: bytes) -> codec.Header | codec.DeliverSm | Command:
        """One framed PDU. Raises `MalformedPdu` (not fatal: the PDU was consumed whole) for one
        shorter than its header or that cannot be parsed."""
        length = len(raw)
        command_id = _LEN.unpack_from(raw, 4)[0] if length >= 8 else 0
        if length < codec.HEADER_LEN:
            raise MalformedPdu(f"command_length {length} shorter than the header", command_id=command_id)
        seq = _LEN.unpack_from(raw, 12)[0]
        try:
            if command_id in codec.FAST_COMMANDS:
                return codec.decode(raw)
            pdu = smpp.parse_pdu(raw, client=client, allow_unknown_opt_params=True)
        except (codec.CodecError, *_SMPPLIB_ERRORS) as exc:
            raise MalformedPdu(f"unparsable PDU 0x{command_id:08x} seq {seq} ({length} bytes): {exc!r}",
                               command_id=command_id, sequence=seq) from exc
        if not pdu.is_error() and pdu.command in consts.STATE_SETTERS:
            client.state = consts.STATE_SETTERS[pdu.command]
        return pdu

    def _post(self, batch: list[Inbound]) -> None:
        """Queue a batch for the loop; wake it only if no wake-up is pending."""
        self._inbox.append(batch)
        if self._wakeup_scheduled:
            return
        self._wakeup_scheduled = True
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody left to tell
            self._loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        # Clear the flag before draining: a batch appended after this line schedules another drain,
        # one appended before it is drained here, so none is stranded.
        self._wakeup_scheduled = False
        while self._inbox:
            self._on_batch(self._inbox.popleft())
