"""An ESME for tests: smpplib's client over real TCP, its reads in a thread (smpplib is blocking), its
submit_sm_resp and deliver_sm collected for the test to wait on."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from types import SimpleNamespace
from typing import Any

import smpplib.client
import smpplib.smpp
from smpplib import consts, exceptions

CANCEL_SM_RESP = 0x80000008


class Esme:
    def __init__(self, port: int, system_id: str, password: str, *, answer: bool = True,
                 tls: ssl.SSLContext | None = None) -> None:
        # tls: SMPP over TLS (smpplib wraps its socket with this client context)
        self.client = smpplib.client.Client("127.0.0.1", port, timeout=30, allow_unknown_opt_params=True,
                                            ssl_context=tls)
        self.system_id, self.password = system_id, password
        self.answer = answer  # False: receive deliver_sm but never send deliver_sm_resp
        self.resps: dict[int, Any] = {}
        self.delivered: list[Any] = []
        self.other: list[Any] = []
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.client.set_message_sent_handler(self._on_resp)
        self.client.set_query_resp_handler(self._on_other)
        self.client.set_error_pdu_handler(self._on_error)
        self.client.set_message_received_handler(lambda pdu: None)
        self.client._message_received = self._on_deliver  # type: ignore[method-assign]
        self.client.read_pdu = self._read_pdu  # type: ignore[method-assign]

    def bind(self, mode: str = "transceiver") -> Any:
        """Connect and bind; raises smpplib's PDUError (args[1] = status) when refused."""
        self.client.connect()
        resp = getattr(self.client, f"bind_{mode}")(system_id=self.system_id, password=self.password)
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        return resp

    def _listen(self) -> None:
        try:
            while True:
                self.client.read_once(auto_send_enquire_link=False)
        except Exception:  # the connection closed: the test decides whether that was expected
            return

    def _read_pdu(self) -> Any:
        """smpplib's read, except cancel_sm_resp (smpplib has no class for it): recorded here."""
        head = self.client._recv_exact(16)
        length, command_id, status, sequence = struct.unpack(">LLLL", head)
        body = self.client._recv_exact(length - 16) if length > 16 else b""
        if command_id == CANCEL_SM_RESP:
            with self.lock:
                self.other.append(SimpleNamespace(command="cancel_sm_resp", status=status, sequence=sequence))
            return SimpleNamespace(command="enquire_link_resp", is_error=lambda: False)
        pdu = smpplib.smpp.parse_pdu(head + body, client=self.client, allow_unknown_opt_params=True)
        if not pdu.is_error() and pdu.command in consts.STATE_SETTERS:
            self.client.state = consts.STATE_SETTERS[pdu.command]
        return pdu

    def _on_resp(self, pdu: Any) -> None:
        with self.lock:
            self.resps[pdu.sequence] = pdu

    def _on_error(self, pdu: Any) -> None:
        with self.lock:
            if pdu.command == "submit_sm_resp":
                self.resps[pdu.sequence] = pdu
            else:
                self.other.append(pdu)

    def _on_other(self, pdu: Any) -> None:
        with self.lock:
            self.other.append(pdu)

    def _on_deliver(self, pdu: Any) -> None:
        with self.lock:
            self.delivered.append(pdu)
        if self.answer:
            resp = smpplib.smpp.make_pdu("deliver_sm_resp", client=self.client)
            resp.sequence = pdu.sequence
            self.client.send_pdu(resp)

    def submit(self, to: str, text: bytes, **fields: Any) -> int:
        params: dict[str, Any] = {"source_addr_ton": 5, "source_addr_npi": 0, "source_addr": "acme",
                                  "dest_addr_ton": 1, "dest_addr_npi": 1, "destination_addr": to,
                                  "short_message": text, "registered_delivery": 1, "data_coding": 0}
        params.update(fields)
        return int(self.client.send_message(**params).sequence)

    def send_raw(self, data: bytes) -> None:
        self.client._socket.sendall(data)

    def close(self) -> None:
        """Send unbind (its answer goes to the reader thread) and drop the connection."""
        with contextlib.suppress(exceptions.ConnectionError, exceptions.PDUError, OSError, AttributeError):
            self.client.send_pdu(smpplib.smpp.make_pdu("unbind", client=self.client))
        if self.client._socket is not None:
            with contextlib.suppress(OSError):  # wakes the reader thread's recv (close alone may not)
                self.client._socket.shutdown(socket.SHUT_RDWR)
            self.client._socket.close()
            self.client._socket = None
        if self._thread is not None:
            self._thread.join(timeout=5)
