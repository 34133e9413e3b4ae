"""What a run costs the store: the server's own ceiling for event-shaped inserts, and the document
writes the run made (from the oplog)."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from core.store.mongo import connect
from core.store.topics import EventLog

TENANT = "bench"
PRICE = 5  # per part; every benchmark text is one GSM-7 part
EVENTS_PER_MESSAGE = 5  # accepted, routed, sent, delivered, billed


# ---- the store's ceiling ---------------------------------------------------------------------------


def _event_shaped(i: int, run: str) -> list[dict[str, Any]]:
    """The five events of one message, shaped and sized like the pipeline's (three carry topic/pos)."""
    mid = f"{run}{i:012d}"
    at = datetime.now(UTC)
    base = {"message_id": mid, "at": at, "tenant_id": TENANT, "route_id": "sim", "channel": "sms", "v": 1}
    msg = {"to": f"+4917{i:09d}", "sender": "bench", "text": f"Your code is {i % 1_000_000:06d}", "encoding": "gsm7",
           "parts": 1, "priority": 10}
    return [
        {**base, "seq": 1, "type": "accepted", "route_id": None, "topic": "route", "pos": i,
         "data": {**msg, "validity_s": 0, "send_at": None, "campaign_id": None, "client_ref": None}},
        {**base, "seq": 2, "type": "routed", "topic": "send:sim", "pos": i,
         "data": {"route_id": "sim", "price_per_part": PRICE, "currency": "EUR", "strategy": "smart",
                  "message": {**msg, "campaign_id": None, "attempt": 0, "expires_at": None, "accepted_at": at}}},
        {**base, "seq": 3, "type": "sent", "topic": "await:sim", "pos": i,
         "data": {"route_id": "sim", "smsc_message_ids": [f"{i:x}"], "attempt": 1, "parts": 1, "price_per_part": PRICE,
                  "currency": "EUR", "expires_at": at + timedelta(days=2)}},
        {**base, "seq": 4, "type": "delivered",
         "data": {"route_id": "sim", "smsc_message_id": f"{i:x}", "stat": "DELIVRD", "err": "000", "done_at": at}},
        {**base, "seq": 5, "type": "billed",
         "data": {"route_id": "sim", "parts": 1, "price_per_part": PRICE, "amount": PRICE, "currency": "EUR"}},
    ]


async def store_ceiling(mongo_url: str, seconds: float = 5.0, batch: int = 500) -> float:
    """Documents/s the server takes as batched inserts of event-shaped documents, `batch` per
    transaction, into a collection with the events indexes (EventLog.ensure_indexes: unique
    (message_id, seq), sparse unique (topic, pos), sparse data.smsc_message_ids)."""
    client = connect(mongo_url, "bench-ceiling")
    name = f"msgcore_ceiling_{int(time.time())}"
    try:
        log = EventLog(client[name])
        await log.ensure_indexes()
        n, i, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            docs = [d for k in range(batch // EVENTS_PER_MESSAGE) for d in _event_shaped(i + k, "CEIL")]
            i += batch // EVENTS_PER_MESSAGE

            async def body(session: Any, docs: list[dict[str, Any]] = docs) -> None:
                await log.events.insert_many(docs, ordered=False, session=session)

            await log.transaction(body)
            n += len(docs)
        return n / (time.perf_counter() - start)
    finally:
        await client.drop_database(name)
        await client.close()


# ---- what the run wrote ----------------------------------------------------------------------------


async def oplog_writes(client: Any, db_name: str, since: Any) -> Counter[tuple[str, str]]:
    """Document writes to `db_name` recorded in the oplog after `since` (transactions unpacked), by
    (collection, op): op "i" insert, "u" update, "d" delete."""
    out: Counter[tuple[str, str]] = Counter()
    prefix = db_name + "."

    def count(op: dict[str, Any]) -> None:
        ns = str(op.get("ns", ""))
        if ns.startswith(prefix) and op.get("op") in ("i", "u", "d"):
            out[(ns[len(prefix):], op["op"])] += 1

    async for entry in client.local["oplog.rs"].find({"ts": {"$gt": since}}):
        inner = entry.get("o", {}).get("applyOps") if entry.get("op") == "c" else None
        for op in inner if inner is not None else [entry]:
            count(op)
    return out
