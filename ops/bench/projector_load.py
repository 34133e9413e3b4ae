"""Step 1 of the projector benchmark: full message lifecycles generated as event documents and
loaded straight into a fresh `events` collection."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from core.store.eventstore import EventStore
from ops.bench.projector_support import Figures, log

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli")
# (route id, price per part in minor units, currency, share of the traffic)
ROUTES = (("de-tmo", 5, "EUR", 4), ("de-vf", 6, "EUR", 3), ("uk-o2", 4, "GBP", 2), ("intl", 9, "EUR", 1))
EVENTS_PER_MESSAGE = 5


def ulid(ms: int, salt: int, index: int) -> str:
    """A ULID-shaped message id: time-ordered like `core.ids.new_message_id`, unique by `index`."""
    value = (ms << 80) | ((salt & 0xFFFFFF) << 56) | (index & (2**56 - 1))
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))




@dataclass
class Lifecycles:
    """Generates full message lifecycles as event documents, in the order the log would hold them."""

    salt: int
    rng: random.Random = field(default_factory=lambda: random.Random(4711))
    _route_pool: list[tuple[str, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._route_pool = [(r, p, c) for r, p, c, share in ROUTES for _ in range(share)]

    def message(self, index: int, accepted_at: datetime) -> list[dict[str, Any]]:
        rng = self.rng
        tenant = TENANTS[index % len(TENANTS)]
        route, price, currency = rng.choice(self._route_pool)
        parts = 1 if rng.random() < 0.8 else rng.randint(2, 4)
        ms = int(accepted_at.timestamp() * 1000)
        mid = ulid(ms, self.salt, index)
        campaign = f"{tenant}-c{(index // 5000) % 40:02d}" if rng.random() < 0.4 else None
        smsc_ids = [f"{route}-{index:x}-{p}" for p in range(parts)]
        delivered = rng.random() >= 0.06
        t_routed = accepted_at + timedelta(milliseconds=rng.randint(5, 80))
        t_sent = t_routed + timedelta(milliseconds=rng.randint(20, 400))
        t_receipt = t_sent + timedelta(milliseconds=rng.randint(800, 20_000))
        t_billed = t_receipt + timedelta(milliseconds=rng.randint(5, 200))
        receipt = {"route_id": route, "smsc_message_id": smsc_ids[0], "stat": "DELIVRD" if delivered else "UNDELIV",
                   "err": "000" if delivered else "001", "done_at": t_receipt}
        kinds: list[tuple[str, datetime, dict[str, Any]]] = [
            ("accepted", accepted_at, {
                "to": f"+49151{index % 10**8:08d}", "sender": tenant, "text": f"Your code is {index % 10**6:06d}",
                "encoding": "gsm7", "parts": parts, "priority": 0 if campaign else 10, "validity_s": 172_800,
                "send_at": None, "campaign_id": campaign, "client_ref": None}),
            ("routed", t_routed, {"route_id": route, "price_per_part": price, "currency": currency,
                                  "strategy": "failover"}),
            ("sent", t_sent, {"route_id": route, "smsc_message_ids": smsc_ids, "attempt": 1, "parts": parts}),
            ("delivered" if delivered else "undelivered", t_receipt, receipt),
            ("billed", t_billed, {"route_id": route, "parts": parts, "price_per_part": price,
                                  "amount": parts * price, "currency": currency}),
        ]
        return [{"message_id": mid, "seq": seq, "type": kind, "at": _ms(at), "tenant_id": tenant,
                 "route_id": None if kind == "accepted" else route, "channel": "sms", "v": 1, "data": data}
                for seq, (kind, at, data) in enumerate(kinds, start=1)]

    def chunks(self, first: int, messages: int, start: datetime, spacing_s: float,
               per_chunk: int) -> Iterator[list[dict[str, Any]]]:
        """Events of `messages` messages (indexes from `first`), `per_chunk` messages at a time,
        each chunk in time order (messages accepted `spacing_s` apart, many in flight at once)."""
        for lo in range(0, messages, per_chunk):
            docs: list[dict[str, Any]] = []
            for i in range(lo, min(messages, lo + per_chunk)):
                docs.extend(self.message(first + i, start + timedelta(seconds=i * spacing_s)))
            docs.sort(key=lambda d: d["at"])
            yield docs


def _ms(t: datetime) -> datetime:
    return t.replace(microsecond=t.microsecond // 1000 * 1000)



async def load(events: AsyncCollection[dict[str, Any]], gen: Lifecycles, n: int, days: float, insert_batch: int,
               fig: Figures) -> int:
    messages = max(1, n // EVENTS_PER_MESSAGE)
    start = datetime.now(UTC) - timedelta(days=days, hours=1)
    spacing = days * 86_400 / messages
    per_chunk = max(1, insert_batch // EVENTS_PER_MESSAGE)
    await EventStore(events.database).ensure_indexes()
    inserted, gen_s, last_report = 0, 0.0, time.perf_counter()
    t0 = time.perf_counter()
    chunks = gen.chunks(0, messages, start, spacing, per_chunk)
    while True:
        g0 = time.perf_counter()
        docs = next(chunks, None)
        gen_s += time.perf_counter() - g0
        if docs is None:
            break
        await events.insert_many(docs, ordered=False)
        inserted += len(docs)
        if time.perf_counter() - last_report >= 15:
            last_report = time.perf_counter()
            log(f"load: {inserted}/{messages * EVENTS_PER_MESSAGE} events, "
                f"{inserted / (last_report - t0):.0f} docs/s")
    wall = time.perf_counter() - t0
    print(f"\n1. Load: {inserted} events ({messages} messages, {len(TENANTS)} tenants, {len(ROUTES)} routes, "
          f"{days:g} days) in insert_many batches of {per_chunk * EVENTS_PER_MESSAGE} (unordered)")
    fig.add("load rate (wall, incl. generating docs)", f"{inserted / wall:9.0f} docs/s   ({wall:.1f} s)")
    fig.add("load rate (server time only)", f"{inserted / max(wall - gen_s, 1e-9):9.0f} docs/s   "
            f"({wall - gen_s:.1f} s inserting, {gen_s:.1f} s generating)")
    return inserted

