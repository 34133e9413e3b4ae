"""Check 3, attempts: every attempt not yet covered by its consumer's checkpoint, in flight (a note)
or unresolved."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from ops.verify.report import ASCENDING, VerifyReport, aware

if TYPE_CHECKING:  # the driver's types only: the driver itself is core/store's business
    from core.store.database import Database


async def check_attempts(report: VerifyReport, db: Database, now: datetime, stale_after_s: float
                         ) -> None:
    """Every attempt whose range reaches past its consumer's checkpoint (read after the attempt, so a
    batch that committed meanwhile is not listed): a note while in flight, `attempt_unresolved` once
    older than `stale_after_s`."""
    attempts = [d async for d in db["attempts"].find({}).sort("at", ASCENDING)]
    if not attempts:
        return
    ids = {f"{d['owner'].partition('|')[0]}|{t}" for d in attempts for t in d.get("ranges", {})}
    checkpoints = {d["_id"]: int(d["pos"]) async for d in db["checkpoints"].find({"_id": {"$in": sorted(ids)}})}
    owners = {d["_id"]: d async for d in db["owners"].find({"_id": {"$in": sorted({d["owner"] for d in attempts})}})}
    for a in attempts:
        consumer = a["owner"].partition("|")[0]
        open_ranges = {t: (s, e) for t, (s, e) in a.get("ranges", {}).items()
                       if e > checkpoints.get(f"{consumer}|{t}", 0)}
        if not open_ranges:
            continue
        report.counts["attempts_open"] += 1
        at = aware(a.get("at"))
        age = (now - at).total_seconds() if isinstance(at, datetime) else float("inf")
        owner = owners.get(a["owner"]) or {}
        current = "current" if owner.get("epoch") == a.get("epoch") else f"owner now at epoch {owner.get('epoch')}"
        ranges = ", ".join(f"{t}[{s},{e}) checkpoint {checkpoints.get(f'{consumer}|{t}', 0)}"
                           for t, (s, e) in sorted(open_ranges.items()))
        detail = (f"attempt {a['_id']} owner {a['owner']} epoch {a.get('epoch')} ({current}, holder "
                  f"{owner.get('holder', '?')}) age {age:.0f}s: {ranges}; {len(a.get('message_ids') or [])} messages")
        if age <= stale_after_s:
            report.note("attempt_in_flight", None, detail)
        else:
            report.add("attempt_unresolved", None, detail + ": no owner resolved it; is a connector running?")
