"""Campaign benchmark: a large recipient list (1,000,000 by default) end to end on the embedded default.

    python -m ops.bench_campaign [--recipients 1000000] [--run-seconds 180] [--probe-interval 2]

Uses MSGCORE_MONGO_URL / MSGCORE_PG_URL if set, else starts the embedded servers (SecantusDB, the
MongoDB-wire server, and PostgreSQL) in a temp dir, then every component as its own process
(ops/stack.py), one simulator route `sim` and two tenants: `shop` runs the campaign, `bank` sends
one-time passwords (single transactional messages). Not a test: nothing here asserts.

Phases and the figures printed for each:

1. CSV: N rows `phone,first_name,store_name` written to a temp file. About 3 % of the rows have a
   first name outside GSM 03.38 (their message goes out as UCS-2), 0.1 % an invalid phone, 0.1 % an
   empty first name (`missing_tag`), 0.1 % a phone written as `0049 151 ...` (valid after
   normalisation) and 0.2 % repeat an earlier row's number (duplicates). Every rendered text fits one
   SMS part. Printed: generation time, file size, and the counts the upload report should give.
2. Upload: `POST /v1/campaigns/{id}/recipients`, the body streamed from the file. Printed: wall time
   (request start to report), the time the body took to send (the server spools it to disk while it
   arrives), rows/s over the wall time and over the part after the body was sent (validation pass,
   then render and accept in transactions of 1,000 rows), the report's counts, the api process's
   peak RSS during the upload (sampled VmRSS every 0.2 s, and VmHWM, the kernel's high-water mark
   since the process started) next to its RSS before, and CPU seconds per process in the phase.
3. Idle baseline: `--baseline-probes` one-time passwords, before the campaign starts (its messages
   are accepted and waiting in their draft lane), with the SMSC arrival delay of each: the time the
   simulator's journal recorded its submit_sm minus the time just before its POST was sent. The
   simulator and the benchmark share one clock. Also printed: how many of the campaign's messages
   the projector had written to PostgreSQL when the baseline began (it may still be catching up).
4. Flow: the campaign is started and left to run for `--run-seconds`. Every `--probe-interval`
   seconds the `bank` tenant posts one message (the same probe as above, now competing with the
   campaign). Printed: campaign submit_sm arrivals at the SMSC per second over the whole window
   (from the journal's own timestamps) and over the window minus its first 10 s (steady state),
   the time the whole campaign would take at that rate, its completion and ETA from the lane's
   counters and checkpoints (entries the connector passed, what still waits in the route and send
   topics, the connector's rate over the steady window), the API's own progress figures and its
   counts by state (from PostgreSQL, following the log with the projector's lag), CPU per process
   in the window (the store servers included: CPU at 100 % of a core marks the bottleneck), and
   the probes' arrival delay p50/p95/p99/max (plus the POST's own response time). The same
   probes also run during the upload (phase 2): the delay of a one-time password while an upload
   is being accepted. Under each probe line, where the time went, from the probes' events in the log:
   POST -> accepted, accepted -> routed, routed -> sent. Each stage stamps its event when it takes
   the batch, before its commit, so a slow commit shows in the next interval (a slow API commit in
   accepted -> routed, not in POST -> accepted); `sent` is stamped after the submit_sm_resp.
5. Cancel: `POST .../cancel`, then watch for at most `--cancel-watch` seconds (default 60). The
   campaign's lane turns `canceling`; its consumers (the router on `route~c:<id>`, the connector on
   `send:sim~c:<id>`) append `canceled` for every entry they read there. Progress comes from the
   lane's counters and checkpoints (ops/progress.py): what waited at the cancel (route + send backlog)
   minus what still waits is what was resolved, and of that, what the SMSC received after the cancel
   (the connector's batches already attempted) was sent, the rest canceled. The watch ends early
   once both backlogs are empty. Printed: canceled messages per second, submit_sm after the cancel,
   the campaign's status (`canceled` once the scheduler finds its lane idle) and, when the lane is not
   drained within the watch, the time the rest would take at that rate: the benchmark does not wait
   for a million cancels.
6. Config: the route's TPS and window, the stages' batch sizes and the campaign constants. The
   route has `--route-tps 0` (no limit) by default, so the embedded MongoDB-wire server, not the
   route, is what limits the campaign; pass a TPS to measure a throttled route instead.

Everything is stopped at the end (components first, then the servers) and the temp dir removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

import smsc.connector as connector_module
from api.campaign_upload import BATCH_ROWS
from core.config import Settings
from core.domain.message import campaign_lane
from core.domain.routing import Route
from core.store.campaigns import UPLOAD_QUIET_S
from core.store.lanes import LaneBook
from core.store.mongo import connect
from core.workers.router import BULK_PER_BATCH
from ops.bench_e2e import tree_cpu_s
from ops.bench_support import pct, store_servers
from ops.progress import Progress, read_progress
from ops.stack import Stack, seed

TEMPLATE = "Hi {{first_name}}! Stop by {{store_name}} today: 20% off everything."
FIRST_NAMES = ("Anna", "Jonas", "Lena", "Paul", "Mia", "Felix", "Emma", "Lukas", "Sofia", "Noah")
UNICODE_NAMES = ("Дмитрий", "Łukasz", "Zoë", "Αλέξης", "李娜", "Şebnem", "Jiří", "Ólafur")
STORES = ("Berlin Mitte", "Hamburg HBF", "Munich Marienplatz", "Cologne Dom", "Leipzig")
CAMPAIGN_PREFIX = "49151"  # campaign numbers: +49151 and 8 digits
PROBE_PREFIX = "4917"  # one-time passwords: +4917 and 9 digits
STEADY_SKIP_S = 10.0


def line(label: str, text: str) -> None:
    print(f"  {label:30} {text}", flush=True)


def note(text: str) -> None:
    """Progress while the run goes on (the figures come at the end of each phase)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# ---- 1. the CSV ---------------------------------------------------------------------------------


@dataclass
class CsvFacts:
    path: Path
    rows: int = 0
    size: int = 0
    seconds: float = 0.0
    invalid: int = 0
    duplicates: int = 0
    ucs2: int = 0

    @property
    def accepted(self) -> int:
        return self.rows - self.invalid - self.duplicates


def write_csv(path: Path, n: int) -> CsvFacts:
    """N data rows; see the module docstring for the share of each kind of row."""
    facts = CsvFacts(path, rows=n)
    start = time.perf_counter()
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("phone,first_name,store_name\n")
        chunk: list[str] = []
        for i in range(n):
            phone = f"+{CAMPAIGN_PREFIX}{i:08d}"
            name = FIRST_NAMES[i % len(FIRST_NAMES)]
            store = STORES[i % len(STORES)]
            kind = i % 1000
            if kind == 500:
                phone = f"0151 {i:08d}"  # no country: invalid_phone
                facts.invalid += 1
            elif kind == 250:
                name = ""  # missing_tag
                facts.invalid += 1
            elif kind == 750:
                phone = f"0049 151 {i:08d}"  # valid once normalised
            elif i % 500 == 499:
                phone = f"+{CAMPAIGN_PREFIX}{i - 7:08d}"  # the number of row i-7 (never an invalid one)
                facts.duplicates += 1
            if i % 33 == 16 and name:
                name = UNICODE_NAMES[i % len(UNICODE_NAMES)]
                if kind != 500 and i % 500 != 499:
                    facts.ucs2 += 1
            chunk.append(f"{phone},{name},{store}\n")
            if len(chunk) >= 10_000:
                out.write("".join(chunk))
                chunk.clear()
        out.write("".join(chunk))
    facts.seconds = time.perf_counter() - start
    facts.size = path.stat().st_size
    return facts


# ---- processes: RSS and CPU ---------------------------------------------------------------------


def proc_status_kb(pid: int, key: str) -> int:
    """A `/proc/<pid>/status` field in kB (VmRSS, VmHWM); 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for row in f:
                if row.startswith(key + ":"):
                    return int(row.split()[1])
    except OSError:
        pass
    return 0


class PeakRss(threading.Thread):
    """Samples VmRSS of one pid every 0.2 s until stopped; `peak_kb` is the largest sample."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid, "VmRSS"))


@dataclass
class Cpu:
    """CPU seconds per process: the components, and the store servers when this run started them."""

    stack: Stack
    servers: dict[str, int] = field(default_factory=dict)  # name -> pid

    def snapshot(self) -> dict[str, float]:
        out = dict(self.stack.cpu_s())
        for name, pid in self.servers.items():
            out[name] = tree_cpu_s(pid)
        return out

    @staticmethod
    def report(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
        parts = [f"{k}={after[k] - before.get(k, 0.0):.0f}s({100 * (after[k] - before.get(k, 0.0)) / seconds:.0f}%)"
                 for k in after]
        return "  ".join(parts)


# ---- the simulator's journal --------------------------------------------------------------------


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


# ---- the API ------------------------------------------------------------------------------------


async def file_chunks(path: Path, sent: dict[str, float], chunk: int = 256 * 1024) -> AsyncIterator[bytes]:
    """The file in chunks; notes when the last one was handed to the transport."""
    with path.open("rb") as f:
        while data := f.read(chunk):
            yield data
    sent["body_done"] = time.perf_counter()


async def get_campaign(http: httpx.AsyncClient, campaign_id: str) -> dict[str, Any]:
    r = await http.get(f"/v1/campaigns/{campaign_id}", timeout=60)
    r.raise_for_status()
    return dict(r.json())


async def act(http: httpx.AsyncClient, campaign_id: str, action: str) -> dict[str, Any]:
    r = await http.post(f"/v1/campaigns/{campaign_id}/{action}", timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"{action} answered {r.status_code}: {r.text[:300]}")
    return dict(r.json())


def pg_campaign_states(stack: Stack, campaign_id: str) -> dict[str, int]:
    query = sql.SQL("SELECT state, count(*) FROM {}.messages WHERE campaign_id = %s GROUP BY state").format(
        sql.Identifier(stack.schema))
    with psycopg.connect(stack.pg_url) as conn:
        return {str(s): int(n) for s, n in conn.execute(query, (campaign_id,)).fetchall()}


# ---- the run ------------------------------------------------------------------------------------


@dataclass
class Run:
    """One benchmark run's moving parts; each phase is a method and leaves its figures in `results`."""

    args: argparse.Namespace
    stack: Stack
    facts: CsvFacts
    shop: httpx.AsyncClient
    cpu: Cpu
    journal: Journal
    prober: Prober
    db: Any = None  # the run's database (core.store.mongo.connect), for counters and checkpoints
    campaign_id: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def lane(self) -> str:
        return campaign_lane(self.campaign_id)

    async def lane_progress(self) -> Progress:
        return await read_progress(self.db, with_timers=False)

    async def create(self) -> None:
        r = await self.shop.post("/v1/campaigns", json={"name": "Spring sale", "from": "Shop", "template": TEMPLATE,
                                                        "priority": "marketing"})
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/campaigns answered {r.status_code}: {r.text[:300]}")
        self.campaign_id = r.json()["id"]

    async def upload(self) -> None:
        """Phase 2, with one-time passwords posted alongside."""
        args, api_pid = self.args, self.stack.procs["api"].pid
        note(f"uploading to campaign {self.campaign_id}")
        rss_before = proc_status_kb(api_pid, "VmRSS")
        sampler = PeakRss(api_pid)
        sampler.start()
        stop_probes = asyncio.Event()
        probes_task = asyncio.create_task(self.prober.every(args.probe_interval, "upload", stop_probes))
        cpu0 = self.cpu.snapshot()
        sent: dict[str, float] = {}
        t0 = time.perf_counter()
        upload_task = asyncio.create_task(self.shop.post(
            f"/v1/campaigns/{self.campaign_id}/recipients", content=file_chunks(self.facts.path, sent),
            headers={"Content-Type": "text/csv"}, timeout=httpx.Timeout(args.upload_timeout, connect=10)))
        while not upload_task.done():
            await asyncio.wait({upload_task}, timeout=args.progress_every)
            if not upload_task.done():
                rows = (await get_campaign(self.shop, self.campaign_id))["recipients"]["rows"]
                note(f"  upload: {time.perf_counter() - t0:.0f} s, body {'sent' if sent else 'sending'},"
                     f" {rows} rows accepted or refused ({rows / self.facts.rows:.0%}), api RSS"
                     f" {proc_status_kb(api_pid, 'VmRSS') / 1024:.0f} MB")
        resp = upload_task.result()
        upload_s = time.perf_counter() - t0
        cpu1 = self.cpu.snapshot()
        sampler.done.set()
        stop_probes.set()
        await probes_task
        if resp.status_code != 200:
            raise RuntimeError(f"upload answered {resp.status_code}: {resp.text[:500]}")
        report = resp.json()
        self.results["upload"] = {
            "s": upload_s, "body_s": sent.get("body_done", t0) - t0, "report": report, "rss_before_kb": rss_before,
            "rss_peak_kb": max(sampler.peak_kb, rss_before), "hwm_kb": proc_status_kb(api_pid, "VmHWM"),
            "cpu": Cpu.report(cpu0, cpu1, upload_s)}
        note(f"upload done in {upload_s:.1f} s: {report['accepted']} accepted")
        self.results["campaign_after_upload"] = await get_campaign(self.shop, self.campaign_id)

    async def baseline(self) -> None:
        """Phase 3: one-time passwords one after another, the campaign not started."""
        await self.prober.wait_arrivals(30)
        with contextlib.suppress(psycopg.Error):
            self.results["projected_at_baseline"] = sum(pg_campaign_states(self.stack, self.campaign_id).values())
        note(f"idle baseline: {self.args.baseline_probes} probes")
        for _ in range(self.args.baseline_probes):
            await self.prober.one("idle")
            await asyncio.sleep(self.args.baseline_interval)
        await self.prober.wait_arrivals(30)

    async def flow(self) -> None:
        """Phase 4: start, let it run with a one-time password every probe interval."""
        args, journal = self.args, self.journal
        note(f"starting the campaign; flowing for {args.run_seconds:.0f} s")
        at_start = journal.campaign_total
        t_start = time.time()
        await act(self.shop, self.campaign_id, "start")
        cpu0 = self.cpu.snapshot()
        stop_probes = asyncio.Event()
        probes_task = asyncio.create_task(self.prober.every(args.probe_interval, "flow", stop_probes))
        t_end = t_start + args.run_seconds
        steady: tuple[float, int] | None = None  # (time, entries the connector passed) after STEADY_SKIP_S
        while time.time() < t_end:
            wait = min(args.progress_every, max(0.0, t_end - time.time()))
            if steady is None:
                wait = min(wait, max(0.0, t_start + STEADY_SKIP_S - time.time()))
            await asyncio.sleep(wait)
            progress = await self.lane_progress()
            if steady is None and time.time() >= t_start + STEADY_SKIP_S:
                steady = (time.time(), progress.passed("send", self.lane))
            if time.time() < t_end - 1:
                note(f"  flow: {time.time() - t_start:.0f} s, {journal.campaign_total - at_start} campaign"
                     f" submit_sm at the SMSC; lane: {progress.passed('send', self.lane)} passed by the connector,"
                     f" backlog route {progress.backlog('route', self.lane)}"
                     f" send {progress.backlog('send', self.lane)}")
        end_progress = await self.lane_progress()
        t_progress = time.time()
        stop_probes.set()
        cpu1 = self.cpu.snapshot()
        flow_s = time.time() - t_start
        campaign = await get_campaign(self.shop, self.campaign_id)
        await probes_task
        await self.prober.wait_arrivals(30)
        passed = end_progress.passed("send", self.lane)
        rate = (passed - steady[1]) / max(1e-9, t_progress - steady[0]) if steady else 0.0
        self.results["flow"] = {"s": flow_s, "t_start": t_start, "t_end": t_start + flow_s,
                                "cpu": Cpu.report(cpu0, cpu1, flow_s), "campaign": campaign,
                                "lane": {"passed": passed, "route_backlog": end_progress.backlog("route", self.lane),
                                         "send_backlog": end_progress.backlog("send", self.lane),
                                         "written": end_progress.written("route", self.lane), "rate": rate}}

    async def cancel(self) -> None:
        """Phase 5: cancel and watch the lane drain for at most --cancel-watch seconds."""
        note(f"canceling; watching for at most {self.args.cancel_watch:.0f} s")
        before = await self.lane_progress()
        waiting = before.backlog("route", self.lane) + before.backlog("send", self.lane)
        t_cancel = time.time()
        self.journal.poll()
        sent_at_cancel = self.journal.campaign_total
        await act(self.shop, self.campaign_id, "cancel")
        left, last_note, drained_at = waiting, t_cancel, None
        while time.time() - t_cancel < self.args.cancel_watch:
            await asyncio.sleep(1)
            now = await self.lane_progress()
            left = now.backlog("route", self.lane) + now.backlog("send", self.lane)
            if left == 0:
                drained_at = time.time()
                break
            if time.time() - last_note >= 5:
                last_note = time.time()
                note(f"  cancel: {time.time() - t_cancel:.0f} s, {waiting - left} of {waiting} resolved, {left} left")
        watch_s = time.time() - t_cancel
        self.journal.poll()
        sent_after = self.journal.campaign_total - sent_at_cancel
        self.results["cancel"] = {"s": watch_s, "t0": t_cancel, "waiting": waiting, "left": left,
                                  "drained_s": drained_at - t_cancel if drained_at else None,
                                  "canceled": waiting - left - sent_after, "sent_after": sent_after}
        # The scheduler marks the campaign canceled once it finds the lane idle (about a second later).
        for _ in range(5 if drained_at else 0):
            if (await get_campaign(self.shop, self.campaign_id)).get("status") == "canceled":
                break
            await asyncio.sleep(1)
        self.results["final_campaign"] = await get_campaign(self.shop, self.campaign_id)
        await asyncio.sleep(2)
        with contextlib.suppress(psycopg.Error):
            self.results["pg_states"] = pg_campaign_states(self.stack, self.campaign_id)

    async def probe_stages(self) -> None:
        """Where the probes' time went (from the log), for each phase."""
        self.results["stages"] = {p: await self.prober.stages(self.db, p) for p in ("upload", "idle", "flow")}


async def bench(args: argparse.Namespace, mongo_url: str, pg_url: str, work: Path, servers: dict[str, int]) -> None:
    note(f"writing {args.recipients} recipients to a CSV")
    facts = write_csv(work / "recipients.csv", args.recipients)
    note(f"CSV written: {facts.size / 2**20:.1f} MB in {facts.seconds:.1f} s")

    settings = Settings()
    stamp = int(time.time())
    stack = Stack(mongo_url, pg_url, f"benchc_{stamp}", f"benchc_{stamp}", work / "stack",
                  receipt_delay_s=args.receipt_delay)
    route = Route(id="sim", port=stack.sim_port, price_per_part=5, window=args.window, tps=args.route_tps)
    keys = await seed(mongo_url, stack.mongo_db, [route], ["shop", "bank"])
    stack.start_all()
    journal = Journal(stack.journal)
    stop_journal = asyncio.Event()
    shop = httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {keys['shop']}"},
                             timeout=60)
    bank = httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {keys['bank']}"},
                             timeout=60)
    client = connect(mongo_url, "bench-campaign")
    run = Run(args, stack, facts, shop, Cpu(stack, servers), journal, Prober(bank, journal), client[stack.mongo_db])
    follower: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(stack.wait_http)
        await asyncio.sleep(3)  # let every worker connect and the connector bind
        follower = asyncio.create_task(journal.follow(stop_journal))
        await run.create()
        await run.upload()
        await run.baseline()
        await run.flow()
        await run.cancel()
        await run.probe_stages()
    except BaseException:
        for name in ("api", "scheduler", "connector"):
            tail = stack.log_tail(name, 1500)
            if tail:
                print(f"--- {name}.log (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        stop_journal.set()
        if follower is not None:
            await follower
        await shop.aclose()
        await bank.aclose()
        await client.close()
        note("stopping the components")
        note(f"stopped (exit codes; the api's -15 is uvicorn re-raising SIGTERM after its graceful shutdown):"
             f" {stack.stop_all()}")
        if args.keep_logs is not None:
            shutil.copytree(stack.log_dir, args.keep_logs, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("data"))
            note(f"logs copied to {args.keep_logs}")
        if os.environ.get("MSGCORE_MONGO_URL"):
            dropper = connect(mongo_url, "bench-campaign")
            await dropper.drop_database(stack.mongo_db)
            await dropper.close()
        if os.environ.get("MSGCORE_PG_URL"):
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(stack.schema)))

    print_results(args, settings, route, facts, journal, run.prober, run.results)


def print_stages(results: dict[str, Any], phase: str) -> None:
    stages = results.get("stages", {}).get(phase, {})
    line("  by event times p50/p95/max", "  ".join(
        f"{k} {pct(v, 50):.0f}/{pct(v, 95):.0f}/{max(v) if v else float('nan'):.0f} ms" for k, v in stages.items()))


def print_results(args: argparse.Namespace, settings: Settings, route: Route, facts: CsvFacts, journal: Journal,
                  prober: Prober, results: dict[str, Any]) -> None:
    up = results["upload"]
    report = up["report"]
    after = results["campaign_after_upload"]
    print(f"\nmsgcore campaign benchmark: {facts.rows} recipients, {os.cpu_count()} CPUs"
          f" (load average at the end {os.getloadavg()[0]:.1f})")
    print("config")
    line("route", f"sim: tps {route.tps or 'unlimited (0): the store is the limit'}, window {route.window},"
                  f" 1 bind, receipt delay {args.receipt_delay} s")
    line("batches", f"stage batch {settings.batch_size} (MSGCORE_BATCH_SIZE), router bulk share {BULK_PER_BATCH}"
                    f"/batch, upload {BATCH_ROWS} rows/transaction; cancel by the lane's consumers, a batch each")
    connector = {k: getattr(connector_module, k) for k in ("CLAIM_AHEAD_S", "MIN_CLAIM_AHEAD", "TRANSACTIONAL_RESERVE")
                 if hasattr(connector_module, k)}
    line("timing", f"poll {settings.poll_interval_s} s, lane refresh {LaneBook.TTL_S} s, upload quiet"
                   f" {UPLOAD_QUIET_S} s, connector {connector}")

    print("1. CSV")
    line("generated", f"{facts.rows} rows, {facts.size / 2**20:.1f} MB ({facts.size / facts.rows:.0f} B/row)"
                      f" in {facts.seconds:.1f} s")
    line("expected", f"accepted {facts.accepted}, duplicates {facts.duplicates}, invalid {facts.invalid},"
                     f" UCS-2 {facts.ucs2}")

    print("2. upload (streamed POST .../recipients)")
    rows = report["rows"]
    line("wall", f"{up['s']:.1f} s  ({rows / up['s']:.0f} rows/s overall; body sent in {up['body_s']:.1f} s,"
                 f" then {rows / max(1e-9, up['s'] - up['body_s']):.0f} rows/s validate+render+accept)")
    line("report", f"rows {rows}, accepted {report['accepted']}, duplicates {report['duplicates']},"
                   f" invalid {report['invalid']}, problems_total {report['problems_total']},"
                   f" first problem rows {[p['row'] for p in report['problems'][:5]]}")
    line("campaign", f"encodings {after['encodings']}, problems_by_code {after['problems_by_code']},"
                     f" parts {after['recipients']['parts']}")
    line("api RSS", f"before {up['rss_before_kb'] / 1024:.0f} MB, peak during upload"
                    f" {up['rss_peak_kb'] / 1024:.0f} MB (VmRSS sampled every 0.2 s),"
                    f" VmHWM {up['hwm_kb'] / 1024:.0f} MB")
    line("CPU (s, % of a core)", up["cpu"])
    prober.print_phase("upload", "OTP delay during upload")
    print_stages(results, "upload")

    print("3. idle baseline (campaign accepted, not started)")
    if "projected_at_baseline" in results:
        line("projector", f"{results['projected_at_baseline']} of {report['accepted']} campaign messages in"
                          " PostgreSQL when the baseline began (the rest were still being projected)")
    prober.print_phase("idle", "OTP delay idle")
    print_stages(results, "idle")

    fl = results["flow"]
    print(f"4. flow ({fl['s']:.0f} s after start)")
    total = journal.between(fl["t_start"], fl["t_end"])
    steady_from = fl["t_start"] + STEADY_SKIP_S
    steady = journal.between(steady_from, fl["t_end"])
    rate = total / fl["s"]
    steady_rate = steady / max(1, int(fl["t_end"]) - int(steady_from))
    accepted = report["accepted"]
    line("campaign submit_sm at SMSC", f"{total} in the window: {rate:.0f} msg/s overall,"
                                       f" {steady_rate:.0f} msg/s after the first {STEADY_SKIP_S:.0f} s")
    proj = accepted / steady_rate if steady_rate else float("inf")
    line("whole campaign at that rate", f"{proj:.0f} s ({proj / 3600:.2f} h) for {accepted} messages")
    lane = fl["lane"]
    remaining = lane["written"] - lane["passed"]
    eta = f"ETA {remaining / lane['rate']:.0f} s" if lane["rate"] else "no ETA (no progress)"
    line("completion (checkpoints)", f"{lane['passed']} of {lane['written']} passed by the connector"
                                     f" ({lane['passed'] / max(1, lane['written']):.1%}); waiting: route"
                                     f" {lane['route_backlog']}, send {lane['send_backlog']}; {lane['rate']:.0f} msg/s"
                                     f" after the first {STEADY_SKIP_S:.0f} s -> {eta}")
    camp = fl["campaign"]
    line("API progress at the end", f"{camp.get('progress')}")
    line("API counts (PostgreSQL)", f"{camp.get('counts')}")
    line("CPU (s, % of a core)", fl["cpu"])
    prober.print_phase("flow", "OTP delay during campaign")
    print_stages(results, "flow")

    c = results["cancel"]
    print(f"5. cancel (watched {c['s']:.0f} s, at most {args.cancel_watch:.0f} s)")
    until = c["drained_s"] or c["s"]
    how = "lane drained" if c["drained_s"] else "watch ended"
    # About: the backlog and the journal are read a moment apart, so a batch sent in between may be
    # counted on either side (the exact figure is reporting's, once the projector has caught up).
    line("canceled", f"about {c['canceled']} of the {c['waiting']} waiting at the cancel:"
                     f" {c['canceled'] / max(1.0, until):.0f} msg/s ({how} after {until:.0f} s)")
    line("submit_sm after cancel", f"{c['sent_after']} (batches the connector had already attempted)")
    if c["left"]:
        rate_c = (c["waiting"] - c["left"]) / c["s"] if c["s"] else 0
        eta = f"{c['left'] / rate_c:.0f} s more at that rate" if rate_c else "no rate"
        line("status", f"{c['left']} still waiting in the lane at the end of the watch ({eta}); not waited for")
    final = results["final_campaign"]
    line("campaign status", f"{final.get('status')}")
    line("API counts at the end", f"{final.get('counts')} (PostgreSQL, lagging)")
    if "pg_states" in results:
        line("reporting.messages", f"{results['pg_states']} (2 s after the watch)")
    line("SMSC totals", f"{journal.campaign_total} campaign submit_sm, {len(journal.probes)} probes,"
                        f" {journal.other} other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--run-seconds", type=float, default=180.0, help="how long the campaign flows before cancel")
    p.add_argument("--probe-interval", type=float, default=2.0, help="seconds between one-time passwords")
    p.add_argument("--baseline-probes", type=int, default=20, help="one-time passwords before the start")
    p.add_argument("--baseline-interval", type=float, default=0.5)
    p.add_argument("--cancel-watch", type=float, default=60.0, help="seconds to watch the cancel at most")
    p.add_argument("--route-tps", type=int, default=0, help="the route's TPS; 0 = unlimited")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--receipt-delay", type=float, default=0.2)
    p.add_argument("--upload-timeout", type=float, default=3600.0)
    p.add_argument("--keep-logs", type=Path, default=None, help="copy the components' logs here at the end")
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between progress lines")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="msgcore-bench-campaign-") as tmp, store_servers(Path(tmp)) as servers:
        asyncio.run(bench(args, servers.mongo_url, servers.pg_url, Path(tmp), servers.pids))

if __name__ == "__main__":
    main()
