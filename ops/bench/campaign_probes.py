"""The campaign benchmark's view of the SMSC: the simulator's journal followed as it grows, and the
one-time-password probes a second tenant posts, timed until their submit_sm reaches the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from ops.bench.campaign_csv import CAMPAIGN_PREFIX, PROBE_PREFIX
from ops.bench.support import line, note, pct


class Journal:
    """Follows the simulator's JSONL journal: campaign submit_sm per second (by the journal's own `at`,
    read without parsing the line) and the arrival time of each probe number (parsed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.rest = b""
        self.per_second: Counter[str] = Counter()  # "YYYY-mm-ddTHH:MM:SS" -> campaign submit_sm
        self.campaign_total = 0
        self.other = 0
        self.probes: dict[str, float] = {}  # destination -> epoch seconds at the SMSC

    def poll(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        if not data:
            return
        self.offset += len(data)
        data = self.rest + data
        cut = data.rfind(b"\n") + 1
        self.rest = data[cut:]
        for row in data[:cut].splitlines():
            if b'"destination": "' + PROBE_PREFIX.encode() in row:
                entry = json.loads(row)
                self.probes.setdefault(entry["destination"], datetime.fromisoformat(entry["at"]).timestamp())
            elif b'"destination": "' + CAMPAIGN_PREFIX.encode() in row and row.startswith(b'{"at": "'):
                self.per_second[row[8:27].decode()] += 1
                self.campaign_total += 1
            else:
                self.other += 1

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        self.poll()

    def between(self, start: float, end: float) -> int:
        """Campaign submit_sm whose journal second lies in [start, end) (epoch seconds, whole seconds)."""
        return sum(self.per_second.get(datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%dT%H:%M:%S"), 0)
                   for s in range(int(start), int(end)))


# ---- probes: one-time passwords from a second tenant ---------------------------------------------


@dataclass
class Probe:
    phase: str
    number: str
    posted: float  # epoch seconds just before the POST was sent
    post_ms: float = float("nan")
    status: int = 0
    message_id: str = ""


class Prober:
    def __init__(self, http: httpx.AsyncClient, journal: Journal) -> None:
        self.http, self.journal = http, journal
        self.probes: list[Probe] = []
        self.seq = 0

    async def one(self, phase: str) -> None:
        self.seq += 1
        number = f"+{PROBE_PREFIX}{self.seq:09d}"
        probe = Probe(phase, number, time.time())
        self.probes.append(probe)
        t0 = time.perf_counter()
        try:
            r = await self.http.post("/v1/messages", json={"to": number, "from": "Bank",
                                                           "text": f"Your code is {self.seq % 1_000_000:06d}"})
            probe.status = r.status_code
            if r.status_code == 202:
                probe.message_id = r.json()["id"]
        except httpx.HTTPError as e:
            note(f"probe {number}: POST failed: {e!r}")
            probe.status = -1
        probe.post_ms = 1000 * (time.perf_counter() - t0)

    async def every(self, interval: float, phase: str, stop: asyncio.Event) -> None:
        """One probe every `interval` seconds (not waiting for the previous one) until `stop`."""
        tasks: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            task = asyncio.create_task(self.one(phase))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
        if tasks:
            await asyncio.gather(*tasks)

    def delays_ms(self, phase: str) -> tuple[list[float], int]:
        """SMSC arrival delay of each accepted probe of `phase`, and how many never arrived (yet)."""
        mine = [p for p in self.probes if p.phase == phase and p.status == 202]
        arrived = [1000 * (self.journal.probes[p.number.lstrip("+")] - p.posted) for p in mine
                   if p.number.lstrip("+") in self.journal.probes]
        return arrived, len(mine) - len(arrived)

    async def wait_arrivals(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pending = [p for p in self.probes if p.status == 202 and p.number.lstrip("+") not in self.journal.probes]
            if not pending:
                return
            await asyncio.sleep(0.2)

    async def stages(self, db: Any, phase: str) -> dict[str, list[float]]:
        """Where a probe's time went, from its events in the log: POST -> accepted (the API's commit),
        accepted -> routed (router), routed -> sent (connector claim, submit_sm and its response, commit)."""
        mine = {p.message_id: p for p in self.probes if p.phase == phase and p.message_id}
        at: dict[str, dict[str, float]] = {m: {} for m in mine}
        async for e in db["events"].find({"message_id": {"$in": list(mine)}, "type": {"$in": ["accepted", "routed",
                                                                                                  "sent"]}},
                                         {"message_id": 1, "type": 1, "at": 1}):
            at[e["message_id"]].setdefault(e["type"], e["at"].replace(tzinfo=UTC).timestamp())
        out: dict[str, list[float]] = {"POST->accepted": [], "accepted->routed": [], "routed->sent": []}
        for m, p in mine.items():
            t = at[m]
            if "accepted" in t:
                out["POST->accepted"].append(1000 * (t["accepted"] - p.posted))
            if "accepted" in t and "routed" in t:
                out["accepted->routed"].append(1000 * (t["routed"] - t["accepted"]))
            if "routed" in t and "sent" in t:
                out["routed->sent"].append(1000 * (t["sent"] - t["routed"]))
        return out

    def print_phase(self, phase: str, label: str) -> None:
        values, missing = self.delays_ms(phase)
        posts = [p.post_ms for p in self.probes if p.phase == phase]
        refused = sum(1 for p in self.probes if p.phase == phase and p.status != 202)
        extra = f", {missing} not at the SMSC" if missing else ""
        extra += f", {refused} POSTs refused/failed" if refused else ""
        line(label, f"p50 {pct(values, 50):6.0f} ms  p95 {pct(values, 95):6.0f} ms  p99 {pct(values, 99):6.0f} ms"
                    f"  max {max(values) if values else float('nan'):6.0f} ms  (n={len(values)}{extra};"
                    f" POST p50 {pct(posts, 50):.0f} ms, max {max(posts) if posts else float('nan'):.0f} ms)")
