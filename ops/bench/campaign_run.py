"""One run of the campaign benchmark, phase by phase (create, upload, idle baseline, flow, cancel),
with what the phases measure: the api's RSS, CPU per process and the campaign through the API."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from core.domain.message import campaign_lane
from ops.bench.campaign_csv import CsvFacts
from ops.bench.campaign_probes import Journal, Prober
from ops.bench.support import note, tree_cpu_s
from ops.progress import Progress, read_progress
from ops.stack import Stack

TEMPLATE = "Hi {{first_name}}! Stop by {{store_name}} today: 20% off everything."
STEADY_SKIP_S = 10.0


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

