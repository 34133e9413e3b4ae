"""Check 1, topics: every topic gapless (positions 0 .. counter-1 each held once, none past the
counter) and no checkpoint ahead of its topic's counter."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ops.verify.report import ASCENDING, BATCH, VerifyReport
from ops.verify.snapshot import LogSnapshot

if TYPE_CHECKING:  # the driver's types only: the driver itself is core/store's business
    from core.store.database import Database


async def check_topics(report: VerifyReport, db: Database, snap: LogSnapshot) -> None:
    """Positions 0 .. counter-1 of every topic, each exactly once; nothing at or past a counter that a
    fresh read of the counters does not cover; no checkpoint ahead of its counter."""
    report.counts["topics"] = len(snap.counters)
    report.counts["checkpoints"] = len(snap.checkpoints)
    for cid, pos in sorted(snap.checkpoints.items()):
        topic = cid.partition("|")[2]
        if pos > snap.counters.get(topic, 0):
            report.add("checkpoint_ahead", None, f"checkpoint {cid} at {pos} but topic {topic} ends at "
                       f"{snap.counters.get(topic, 0)}")
    beyond: dict[str, list[int]] = {}
    for topic, end in sorted(snap.counters.items()):
        beyond_here = await _scan_topic(report, db, topic, end)
        if beyond_here:
            beyond[topic] = beyond_here
    async for d in db["events"].find({"topic": {"$exists": True, "$nin": list(snap.counters)}},
                                     {"_id": 0, "topic": 1, "pos": 1}):
        beyond.setdefault(str(d["topic"]), []).append(d.get("pos", -1))
    if beyond:
        # Written after the counters were read (a commit takes the counter and inserts at once): a
        # fresh counter covers them. One that still does not is a position no counter ever gave.
        fresh = {d["_id"]: int(d["pos"]) async for d in db["topics"].find({"_id": {"$in": list(beyond)}})}
        for topic, positions in sorted(beyond.items()):
            bad = sorted(p for p in positions if p >= fresh.get(topic, 0))
            if bad:
                report.add("position_beyond_counter", None, f"topic {topic}: positions {ranges(bad)} at or past "
                           f"its counter ({fresh.get(topic, 'none')})")


async def _scan_topic(report: VerifyReport, db: Database, topic: str, end: int) -> list[int]:
    """Check positions [0, end) of `topic` through the (topic, pos) index; return the positions found
    at or past `end`."""
    expected = 0
    twice: list[int] = []
    missing: list[int] = []
    beyond: list[int] = []
    cursor = db["events"].find({"topic": topic}, {"_id": 0, "pos": 1}, batch_size=BATCH).sort("pos", ASCENDING)
    async for d in cursor:
        pos = d.get("pos")
        if not isinstance(pos, int):
            report.add("topic_gap", None, f"topic {topic}: an event without an integer pos ({pos!r})")
        elif pos >= end:
            beyond.append(pos)
        elif pos < expected:
            twice.append(pos)
        else:
            report.counts["positions"] += 1
            missing.extend(range(expected, pos))
            expected = pos + 1
    missing.extend(range(expected, end))
    if missing:
        report.add("topic_gap", None, f"topic {topic}: {len(missing)} of positions [0, {end}) hold no event, "
                   f"e.g. {ranges(missing)}")
    if twice:
        report.add("position_twice", None, f"topic {topic}: positions held by two events: {ranges(twice)}")
    return beyond


def ranges(positions: Sequence[int], show: int = 5) -> str:
    """`3, 7-9, 12` for sorted positions (the first `show` runs)."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:show])
    return text + (f" ... ({len(runs) - show} more runs)" if len(runs) > show else "")
