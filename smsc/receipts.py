"""Delivery receipts and MO of one route's binds: correlation, part assembly, one commit per flush.

Contract:
- A deliver_sm is acknowledged only after what it says is committed (its final event, or its copy in
  `part_receipts` / `orphan_receipts`), or when it changes nothing (an intermediate stat, a
  duplicate). A crash before that makes the SMSC deliver it again.
- Correlation: one `EventLog.sent_by_smsc_ids` query per flush for every receipt that came in (and
  every one still held). A receipt whose id matches no `sent` yet overtook our own commit of it (or a
  peer's): it is held, unacknowledged, while that commit is pending here or for RECEIPT_HOLD_S, and
  only then kept in `orphan_receipts` (counted in `orphan_receipts`).
- The final event (`delivered`, or `undelivered` with the first failing part's stat; a long message
  lists each part) and `billed` are written in ONE commit per flush with the tenants' spend. They take
  the seqs after the `sent` event; if the expirer or a duplicate receipt took them meanwhile, the
  message is folded again and what still fits is written (after `expired` the outcome is recorded,
  the message is never billed twice; after a final event nothing is: a duplicate).
- Long messages: the final event is written once every part's final receipt is in. Part receipts
  wait in memory, unacknowledged; one that waited PART_HOLD_S goes to `part_receipts` (`_id` = SMSC
  id) and is acknowledged, so a small deliver window is not blocked; the final decision reads it back
  (also after a restart).
- MO: `InboundRecorder.record`, then acknowledged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from core import metrics
from core.domain.outcomes import (
    PartStat,
    StatKind,
    billed_data,
    final_receipt,
    normal_stat,
    receipt_events,
    stat_kind,
)
from core.store.database import TRANSIENT_ERRORS
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.topics import Write, spend_updates
from smsc.inbound import InboundRecorder
from smsc.pdu import ReceiptFields
from smsc.receipt_docs import billed_per_tenant, doc_after_sent, orphan_doc
from smsc.session import DeliverSm, SessionError, SmppSession

log = logging.getLogger(__name__)

RECEIPT_HOLD_S = 60.0
PART_HOLD_S = 10.0  # a part receipt waits this long in memory for its siblings, then goes to `part_receipts`
PART_FORGET_S = 3600.0  # persisted part progress is dropped from memory after this (it stays in the collection)
RECENT_SENT_MAX = 20_000  # SMSC ids of our own recent `sent` events kept for matching receipts
_SENT_FIELDS = ("smsc_message_ids", "route_id", "parts", "price_per_part", "currency")

Pdus = list[tuple[DeliverSm, SmppSession]]
T = TypeVar("T")


async def side(op: Awaitable[T]) -> T:
    """Await a write to a side collection (`part_receipts`, `orphan_receipts`, the MO recorder),
    translating driver errors to StoreUnavailable like core/store does."""
    # TODO(lead): these collections deserve an adapter in core/store; until then the translation
    # lives here so the connector's loops handle one error type.
    try:
        return await op
    except StoreUnavailable:
        raise
    except TRANSIENT_ERRORS as e:
        raise StoreUnavailable(str(e)) from e


@dataclass
class PartReceipt:
    """The final receipt of one part of a sent message, waiting for the other parts' receipts.
    `pdu`/`session` are None once it was acknowledged (after being written to `part_receipts`)."""

    receipt: ReceiptFields
    stat: str
    pdu: DeliverSm | None
    session: SmppSession | None
    since: datetime

    def part(self) -> PartStat:
        return PartStat(self.receipt.id, self.stat, self.receipt.err, self.receipt.done_date)


@dataclass
class _Open:
    """A message with a receipt in this flush: its `sent` event and the part receipts so far."""

    sent: dict[str, Any]
    smsc_ids: list[str]


class ReceiptDesk:
    """Takes deliver_sm from the binds (`add`) and records them on `flush`. `awaiting_commit` holds
    the SMSC ids whose `sent` this process has not committed yet (the sender keeps it)."""

    def __init__(self, store: EventStore, route_id: str, stats: dict[str, int]) -> None:
        self.store = store
        self.log = store.log
        self.route_id = route_id
        self.stats = stats
        self.inbound = InboundRecorder(store, route_id)
        self.fresh: Pdus = []
        self.held: dict[str, tuple[Pdus, datetime]] = {}
        self.parts: dict[str, dict[str, PartReceipt]] = {}  # message id -> smsc id -> part
        self.awaiting_commit: set[str] = set()
        # The `sent` events this process committed, by SMSC id: most receipts match one of them without
        # a query (a miss, e.g. after a restart or for an old message, asks the log).
        self.recent_sent: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._lock = asyncio.Lock()  # one flush at a time (the loop's and a stopping connector's final one)
        self._to_receipt = metrics.SUBMIT_TO_RECEIPT.labels(route=route_id)

    def remember_sent(self, doc: dict[str, Any]) -> None:
        """A `sent` event just committed by this process (only the fields a receipt needs are kept)."""
        data = doc["data"]
        slim = {"message_id": doc["message_id"], "seq": doc["seq"], "tenant_id": doc["tenant_id"],
                "route_id": doc.get("route_id"), "channel": doc.get("channel", "sms"), "at": doc.get("at"),
                "notify": doc.get("notify"),
                "data": {k: data[k] for k in _SENT_FIELDS if k in data}}
        cache = self.recent_sent
        for smsc_id in data.get("smsc_message_ids", ()):
            cache[smsc_id] = slim
        while len(cache) > RECENT_SENT_MAX:
            cache.popitem(last=False)

    def _sent_for(self, ask: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """(`sent` events known here for these SMSC ids, the ids to ask the log about)."""
        found: dict[int, dict[str, Any]] = {}
        missing = []
        for smsc_id in ask:
            doc = self.recent_sent.get(smsc_id)
            if doc is None:
                missing.append(smsc_id)
            else:
                found[id(doc)] = doc
        return list(found.values()), missing

    def add(self, pdu: DeliverSm, session: SmppSession) -> None:
        self.fresh.append((pdu, session))

    @property
    def busy(self) -> bool:
        return bool(self.fresh or self.held or self.parts)

    async def forget_unacknowledged(self) -> None:
        """Drop every deliver_sm not acknowledged yet (their binds are gone: the SMSC delivers them
        again on a later bind, to whichever connector owns the route then)."""
        async with self._lock:
            self._forget()

    def _forget(self) -> None:
        self.fresh.clear()
        self.held.clear()
        for mid in list(self.parts):
            kept = {sid: p for sid, p in self.parts[mid].items() if p.pdu is None}
            if kept:
                self.parts[mid] = kept
            else:
                del self.parts[mid]

    async def flush(self, now: datetime) -> None:
        """Record what came in. On a store error everything stays in memory, unacknowledged, for the
        next flush (StoreUnavailable is raised)."""
        async with self._lock:
            await self._flush(now)

    async def _flush(self, now: datetime) -> None:
        fresh, self.fresh = self.fresh, []
        try:
            mo = [r for r in fresh if r[0].receipt is None]
            if mo:
                result = await side(self.inbound.record([p for p, _ in mo], now))
                self.stats["mo"] += len(result.committed)
                self.stats["mo_unassigned"] += result.unassigned
                for p, session in mo:
                    ack(session, p)
                fresh = [r for r in fresh if r[0].receipt is not None]
            if fresh or self.held or self.parts:
                await self._receipts(fresh, now)
        except BaseException:
            self.fresh = fresh + self.fresh
            raise

    # ---- receipts -----------------------------------------------------------------------------

    async def _receipts(self, fresh: Pdus, now: datetime) -> None:
        pending: dict[str, Pdus] = {k: list(v) for k, (v, _) in self.held.items()}
        for p, session in fresh:
            assert p.receipt is not None
            pending.setdefault(p.receipt.id, []).append((p, session))
        # Receipts of our own submits whose `sent` is still being committed cannot match yet: they
        # wait without a query (pipelined commits make this the common case with a fast SMSC).
        ask = [i for i in pending if i not in self.awaiting_commit]
        if pending:
            sent, missing = self._sent_for(ask)
            if missing:
                sent += await self.log.sent_by_smsc_ids(missing)
            matched = await self._apply(sent, pending, now)
            await self._settle_unmatched(pending, matched, now)
        await self._persist_waiting_parts(now)

    async def _apply(self, sent: list[dict[str, Any]], pending: dict[str, Pdus], now: datetime) -> set[str]:
        """Fold the receipts into each message's part progress; commit the messages now complete.
        Returns the SMSC ids that matched a `sent` event."""
        matched: set[str] = set()
        acks: Pdus = []
        opened: dict[str, _Open] = {}
        for doc in sent:
            smsc_ids = list(doc["data"].get("smsc_message_ids", ()))
            hits = [i for i in smsc_ids if i in pending]
            if not hits:
                continue
            matched.update(hits)
            mid = doc["message_id"]
            for i in hits:
                for p, session in pending[i]:
                    assert p.receipt is not None
                    stat = normal_stat(p.receipt.stat)
                    kind = stat_kind(stat)
                    if kind in (StatKind.DELIVERED, StatKind.UNDELIVERED):
                        self._add_part(mid, i, p, session, stat, now, acks)
                        continue
                    if kind == StatKind.UNKNOWN:
                        log.warning("connector message=%s tenant=%s route=%s: receipt with unknown stat %r for "
                                    "smsc id %s taken as intermediate", mid, doc["tenant_id"], self.route_id,
                                    p.receipt.stat, i)
                    self.stats["receipts_intermediate"] += 1
                    acks.append((p, session))
            known = opened.get(mid)
            if known is None or known.sent["seq"] < doc["seq"]:
                opened[mid] = _Open(doc, smsc_ids)
        await self._load_persisted_parts([o for o in opened.values() if len(o.smsc_ids) > 1])
        complete = {mid: o for mid, o in opened.items() if set(o.smsc_ids) <= set(self.parts.get(mid, ()))}
        if complete:
            await self._commit_final(complete, now, acks)
        for p, session in acks:
            ack(session, p)
        return matched

    def _add_part(self, message_id: str, smsc_id: str, p: DeliverSm, session: SmppSession, stat: str,
                  now: datetime, acks: Pdus) -> None:
        progress = self.parts.setdefault(message_id, {})
        previous = progress.get(smsc_id)
        if previous is not None and previous.pdu is p:
            return  # the same deliver_sm again (a flush that failed is being retried)
        if previous is not None and previous.pdu is not None and previous.session is not None:
            acks.append((previous.pdu, previous.session))  # superseded by a resend of the same receipt
        assert p.receipt is not None
        progress[smsc_id] = PartReceipt(p.receipt, stat, p, session, previous.since if previous else now)

    async def _commit_final(self, complete: dict[str, _Open], now: datetime, acks: Pdus) -> None:
        """Commit the final event (+ billed) of each complete message with the tenants' spend, in one
        transaction; queue its receipts for acknowledgement once committed."""
        finals = {mid: final_receipt([self.parts[mid][i].part() for i in o.smsc_ids]) for mid, o in complete.items()}
        writes = [self._write(o.sent, o.sent["seq"], *finals[mid], bill=True, now=now) for mid, o in complete.items()]
        duplicates: list[str] = []

        async def redecide(ids: list[str]) -> list[Write]:
            # The seqs after `sent` were taken meanwhile (the expirer, a duplicate receipt): fold
            # the message again and write what still fits (rare: pydantic is fine here).
            states = await self.store.states(ids)
            out = []
            for mid in ids:
                s = states.get(mid)
                record, bill = receipt_events(s.state, s.billed) if s is not None else (False, False)
                if not record or s is None:
                    duplicates.append(mid)
                    continue
                out.append(self._write(complete[mid].sent, s.version, *finals[mid], bill=bill, now=now))
            return out

        result = await self.log.commit(
            writes, extra=lambda ws: [("tenants", spend_updates(billed_per_tenant(ws), now))], redecide=redecide)
        persisted = []
        for mid in [*result.committed, *duplicates, *result.conflicts]:
            progress = self.parts.pop(mid, {})
            key = "receipts" if mid in result.committed else "receipts_duplicate"
            self.stats[key] += len(progress)
            acks.extend((part.pdu, part.session) for part in progress.values()
                        if part.pdu is not None and part.session is not None)
            if any(part.pdu is None for part in progress.values()):
                persisted.append(mid)
            if mid in result.committed:
                if (sent_at := complete[mid].sent.get("at")) is not None:  # sent -> receipt (a query's doc has none)
                    self._to_receipt.observe(max(0.0, (now - sent_at).total_seconds()))
                kind, data = finals[mid]
                log.debug("connector message=%s route=%s: %s (%s)", mid, self.route_id, kind, data["stat"])
        if persisted:  # housekeeping only: a leftover is ignored once the message has its outcome
            with contextlib.suppress(StoreUnavailable):
                await side(self.store.db["part_receipts"].delete_many({"message_id": {"$in": persisted}}))

    def _write(self, sent: dict[str, Any], after_seq: int, kind: str, data: dict[str, Any], *, bill: bool,
               now: datetime) -> Write:
        """The final event (seq after_seq + 1) and, when `bill`, `billed` (+2) of a sent message."""
        sd = sent["data"]
        route_id = sd.get("route_id", self.route_id)
        events = [doc_after_sent(sent, after_seq + 1, kind, now, {"route_id": route_id, **data})]
        if bill:
            events.append(doc_after_sent(sent, after_seq + 2, "billed", now, billed_data(
                route_id, int(sd.get("parts") or len(sd.get("smsc_message_ids") or ()) or 1),
                int(sd.get("price_per_part", 0)), sd.get("currency", "EUR"))))
        return Write(sent["message_id"], events)

    async def _settle_unmatched(self, pending: dict[str, Pdus], matched: set[str], now: datetime) -> None:
        orphans: Pdus = []
        for smsc_id, pdus in pending.items():
            held_since = self.held.get(smsc_id, ([], now))[1]
            if smsc_id in matched:
                self.held.pop(smsc_id, None)
            elif smsc_id in self.awaiting_commit or now - held_since < timedelta(seconds=RECEIPT_HOLD_S):
                # The receipt overtook our own commit of `sent`, or a peer's: hold it until that lands.
                self.held[smsc_id] = (pdus, held_since)
            else:
                self.held.pop(smsc_id, None)
                orphans.extend(pdus)
        if orphans:
            await side(self.store.db["orphan_receipts"].insert_many(
                [orphan_doc(p, now, "unknown_id") for p, _ in orphans]))
            self.stats["orphan_receipts"] += len(orphans)
            metrics.ORPHAN_RECEIPTS.labels(route=self.route_id).inc(len(orphans))
            log.warning("connector route=%s: %d receipts for unknown smsc ids (e.g. %s)", self.route_id,
                        len(orphans), orphans[0][0].receipted_message_id)
            for p, session in orphans:
                ack(session, p)

    async def _persist_waiting_parts(self, now: datetime) -> None:
        """Part receipts that waited `PART_HOLD_S` for their siblings go to `part_receipts`, then are
        acknowledged: the SMSC's deliver window must not fill with receipts we are sitting on."""
        waiting = [(mid, sid, part) for mid, progress in self.parts.items() for sid, part in progress.items()
                   if part.pdu is not None and (now - part.since).total_seconds() >= PART_HOLD_S]
        if waiting:
            docs = [{"_id": sid, "message_id": mid, "route_id": self.route_id, "stat": part.stat,
                     "err": part.receipt.err, "done_at": part.receipt.done_date, "at": now}
                    for mid, sid, part in waiting]
            coll = self.store.db["part_receipts"]
            # Replace by delete + insert: a part resent by the SMSC may be there already.
            await side(coll.delete_many({"_id": {"$in": [d["_id"] for d in docs]}}))
            await side(coll.insert_many(docs, ordered=False))
            for mid, _, part in waiting:
                if part.session is not None and part.pdu is not None:
                    ack(part.session, part.pdu)
                part.pdu, part.session = None, None
                log.info("connector message=%s route=%s: part receipt kept in part_receipts while the other parts' "
                         "receipts are awaited", mid, self.route_id)
            self.stats["part_receipts_persisted"] += len(waiting)
        forget = [mid for mid, progress in self.parts.items()
                  if all(p.pdu is None and (now - p.since).total_seconds() >= PART_FORGET_S for p in progress.values())]
        for mid in forget:
            del self.parts[mid]

    async def _load_persisted_parts(self, opened: Sequence[_Open]) -> None:
        """Fill in part receipts written to `part_receipts` earlier (by us before a restart, or after
        `PART_HOLD_S`) for the long messages whose progress in memory is incomplete."""
        ids = [o.sent["message_id"] for o in opened
               if not set(o.smsc_ids) <= set(self.parts.get(o.sent["message_id"], ()))]
        if not ids:
            return
        found = await side(self.store.db["part_receipts"].find({"message_id": {"$in": ids}}).to_list(None))
        for d in found:
            progress = self.parts.setdefault(d["message_id"], {})
            if d["_id"] not in progress:
                fields = ReceiptFields(id=d["_id"], stat=d["stat"], err=d.get("err"), done_date=d.get("done_at"))
                progress[d["_id"]] = PartReceipt(fields, d["stat"], None, None, d["at"])


def ack(session: SmppSession, pdu: DeliverSm) -> None:
    """Acknowledge on the bind the deliver_sm came in on (sequence numbers are per bind)."""
    if session.is_up:
        try:
            session.respond_deliver(pdu.sequence)
        except SessionError as e:
            log.warning("could not acknowledge deliver_sm seq=%d: %s (the SMSC will resend)", pdu.sequence, e)
