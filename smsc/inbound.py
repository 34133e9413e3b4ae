"""MO (mobile-originated) messages: a deliver_sm that is not a receipt becomes an `inbound` event.

For a batch of MO deliver_sm (one flush of the connector) this costs:
- one query on `numbers` for the tenants owning the destination numbers;
- one aggregation on `events` for the reply targets: the newest `accepted` event of each tenant to
  each sender, through the partial index `accepted_to` (`data.to`, `tenant_id`, `at`; only
  `accepted` events are in it, so each entry is written once per message, on an insert-only
  collection);
- one query on `smpp_accounts` for the tenants that receive MO over SMPP (core/store/smpp_accounts.py
  `mo_topics`: the oldest account with `receive_mo`);
- one transaction appending every `inbound` event as the first event of a new stream (a fact, no
  head; its state is the fold of that one event). An MO of a tenant with such an account carries
  `notify` = that account's topic (`dlr:<system_id>`) and takes a position there, in the same
  transaction: smsc/esme_server/receipts.py sends it to the ESME as a deliver_sm. Other MO take no
  position anywhere.

Consent: an MO whose text is a stop or start keyword (core/domain/consent.py: trimmed,
case-insensitive, English plus the tenant's languages and keywords) also changes the tenant's
suppression list in the same transaction: `opted_out` / `opted_in` events and the entries' documents
(core/store/suppressions.py; one query for the settings of the batch's tenants, only when a text
could be a keyword, and one for the entries). The `inbound` event is recorded as always, with
`consent` (the action) in its data. With the tenant's `confirm` setting, a change is answered by a
transactional message from the tenant's number, `accepted` in the same transaction (built like every
submission, core/store/submission.py; a confirmation is never suppressed). A repeated keyword that
changes nothing (STOP from a number already out) writes no event and sends no confirmation.

MO to a number no tenant owns is kept in `orphan_receipts` (kind `mo_unassigned`), counted and logged.
The caller acknowledges each deliver_sm only after this returns, i.e. after its event is committed:
a crash before that makes the SMSC deliver it again (at-least-once; an MO carries no id we could
deduplicate on, so a resent MO may appear twice).

A concatenated MO (UDH) is recorded part by part, each with its `udh` (ref, total, index) in the data;
reassembly is left to the reader.

data_coding 0 means "the SMSC's default alphabet": GSM 03.38 for most SMSCs, Latin-1 or ASCII for
some. It is the route's `mo_alphabet`, read from the `routes` collection once per batch (so a change
through the admin API applies to the next MO). Bytes that are not valid in the alphabet used are not
mapped silently: the text keeps U+FFFD in their place, the event's data gets `undecodable` (the raw
payload in hex) and a warning names the route and the message.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.domain.consent import ConsentAction, ConsentSettings, keyword_action, keyword_changes, may_be_keyword
from core.domain.encoding import DecodedMo, MoAlphabet, count_parts, decode_mo, split_udh
from core.domain.events import Event, EventType
from core.ids import new_message_id
from core.store.eventstore import EventStore
from core.store.numbers import NumberStore
from core.store.numbers import ensure_inbound_indexes as ensure_event_indexes
from core.store.routes import RouteStore
from core.store.smpp_accounts import SmppAccountStore
from core.store.submission import Submission, accepted
from core.store.suppressions import Plan, Planned, SuppressionStore
from core.store.topics import Write
from smsc.session import DeliverSm

log = logging.getLogger(__name__)

CONFIRM_VALIDITY_S = 24 * 3600

__all__ = ["InboundRecorder", "e164", "ensure_inbound_indexes", "mo_text"]


async def ensure_inbound_indexes(db: Any) -> None:
    """The indexes MO handling relies on (idempotent): those on `events` (core/store/numbers.py) and
    the SMPP accounts' (`mo_topics` reads the partial index `tenant_mo`)."""
    await ensure_event_indexes(db)
    await SmppAccountStore(db).ensure_indexes()


def e164(address: str) -> str:
    """An SMPP address as msgcore spells numbers: "+digits" for an all-digit address of 7 or more
    digits (international), anything else (short codes, alphanumeric senders) as given."""
    digits = address.lstrip("+")
    return f"+{digits}" if digits.isdigit() and len(digits) >= 7 else address


def mo_text(pdu: DeliverSm, alphabet: MoAlphabet = MoAlphabet.GSM) -> tuple[DecodedMo, dict[str, int] | None]:
    """(decoded text, concatenation info or None) of an MO deliver_sm; message_payload wins over an
    empty short_message. `alphabet` is what data_coding 0 means on this route. Never raises: bytes
    not valid in the alphabet become replacement characters and are reported in `undecodable`."""
    payload = pdu.short_message or pdu.message_payload or b""
    udh, body = split_udh(payload, pdu.esm_class)
    concat = None
    if udh is not None and len(udh) >= 6 and udh[1] == 0x00:  # IEI 0: 8-bit reference concatenation
        concat = {"ref": udh[3], "total": udh[4], "index": udh[5]}
    return decode_mo(body, pdu.data_coding, alphabet), concat


@dataclass
class InboundResult:
    committed: list[str] = field(default_factory=list)  # message ids of the new `inbound` streams
    unassigned: int = 0


class InboundRecorder:
    """Turns MO deliver_sm into `inbound` streams of the tenant owning the destination number."""

    def __init__(self, store: EventStore, route_id: str, *, mo_alphabet: MoAlphabet | None = None) -> None:
        """`mo_alphabet` fixes what data_coding 0 means; None reads the route's setting per batch."""
        self.store = store
        self.numbers = NumberStore(store.db)
        self.routes = RouteStore(store.db)
        self.smpp_accounts = SmppAccountStore(store.db)
        self.suppressions = SuppressionStore(store.db)
        self.settings: dict[str, ConsentSettings] = {}  # of the tenants in the batch being recorded
        self.route_id = route_id
        self.mo_alphabet = mo_alphabet

    async def alphabet(self) -> MoAlphabet:
        """The route's `mo_alphabet` (GSM when the route is gone: the SMPP default)."""
        if self.mo_alphabet is not None:
            return self.mo_alphabet
        route = await self.routes.get(self.route_id)
        return route.mo_alphabet if route is not None else MoAlphabet.GSM

    async def record(self, pdus: Sequence[DeliverSm], now: datetime) -> InboundResult:
        """Commit an `inbound` event per MO whose destination has a tenant, keep the rest as orphans.

        Raises the store's errors; then nothing of the batch is committed except possibly the orphan
        copies (harmless: they are a log for the operator), and the caller retries it.
        """
        result = InboundResult()
        if not pdus:
            return result
        owners = await self.numbers.tenants_for(p.destination for p in pdus)
        alphabet = await self.alphabet()
        assigned = [(p, owners[p.destination]) for p in pdus if p.destination in owners]
        unassigned = [p for p in pdus if p.destination not in owners]
        replies = await self._reply_targets({(t, e164(p.source)) for p, t in assigned})
        notify = await self.smpp_accounts.mo_topics(t for _, t in assigned)
        if unassigned:  # first: a failure after the commit below must not record the MO twice on retry
            await self.store.db["orphan_receipts"].insert_many([self._orphan(p, now, alphabet) for p in unassigned])
            result.unassigned = len(unassigned)
            log.warning("route=%s: %d MO messages to numbers no tenant owns (e.g. to=%s from=%s); kept in "
                        "orphan_receipts", self.route_id, len(unassigned), unassigned[0].destination,
                        unassigned[0].source)
        events: list[Event] = []
        # Ids of one millisecond differ only in random bits: sorted, they keep the order of arrival,
        # which `GET /v1/inbound` pages by.
        ids = sorted(new_message_id() for _ in assigned)
        for message_id, (p, tenant) in zip(ids, assigned, strict=True):
            event = self._event(message_id, p, tenant, now, replies.get((tenant, e164(p.source))), alphabet)
            events.append(event.model_copy(update={"notify": notify.get(tenant)}))
        if events:
            events = await self._commit(events, now)
            result.committed = [e.message_id for e in events]
            for e in events:
                log.info("inbound message=%s tenant=%s route=%s from=%s to=%s reply_to=%s notify=%s", e.message_id,
                         e.tenant_id, self.route_id, e.data["from"], e.data["to"], e.data.get("reply_to"), e.notify)
        return result

    async def _commit(self, events: list[Event], now: datetime) -> list[Event]:
        """Commit the `inbound` events with the consent changes their keywords ask for (one
        transaction); the events as committed (keyword MO carry `consent`)."""
        actions = await self._keyword_actions(events)
        events = [e.model_copy(update={"data": {**e.data, "consent": actions[e.message_id].value}})
                  if e.message_id in actions else e for e in events]
        # The topic is given explicitly: `inbound` is not an outcome (core.domain.message.NOTIFY_TYPES).
        inbound = [Write(message_id=e.message_id, events=[e.to_doc()], topics=[e.notify]) for e in events]

        async def planned() -> Planned:
            plans, replies = await self._consent_writes(events, actions, now)
            writes = inbound + [w for p in plans.values() for w in p.writes] + replies
            return Planned(writes, [sw for p in plans.values() for sw in p.side_writes], plans)

        await self.suppressions.commit_replanning(planned, f"route={self.route_id} MO batch")
        return events

    async def _keyword_actions(self, events: Sequence[Event]) -> dict[str, ConsentAction]:
        """inbound id -> ConsentAction, for the MO whose text is one of its tenant's keywords."""
        candidates = [e for e in events if may_be_keyword(e.data["text"]) and "udh" not in e.data]
        if not candidates:
            return {}
        self.settings = await self.suppressions.settings(e.tenant_id for e in candidates)
        found = {e.message_id: keyword_action(e.data["text"], self.settings[e.tenant_id]) for e in candidates}
        return {mid: action for mid, action in found.items() if action is not None}

    async def _consent_writes(self, events: Sequence[Event], actions: dict[str, ConsentAction],
                              now: datetime) -> tuple[dict[str, Plan], list[Write]]:
        """Per tenant, the plan of its keyword changes; and the confirmations of the MO that changed
        something, for tenants with `confirm`."""
        by_tenant: dict[str, list[Event]] = {}
        for e in events:
            if e.message_id in actions:
                by_tenant.setdefault(e.tenant_id, []).append(e)
        plans: dict[str, Plan] = {}
        replies: list[Write] = []
        for tenant, mos in by_tenant.items():
            settings = self.settings[tenant]
            changes = [c for e in mos for c in keyword_changes(
                actions[e.message_id], e.data["from"], e.data["to"], "keyword", f"mo:{e.message_id}", e.data["text"])]
            plan = await self.suppressions.plan(tenant, changes, now)
            if not plan.writes:
                continue
            plans[tenant] = plan
            if settings.confirm:
                changed = {c.actor for c in plan.applied}
                replies += [self._confirmation(e, settings.confirmation(actions[e.message_id]), now)
                            for e in mos if f"mo:{e.message_id}" in changed]
        return plans, replies

    def _confirmation(self, mo: Event, text: str, now: datetime) -> Write:
        encoding, parts = count_parts(text)
        log.info("inbound message=%s tenant=%s: confirmation of %s to %s", mo.message_id, mo.tenant_id,
                 mo.data.get("consent"), mo.data["from"])
        return accepted(new_message_id(), mo.tenant_id, Submission(
            to=mo.data["from"], sender=mo.data["to"], text=text, encoding=encoding, parts=parts, transactional=True,
            validity_s=CONFIRM_VALIDITY_S, client_ref=f"consent:{mo.message_id}"), now)

    def _event(self, message_id: str, p: DeliverSm, tenant: str, now: datetime, reply_to: str | None,
               alphabet: MoAlphabet) -> Event:
        decoded, concat = mo_text(p, alphabet)
        data: dict[str, Any] = {"from": e164(p.source), "to": e164(p.destination), "text": decoded.text,
                                "data_coding": p.data_coding}
        if decoded.undecodable is not None:
            data["undecodable"] = decoded.undecodable.hex()
            log.warning("route=%s message=%s tenant=%s: MO from=%s data_coding=%d (mo_alphabet %s) has bytes "
                        "not valid in its alphabet; text keeps U+FFFD, raw payload in data.undecodable",
                        self.route_id, message_id, tenant, e164(p.source), p.data_coding, alphabet.value)
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

    def _orphan(self, p: DeliverSm, now: datetime, alphabet: MoAlphabet) -> dict[str, Any]:
        decoded, _ = mo_text(p, alphabet)
        return {"at": now, "kind": "mo_unassigned", "route_id": self.route_id,
                "smsc_message_id": p.receipted_message_id, "source": p.source, "destination": p.destination,
                "esm_class": p.esm_class,
                "data_coding": p.data_coding, "short_message": p.short_message, "text": decoded.text,
                "undecodable": None if decoded.undecodable is None else decoded.undecodable.hex(), "stat": None}
