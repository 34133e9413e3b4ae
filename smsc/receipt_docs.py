"""The documents a connector's receipt desk writes (smsc/receipts.py): the events that follow a
`sent` event (built without a model: hot path), the tenants' spend of a batch, and the record of a
receipt or MO that matched nothing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from core.domain.events import SCHEMA_VERSION
from core.store.topics import Write
from smsc.session import DeliverSm


def doc_after_sent(sent: dict[str, Any], seq: int, kind: str, at: datetime, data: dict[str, Any]) -> dict[str, Any]:
    """An event document following a `sent` event (hot path: no model)."""
    doc = {"message_id": sent["message_id"], "seq": seq, "type": kind, "at": at, "tenant_id": sent["tenant_id"],
           "route_id": sent.get("route_id"), "channel": sent.get("channel", "sms"), "v": SCHEMA_VERSION,
           "data": data}
    if sent.get("notify") is not None:
        doc["notify"] = sent["notify"]
    return doc


def billed_per_tenant(writes: Sequence[Write]) -> dict[str, int]:
    """Each tenant's total of the `billed` events in `writes` (its spend update)."""
    per_tenant: dict[str, int] = {}
    for w in writes:
        for e in w.events:
            if e["type"] == "billed":
                per_tenant[e["tenant_id"]] = per_tenant.get(e["tenant_id"], 0) + int(e["data"]["amount"])
    return per_tenant


def orphan_doc(p: DeliverSm, now: datetime, kind: str) -> dict[str, object]:
    return {"at": now, "kind": kind, "smsc_message_id": p.receipt.id if p.receipt else p.receipted_message_id,
            "source": p.source, "destination": p.destination, "esm_class": p.esm_class,
            "short_message": p.short_message, "stat": p.receipt.stat if p.receipt else None}
