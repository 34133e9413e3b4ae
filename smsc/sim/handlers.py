"""The simulator's answers, one handler per SMPP command: binds (with refused binds and credentials),
submit_sm (faults, message ids, the journal line, the receipt it earns), deliver_sm_resp,
enquire_link, unbind, generic_nack. PDUs are decoded and encoded with smpplib. Event-loop only.
"""

from __future__ import annotations

import logging
import secrets
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from smpplib import command_codes, exceptions, smpp
from smpplib.command import Command

from core.domain.encoding import decode_short_message, split_udh
from smsc.pdu import (
    ESME_RALYBND,
    ESME_RBINDFAIL,
    ESME_RINVBNDSTS,
    ESME_RINVCMDID,
    ESME_RINVCMDLEN,
    ESME_RINVPASWD,
    ESME_RINVSYSID,
    ESME_ROK,
    SequenceCounter,
    as_str,
)
from smsc.sim.faults import FaultEngine
from smsc.sim.journal import Journal
from smsc.sim.receipts import ReceiptQueues
from smsc.sim.sessions import Conn, Receipt

log = logging.getLogger(__name__)

HEADER = struct.Struct(">LLLL")
_BIND_MODES = {"bind_transmitter": "tx", "bind_receiver": "rx", "bind_transceiver": "trx"}


@dataclass
class Submitted:
    """One accepted submit_sm, as the journal records it."""

    at: datetime
    system_id: str
    message_id: str
    source: str
    destination: str
    esm_class: int
    data_coding: int
    payload: bytes
    udh: bytes | None
    text: str
    registered: int

    @classmethod
    def parse(cls, pdu: Command, system_id: str, message_id: str, at: datetime) -> Submitted:
        payload: bytes = pdu.short_message or b""
        esm_class, data_coding = pdu.esm_class or 0, pdu.data_coding or 0
        udh, body = split_udh(payload, esm_class)
        return cls(at=at, system_id=system_id, message_id=message_id, source=as_str(pdu.source_addr) or "",
                   destination=as_str(pdu.destination_addr) or "", esm_class=esm_class, data_coding=data_coding,
                   payload=payload, udh=udh, text=decode_short_message(body, data_coding),
                   registered=pdu.registered_delivery or 0)

    def journal_entry(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "system_id": self.system_id,
            "message_id": self.message_id,
            "source": self.source,
            "destination": self.destination,
            "esm_class": self.esm_class,
            "data_coding": self.data_coding,
            "short_message_hex": self.payload.hex(),
            "text": self.text,
            "udh_hex": self.udh.hex() if self.udh is not None else None,
            "registered_delivery": self.registered,
        }


class PduHandlers:
    """Answers every PDU a connection sends; `counters` is the simulator's protocol counters."""

    def __init__(self, faults: FaultEngine, receipts: ReceiptQueues, journal: Journal, seq: SequenceCounter,
                 counters: dict[str, int], credentials: Mapping[str, str] | None) -> None:
        self._faults = faults
        self._receipts = receipts
        self._journal = journal
        self._seq = seq
        self._counters = counters
        self._credentials = dict(credentials) if credentials is not None else None
        # The random prefix keeps ids unique across restarts; the counter keeps them unique within one.
        self._id_prefix = secrets.token_hex(4)
        self._id_counter = 0
        self._handlers: dict[str, Callable[[Conn, Command], None]] = {
            "bind_transmitter": self._on_bind,
            "bind_receiver": self._on_bind,
            "bind_transceiver": self._on_bind,
            "submit_sm": self._on_submit_sm,
            "deliver_sm_resp": self._on_deliver_sm_resp,
            "enquire_link": self._on_enquire_link,
            "enquire_link_resp": self._on_enquire_link_resp,
            "unbind": self._on_unbind,
            "unbind_resp": self._on_unbind_resp,
            "generic_nack": self._on_generic_nack,
        }

    def dispatch(self, conn: Conn, raw: bytes) -> None:
        """Decode one complete PDU and answer it; generic_nack for what cannot be decoded or is unknown."""
        _, command_id, _, seq = HEADER.unpack_from(raw)
        try:
            name = command_codes.get_command_name(command_id)
            pdu = smpp.parse_pdu(raw, client=self._seq, allow_unknown_opt_params=True)
        except exceptions.UnknownCommandError:
            log.warning("smsc-sim %s: unknown command 0x%08x seq %d", conn.peer, command_id, seq)
            self.nack(conn, seq, ESME_RINVCMDID)
            return
        except (struct.error, IndexError, ValueError, UnicodeError, exceptions.PDUError) as exc:
            log.warning("smsc-sim %s: malformed PDU 0x%08x seq %d: %s", conn.peer, command_id, seq, exc)
            self.nack(conn, seq, ESME_RINVCMDLEN)
            return
        handler = self._handlers.get(name)
        if handler is not None:
            handler(conn, pdu)
        elif command_id & 0x80000000:
            log.info("smsc-sim %s: ignoring unexpected %s seq %d", conn.peer, name, seq)
        else:
            log.info("smsc-sim %s: unsupported %s seq %d", conn.peer, name, seq)
            self.nack(conn, seq, ESME_RINVCMDID)

    def respond(self, conn: Conn, name: str, seq: int, status: int = ESME_ROK, **fields: Any) -> None:
        resp = smpp.make_pdu(name, client=self._seq, status=status, **fields)
        resp.sequence = seq
        conn.send(resp)

    def nack(self, conn: Conn, seq: int, status: int) -> None:
        self._counters["generic_nack_sent"] += 1
        self.respond(conn, "generic_nack", seq, status)

    # ---- binds -----------------------------------------------------------------------------------

    def _on_bind(self, conn: Conn, pdu: Command) -> None:
        resp_name = f"{pdu.command}_resp"
        system_id = as_str(pdu.system_id) or ""
        if conn.mode is not None:
            self.respond(conn, resp_name, pdu.sequence, ESME_RALYBND)
            return
        if self._faults.binds_refused():
            log.warning("smsc-sim fault: bind of %s refused for system_id %s (0x%02x, %.1fs left)", conn.peer,
                        system_id, ESME_RBINDFAIL, self._faults.refuse_binds_remaining_s())
            self.respond(conn, resp_name, pdu.sequence, ESME_RBINDFAIL)
            return
        status = self._check_credentials(system_id, as_str(pdu.password) or "")
        if status != ESME_ROK:
            log.warning("smsc-sim %s: bind refused for system_id %s (0x%02x)", conn.peer, system_id, status)
            self.respond(conn, resp_name, pdu.sequence, status)
            return
        conn.system_id = system_id
        conn.mode = _BIND_MODES[pdu.command]
        self._counters["binds_total"] += 1
        self.respond(conn, resp_name, pdu.sequence, system_id="msgcore-sim")
        log.info("smsc-sim bound %s as %s (system_id %s)", conn.peer, conn.mode, system_id)
        if conn.can_receive:
            self._receipts.pump(system_id)

    def _check_credentials(self, system_id: str, password: str) -> int:
        if self._credentials is None:
            return ESME_ROK
        if system_id not in self._credentials:
            return ESME_RINVSYSID
        if self._credentials[system_id] != password:
            return ESME_RINVPASWD
        return ESME_ROK

    # ---- submit_sm -------------------------------------------------------------------------------

    def _on_submit_sm(self, conn: Conn, pdu: Command) -> None:
        if not conn.can_transmit or conn.system_id is None:
            self.respond(conn, "submit_sm_resp", pdu.sequence, ESME_RINVBNDSTS)
            return
        self._counters["submit_sm"] += 1
        status = self._faults.submit_status(conn.system_id, conn.peer, time.monotonic())
        if status != ESME_ROK:
            log.debug("smsc-sim fault: submit_sm seq %d from %s (system_id %s) answered 0x%02x",
                      pdu.sequence, conn.peer, conn.system_id, status)
            self.respond(conn, "submit_sm_resp", pdu.sequence, status)
            return
        self._id_counter += 1
        sm = Submitted.parse(pdu, conn.system_id, f"{self._id_prefix}{self._id_counter:010x}", datetime.now(UTC))
        receipt = self._receipt_for(conn, sm)
        self.respond(conn, "submit_sm_resp", pdu.sequence, message_id=sm.message_id)
        if self._journal.active:
            self._journal.write(sm.journal_entry())
        if receipt is not None:
            receipt.due = time.monotonic() + self._faults.receipt_delay()
            self._receipts.schedule(receipt)

    def _receipt_for(self, conn: Conn, sm: Submitted) -> Receipt | None:
        """The receipt to schedule for an accepted submit_sm; None when none is wanted, when it is
        withheld (`never`) or when it already went out (`before_response`)."""
        stat = self._faults.receipt_stat()  # drawn for every submit, so a seeded run draws the same sequence
        if not self._wants_receipt(sm.registered, stat):
            return None
        receipt = Receipt(due=0.0, system_id=sm.system_id, message_id=sm.message_id, source=sm.source,
                          destination=sm.destination, submitted_at=sm.at, text=sm.text, stat=stat)
        mode = self._faults.settings.receipt_mode
        if mode == "never":
            self._faults.counters["receipts_withheld"] += 1
            log.debug("smsc-sim fault: receipt for smsc message id %s withheld", sm.message_id)
            return None
        if mode == "before_response" and self._receipts.send_now(conn, receipt):
            return None
        return receipt

    def _wants_receipt(self, registered_delivery: int, stat: str | None = None) -> bool:
        """Bits 0-1: 1 = receipt on any final outcome, 2 = on failure only."""
        wanted = registered_delivery & 0x03
        return wanted == 1 or (wanted == 2 and (stat or self._faults.settings.receipt_stat) != "DELIVRD")

    # ---- the rest --------------------------------------------------------------------------------

    def _on_deliver_sm_resp(self, conn: Conn, pdu: Command) -> None:
        self._receipts.acknowledged(conn, pdu.sequence, pdu.status)

    def _on_enquire_link(self, conn: Conn, pdu: Command) -> None:
        self._counters["enquire_link_received"] += 1
        self.respond(conn, "enquire_link_resp", pdu.sequence)

    def _on_enquire_link_resp(self, conn: Conn, pdu: Command) -> None:
        self._counters["enquire_link_resp_received"] += 1
        fut = conn.pings.pop(pdu.sequence, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_unbind(self, conn: Conn, pdu: Command) -> None:
        self._counters["unbind_received"] += 1
        log.info("smsc-sim %s (system_id %s) asked to unbind, seq %d", conn.peer, conn.system_id, pdu.sequence)
        self.respond(conn, "unbind_resp", pdu.sequence)
        conn.closing = True

    def _on_unbind_resp(self, conn: Conn, pdu: Command) -> None:
        conn.closing = True

    def _on_generic_nack(self, conn: Conn, pdu: Command) -> None:
        log.warning("smsc-sim %s: generic_nack 0x%02x for seq %d", conn.peer, pdu.status, pdu.sequence)
