"""MO (mobile-originated) messages: a deliver_sm that is not a receipt becomes an `inbound` event.

For a batch of MO deliver_sm (one flush of the connector) this costs:
- one query on `numbers` for the tenants owning the destination numbers;
- one aggregation on `events` for the reply targets: the newest `accepted` event of each tenant to
  each sender, through the partial index `accepted_to` (`data.to`, `tenant_id`, `at`; only
  `accepted` events are in it, so each entry is written once per message, on an insert-only
  collection; an index on `streams` would be rewritten on every head write);
- one transaction appending every `inbound` event as the first event of a new stream, with its head.

MO to a number no tenant owns is kept in `orphan_receipts` (kind `mo_unassigned`), counted and logged.
The caller acknowledges each deliver_sm only after this returns, i.e. after its event is committed:
a crash before that makes the SMSC deliver it again (at-least-once; an MO carries no id we could
deduplicate on, so a resent MO may appear twice).

A concatenated MO (UDH) is recorded part by part, each with its `udh` (ref, total, index) in the data;
reassembly is left to the reader.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.domain.encoding import decode_short_message, split_udh
from core.domain.events import Event, EventType
from core.domain.message import evolve
from core.ids import new_message_id
from core.store.eventstore import EventStore
from core.store.heads import head_doc
from core.store.numbers import NumberStore, ensure_inbound_indexes
from smsc.session import DeliverSm

log = logging.getLogger(__name__)

__all__ = ["InboundRecorder", "e164", "ensure_inbound_indexes", "mo_text"]


def e164(address: str) -> str:
    """An SMPP address as msgcore spells numbers: "+digits" for an all-digit address of 7 or more
    digits (international), anything else (short codes, alphanumeric senders) as given."""
    digits = address.lstrip("+")
    return f"+{digits}" if digits.isdigit() and len(digits) >= 7 else address


def mo_text(pdu: DeliverSm) -> tuple[str, dict[str, int] | None]:
    """(text, concatenation info or None) of an MO deliver_sm; message_payload wins over an empty
    short_message. Never raises: undecodable bytes become replacement characters."""
    payload = pdu.short_message or pdu.message_payload or b""
    udh, body = split_udh(payload, pdu.esm_class)
    concat = None
    if udh is not None and len(udh) >= 6 and udh[1] == 0x00:  # IEI 0: 8-bit reference concatenation
        concat = {"ref": udh[3], "total": udh[4], "index": udh[5]}
    return decode_short_message(body, pdu.data_coding), concat


@dataclass
class InboundResult:
    committed: list[str] = field(default_factory=list)  # message ids of the new `inbound` streams
    unassigned: int = 0


class InboundRecorder:
    """Turns MO deliver_sm into `inbound` streams of the tenant owning the destination number."""

    def __init__(self, store: EventStore, route_id: str) -> None:
        self.store = store
        self.numbers = NumberStore(store.db)
        self.route_id = route_id

    async def record(self, pdus: Sequence[DeliverSm], now: datetime) -> InboundResult:
        """Commit an `inbound` event per MO whose destination has a tenant, keep the rest as orphans.

        Raises the store's errors; then nothing of the batch is committed except possibly the orphan
        copies (harmless: they are a log for the operator), and the caller retries it.
        """
        result = InboundResult()
        if not pdus:
            return result
        owners = await self.numbers.tenants_for(p.destination for p in pdus)
        assigned = [(p, owners[p.destination]) for p in pdus if p.destination in owners]
        unassigned = [p for p in pdus if p.destination not in owners]
        replies = await self._reply_targets({(t, e164(p.source)) for p, t in assigned})
        if unassigned:  # first: a failure after the commit below must not record the MO twice on retry
            await self.store.db["orphan_receipts"].insert_many([self._orphan(p, now) for p in unassigned])
            result.unassigned = len(unassigned)
            log.warning("route=%s: %d MO messages to numbers no tenant owns (e.g. to=%s from=%s); kept in "
                        "orphan_receipts", self.route_id, len(unassigned), unassigned[0].destination,
                        unassigned[0].source)
        items = []
        # Ids of one millisecond differ only in random bits: sorted, they keep the order of arrival,
        # which `GET /v1/inbound` pages by.
        ids = sorted(new_message_id() for _ in assigned)
        for message_id, (p, tenant) in zip(ids, assigned, strict=True):
            event = self._event(message_id, p, tenant, now, replies.get((tenant, e164(p.source))))
            items.append((event, head_doc(evolve(None, event), now=now)))
        if items:
            await self.store.accept(items)
            result.committed = [e.message_id for e, _ in items]
            for e, _ in items:
                log.info("inbound message=%s tenant=%s route=%s from=%s to=%s reply_to=%s", e.message_id,
                         e.tenant_id, self.route_id, e.data["from"], e.data["to"], e.data.get("reply_to"))
        return result

    def _event(self, message_id: str, p: DeliverSm, tenant: str, now: datetime, reply_to: str | None) -> Event:
        text, concat = mo_text(p)
        data: dict[str, Any] = {"from": e164(p.source), "to": e164(p.destination), "text": text}
        if p.receipted_message_id:
            data["smsc_message_id"] = p.receipted_message_id
        if reply_to is not None:
            data["reply_to"] = reply_to
        if concat is not None:
            data["udh"] = concat
        return Event(message_id=message_id, seq=1, type=EventType.INBOUND, at=now, tenant_id=tenant,
                     route_id=self.route_id, data=data)

    async def _reply_targets(self, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """(tenant, number) -> id of the newest message that tenant sent to that number, for the pairs
        that have one. One aggregation over the `accepted_to` index."""
        if not pairs:
            return {}
        tenants = sorted({t for t, _ in pairs})
        numbers = sorted({n for _, n in pairs})
        pipeline: list[dict[str, Any]] = [
            {"$match": {"type": "accepted", "data.to": {"$in": numbers}, "tenant_id": {"$in": tenants}}},
            {"$sort": {"at": -1, "message_id": -1}},
            {"$group": {"_id": {"t": "$tenant_id", "n": "$data.to"}, "message_id": {"$first": "$message_id"}}},
        ]
        found: dict[tuple[str, str], str] = {}
        async for d in await self.store.events.aggregate(pipeline):
            key = (d["_id"]["t"], d["_id"]["n"])
            if key in pairs:
                found[key] = d["message_id"]
        return found

    def _orphan(self, p: DeliverSm, now: datetime) -> dict[str, Any]:
        text, _ = mo_text(p)
        return {"at": now, "kind": "mo_unassigned", "route_id": self.route_id,
                "smsc_message_id": p.receipted_message_id, "source": p.source, "destination": p.destination,
                "esm_class": p.esm_class,
                "data_coding": p.data_coding, "short_message": p.short_message, "text": text, "stat": None}
