"""Step 3 of the projector benchmark: `projections.rebuild.rebuild` of the schema from the whole log,
and the cost of the queries its catch-up makes."""

from __future__ import annotations

import argparse
import gc
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bson import ObjectId
from pymongo import DESCENDING
from pymongo.asynchronous.collection import AsyncCollection

from ops.bench.projector_support import Figures, RssSampler, log, pg_count
from projections.rebuild import rebuild

CATCHUP_MARGIN = timedelta(seconds=300)  # Projector's default catchup_margin_s


async def catchup_probe(events: AsyncCollection[dict[str, Any]], batch: int, fig: Figures) -> None:
    """Cost of the queries the rebuild's catch-up makes against the full log: one page of the
    `_id`-range scan (the Projector's catch-up page) and the newest event by `_id`."""
    now = datetime.now(UTC)
    lo, hi = ObjectId.from_datetime(now - CATCHUP_MARGIN), ObjectId.from_datetime(now + CATCHUP_MARGIN)
    t0 = time.perf_counter()
    page = await events.find({"_id": {"$gte": lo, "$lte": hi}}, sort=[("_id", 1)], limit=batch).to_list(None)
    t1 = time.perf_counter()
    await events.find({}, {"message_id": 1, "seq": 1}).sort("_id", DESCENDING).limit(1).to_list(1)
    t2 = time.perf_counter()
    fig.add("catch-up page query (_id range, limit batch)", f"{t1 - t0:9.2f} s   ({len(page)} events in the "
            f"{CATCHUP_MARGIN.total_seconds():.0f} s window now)")
    fig.add("newest-event query (sort _id desc, limit 1)", f"{t2 - t1:9.2f} s")


async def rebuild_step(args: argparse.Namespace, events: AsyncCollection[dict[str, Any]], pg_url: str,
                       schema: str, total: int, sampler: RssSampler, fig: Figures) -> None:
    print(f"\n3. Rebuild of schema {schema} from the whole log ({total} events), batch {args.batch}, "
          "no live projector running")
    phases: list[tuple[float, str]] = []
    last_progress = [time.perf_counter()]

    def on_phase(text: str) -> None:
        phases.append((time.perf_counter(), text))
        log(f"rebuild: {text}")

    def on_progress(done: int, estimate: int) -> None:
        if time.perf_counter() - last_progress[0] >= 30:
            last_progress[0] = time.perf_counter()
            log(f"rebuild: replayed {done}/{estimate}")

    gc.collect()
    sampler.set_phase("rebuild-baseline")
    sampler.set_phase("rebuild")
    t0 = time.perf_counter()
    result = await rebuild(events, pg_url, schema, batch_size=args.batch, stop_live=True,
                           catch_up_timeout_s=args.timeout, progress=on_progress, phase=on_phase)
    wall = time.perf_counter() - t0
    sampler.set_phase("after")
    rows = await pg_count(pg_url, schema, "message_events")
    fig.add("rebuild: wall time", f"{wall:9.1f} s   (RebuildResult.seconds {result.seconds:.1f})")
    fig.add("rebuild: events/s (replayed+followed / wall)",
            f"{(result.replayed + result.followed) / wall:9.0f} events/s   "
            f"({result.replayed} replayed, {result.followed} followed)")
    ends = [*phases[1:], (t0 + wall, "end")]
    labels = {"replaying": "replay into the shadow", "catching": "catch-up (shadow projector)",
              "stopping": "stop the live projector (lock)", "final": "final catch-up", "swapping": "swap"}
    for (t_start, text), (t_end, _) in zip(phases, ends, strict=True):
        label = labels.get(text.split()[0])
        if label is None:
            continue
        extra = ""
        if text.startswith("replaying"):
            extra = f"   -> {result.replayed / max(t_end - t_start, 1e-9):.0f} events/s"
        fig.add(f"rebuild phase: {label}", f"{t_end - t_start:9.1f} s{extra}")
    base = sampler.peaks.get("rebuild-baseline", {})
    peak = sampler.peaks.get("rebuild", {})
    for k in sorted(peak):
        fig.add(f"rebuild: peak RSS {k}", f"{peak[k]:9.0f} MB   (before: {base.get(k, float('nan')):.0f} MB)")
    fig.add("rebuild: message_events rows after swap", f"{rows:9d}   (log: {total})")

