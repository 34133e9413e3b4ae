"""Soak test: the whole stack at a steady rate for a long time, sampled every interval, judged on drift.

    python -m ops.soak [--rate 50] [--minutes 240] [--interval 60] [--kill-every 0] [--json out.json]

Every component runs as its own process (ops/stack.py) with the simulator as SMSC; MSGCORE_MONGO_URL /
MSGCORE_PG_URL name the servers, else embedded ones are started in a temp dir. Messages are posted at
`--rate` msg/s in small batches on a fixed schedule. With `--kill-every N`, every N intervals one
worker (router, connector, scheduler or projector, in turn) is killed with SIGKILL and started again.

Each interval prints one row: messages accepted by the api (202) and billed, accepted->billed p50/p99
of the messages billed in that interval (from the reporting tables, over a window shifted back by
LAG_MARGIN_S so the projector's lag does not hide any), RSS, CPU and open file descriptors of each
process, backlog per stage, projector lag. At the end: posting stops, the stack drains, `msgcore
verify` runs, and the verdict is printed. Exit status 1 when any check fails:

- lost: every message accepted (202) has been billed once the stack drained;
- drained: the route and send backlogs are back to 0 within `--drain-timeout`;
- verify: `msgcore verify` finds no discrepancy;
- alive: no component died on its own;
- rss: a process's RSS grows faster than `--max-rss-mb-per-hour` (least-squares slope of the samples
  after warm-up) AND by more than `--rss-noise-mb` in total (a short run's warm-up is not a leak);
- fds: a process's open file descriptors grow by more than `--max-fd-growth`;
- p99: the median p99 of the last third of the samples exceeds `--max-p99-ratio` times that of the
  first third AND `--p99-floor-ms` (latency creeping up as the run goes on);
- backlog: the median route+send backlog of the last third of the samples exceeds that of the first
  third by more than `--max-backlog-growth` entries (default: one interval of traffic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from psycopg import sql

from core.domain.events import utcnow
from core.domain.routing import Route
from core.store.backlog import topic_backlogs
from core.store.dashboard_reads import newest_event_at
from core.store.mongo import connect
from ops.bench.support import store_servers
from ops.progress import spent_minor
from ops.stack import WORKERS, Stack, seed
from ops.verify.run import verify

TENANT, PRICE = "soak", 1
LAG_MARGIN_S = 10.0


@dataclass
class Sample:
    t_s: float  # seconds since the start of posting
    accepted: int  # in this interval
    billed: int  # in this interval (reporting)
    p50_ms: float | None
    p99_ms: float | None
    rss_mb: dict[str, float]
    cpu_pct: dict[str, float]
    fds: dict[str, int]
    backlog: dict[str, int]  # stage -> waiting
    lag_s: float | None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    billed_total: int = 0
    drained: bool = False
    verify_ok: bool = False
    verify_counts: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, list[int]] = field(default_factory=dict)  # process -> sample indexes of restarts
    died: dict[str, int | None] = field(default_factory=dict)


# ---- load ------------------------------------------------------------------------------------------


async def post_forever(http: httpx.AsyncClient, rate: float, run: Run, stop: asyncio.Event) -> None:
    """Post `rate` msg/s (a batch every 1/20 s, or single messages below 20 msg/s) until `stop`; a late
    batch is sent late, never in a burst of catch-up. Counts 202s in `run.accepted`."""
    batch = max(1, round(rate / 20))
    interval, start, k, n = batch / rate, time.perf_counter(), 0, 0
    while not stop.is_set():
        delay = start + k * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = {"messages": [{"to": f"+4917{n + i:09d}", "from": "soak", "text": f"soak {n + i}"}
                             for i in range(batch)]}
        try:
            r = await http.post("/v1/messages", json=body)
            if r.status_code == 202:
                run.accepted += batch
            else:
                run.rejected += batch
        except httpx.HTTPError:
            run.rejected += batch  # not accepted: the api did not answer (e.g. restarting)
        n, k = n + batch, k + 1


# ---- sampling --------------------------------------------------------------------------------------


def process_figures(stack: Stack, cpu_before: dict[str, float], seconds: float
                    ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    rss, fds, cpu = stack.rss_mb(), {}, stack.cpu_s()
    for name, proc in stack.procs.items():
        try:
            fds[name] = psutil.Process(proc.pid).num_fds()
        except psutil.NoSuchProcess:
            continue
    # A process restarted since the last sample starts again from 0 CPU seconds.
    pct = {k: round(100 * (v - before if v >= (before := cpu_before.get(k, 0.0)) else v) / seconds, 1)
           for k, v in cpu.items()}
    cpu_before.clear()
    cpu_before.update(cpu)
    return rss, pct, fds


async def latency(pg: psycopg.AsyncConnection, schema: str, since: datetime, until: datetime
                  ) -> tuple[int, float | None, float | None]:
    query = sql.SQL("SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) "
                    "WITHIN GROUP (ORDER BY d) FROM (SELECT extract(epoch FROM billed_at - accepted_at) * 1000 AS d "
                    "FROM {}.messages WHERE billed_at >= %s AND billed_at < %s) x").format(sql.Identifier(schema))
    try:
        row = await (await pg.execute(query, (since, until))).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0, None, None  # the projector has not created its tables yet
    assert row is not None
    return int(row[0]), None if row[1] is None else float(row[1]), None if row[2] is None else float(row[2])


async def projector_lag(db: Any, pg: psycopg.AsyncConnection, schema: str) -> float | None:
    try:
        cur = await pg.execute(sql.SQL("SELECT last_event_at FROM {}.checkpoints WHERE projection = 'reporting'")
                               .format(sql.Identifier(schema)))
        row = await cur.fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    newest = await newest_event_at(db)
    if row is None or row[0] is None or newest is None:
        return None
    behind: float = (newest - row[0]).total_seconds()
    return max(0.0, behind)


async def backlog(db: Any) -> dict[str, int]:
    out = {"route": 0, "send": 0, "await": 0}
    for b in await topic_backlogs(db):
        out[b.stage] += b.waiting
    return out


async def take_sample(ctx: dict[str, Any], window: tuple[datetime, datetime], t_s: float, accepted: int,
                      seconds: float) -> Sample:
    shift = timedelta(seconds=LAG_MARGIN_S)
    n, p50, p99 = await latency(ctx["pg"], ctx["stack"].schema, window[0] - shift, window[1] - shift)
    rss, cpu, fds = process_figures(ctx["stack"], ctx["cpu"], seconds)
    return Sample(round(t_s), accepted, n, p50, p99, rss, cpu, fds, await backlog(ctx["db"]),
                  await projector_lag(ctx["db"], ctx["pg"], ctx["stack"].schema))


# ---- verdict ---------------------------------------------------------------------------------------


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour; 0 with fewer than two points."""
    if len(ts) < 2 or len(set(ts)) < 2:
        return 0.0
    return statistics.linear_regression(ts, ys).slope * 3600


def verdict(run: Run, args: argparse.Namespace) -> list[str]:
    """The failed checks, each as one line; empty when the run passes."""
    fails = []
    if run.billed_total != run.accepted:
        fails.append(f"lost: {run.accepted} accepted, {run.billed_total} billed")
    if not run.drained:
        fails.append(f"drained: backlog not back to 0 within {args.drain_timeout:.0f}s")
    if not run.verify_ok:
        fails.append(f"verify: discrepancies {run.verify_counts}")
    if run.died:
        fails.append(f"alive: components died: {run.died}")
    fails += _memory_fails(run, args)
    fails += _trend_fails(run, args)
    return fails


def _steady(run: Run, name: str, warmup: int) -> list[Sample]:
    """The samples of `name` after warm-up and after its last restart (a restart resets its RSS)."""
    first = max([warmup, *(i + warmup for i in run.restarts.get(name, []))])
    return [s for s in run.samples[first:] if name in s.rss_mb]


def _memory_fails(run: Run, args: argparse.Namespace) -> list[str]:
    fails = []
    names = sorted({n for s in run.samples for n in s.rss_mb})
    for name in names:
        steady = _steady(run, name, args.warmup)
        if len(steady) < 2:
            continue
        rss = [s.rss_mb[name] for s in steady]
        slope = slope_per_hour([s.t_s for s in steady], rss)
        if slope > args.max_rss_mb_per_hour and rss[-1] - rss[0] > args.rss_noise_mb:
            fails.append(f"rss: {name} grows {slope:.0f} MB/h ({rss[0]:.0f} -> {rss[-1]:.0f} MB)")
        fds = [s.fds.get(name, 0) for s in steady]
        if fds[-1] - fds[0] > args.max_fd_growth:
            fails.append(f"fds: {name} open files {fds[0]} -> {fds[-1]}")
    return fails


def _trend_fails(run: Run, args: argparse.Namespace) -> list[str]:
    fails = []
    steady = run.samples[args.warmup:]
    p99 = [s.p99_ms for s in steady if s.p99_ms is not None]
    if len(p99) >= 3:
        third = len(p99) // 3
        first, last = statistics.median(p99[:third]), statistics.median(p99[-third:])
        if last > args.max_p99_ratio * first and last > args.p99_floor_ms:
            fails.append(f"p99: {first:.0f} ms in the first third -> {last:.0f} ms in the last")
    waiting = [s.backlog["route"] + s.backlog["send"] for s in steady]
    if len(waiting) >= 3:
        # Medians of thirds: a spike (a restarted connector catching up) is not a trend.
        third = len(waiting) // 3
        first_b, last_b = statistics.median(waiting[:third]), statistics.median(waiting[-third:])
        if last_b - first_b > args.max_backlog_growth:
            fails.append(f"backlog: {first_b:.0f} waiting in the first third -> {last_b:.0f} in the last")
    return fails


# ---- report ----------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def print_row(i: int, s: Sample) -> None:
    if i == 0:
        print(f"{'min':>5} {'acc':>6} {'billed':>6} {'p50ms':>6} {'p99ms':>6} {'route':>6} {'send':>6} {'lag s':>6}"
              "  RSS MB / CPU % / fds per process", flush=True)
    procs = "  ".join(f"{n}={s.rss_mb[n]:.0f}/{s.cpu_pct.get(n, 0):.0f}/{s.fds.get(n, 0)}" for n in sorted(s.rss_mb))
    lag = "-" if s.lag_s is None else f"{s.lag_s:.1f}"
    print(f"{s.t_s / 60:5.1f} {s.accepted:6d} {s.billed:6d} {_ms(s.p50_ms):>6} {_ms(s.p99_ms):>6} "
          f"{s.backlog['route']:6d} {s.backlog['send']:6d} {lag:>6}  {procs}", flush=True)


def print_summary(run: Run, args: argparse.Namespace, fails: list[str]) -> None:
    print(f"\nsoak: {run.accepted} accepted ({run.rejected} refused), {run.billed_total} billed, "
          f"{len(run.samples)} samples of {args.interval:.0f}s, restarts {run.restarts or 'none'}")
    for name in sorted({n for s in run.samples for n in s.rss_mb}):
        steady = _steady(run, name, args.warmup)
        if len(steady) >= 2:
            slope = slope_per_hour([s.t_s for s in steady], [s.rss_mb[name] for s in steady])
            print(f"  RSS {name:10} {steady[0].rss_mb[name]:6.0f} -> {steady[-1].rss_mb[name]:6.0f} MB"
                  f"  ({slope:+.1f} MB/h after warm-up)")
    print(f"  verify: {'clean' if run.verify_ok else 'DISCREPANCIES'} {run.verify_counts}")
    print("VERDICT: " + ("PASS" if not fails else "FAIL\n  " + "\n  ".join(fails)), flush=True)


# ---- the run ---------------------------------------------------------------------------------------


def maybe_fault(stack: Stack, run: Run, args: argparse.Namespace, index: int) -> None:
    if not args.kill_every or (index + 1) % args.kill_every:
        return
    name = WORKERS[((index + 1) // args.kill_every - 1) % len(WORKERS)]
    print(f"  fault: kill -9 {name} and start it again", flush=True)
    stack.kill(name)
    stack.start(name)
    run.restarts.setdefault(name, []).append(index + 1)


async def sample_loop(ctx: dict[str, Any], run: Run, args: argparse.Namespace) -> None:
    start, last_accepted = time.perf_counter(), 0
    for i in range(max(1, round(args.minutes * 60 / args.interval))):
        window_start = utcnow()
        await asyncio.sleep(max(0.0, start + (i + 1) * args.interval - time.perf_counter()))
        accepted, last_accepted = run.accepted - last_accepted, run.accepted
        sample = await take_sample(ctx, (window_start, utcnow()), time.perf_counter() - start, accepted,
                                   args.interval)
        run.samples.append(sample)
        print_row(i, sample)
        maybe_fault(ctx["stack"], run, args, i)


async def drain(ctx: dict[str, Any], run: Run, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        waiting = await backlog(ctx["db"])
        run.billed_total = await spent_minor(ctx["db"], TENANT) // PRICE
        if waiting["route"] + waiting["send"] == 0 and run.billed_total >= run.accepted:
            run.drained = True
            return
        await asyncio.sleep(1.0)


async def soak(args: argparse.Namespace, mongo_url: str, pg_url: str, work: Path) -> Run:
    stamp = int(time.time())
    stack = Stack(mongo_url, pg_url, f"soak_{stamp}", f"soak_{stamp}", work / "stack", receipt_delay_s=0.2)
    keys = await seed(mongo_url, stack.mongo_db, [Route(id="sim", port=stack.sim_port, price_per_part=PRICE,
                                                        window=50)], [TENANT])
    client, run, stop = connect(mongo_url, "soak"), Run(), asyncio.Event()
    stack.start_all()
    http = httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {keys[TENANT]}"}, timeout=30)
    try:
        await asyncio.to_thread(stack.wait_http)
        await asyncio.sleep(2)  # every worker connects and binds
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as pg:
            ctx: dict[str, Any] = {"stack": stack, "db": client[stack.mongo_db], "pg": pg, "cpu": stack.cpu_s()}
            poster = asyncio.create_task(post_forever(http, args.rate, run, stop))
            await sample_loop(ctx, run, args)
            stop.set()
            await poster
            run.died = {n: p.returncode for n, p in stack.procs.items() if p.poll() is not None}
            await drain(ctx, run, args.drain_timeout)
            report = await verify(ctx["db"], pg_url, stack.schema, utcnow())
            run.verify_ok, run.verify_counts = report.ok, dict(report.discrepancy_counts) or report.counts
    finally:
        stop.set()
        await http.aclose()
        stack.stop_all()
        if not args.keep:
            await client.drop_database(stack.mongo_db)
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(stack.schema)))
        await client.close()
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=50.0, help="messages posted per second")
    p.add_argument("--minutes", type=float, default=240.0, help="how long to post")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    p.add_argument("--warmup", type=int, default=2, help="samples left out of the drift checks")
    p.add_argument("--kill-every", type=int, default=0, help="kill -9 a worker every N samples (0: never)")
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--max-rss-mb-per-hour", type=float, default=20.0)
    p.add_argument("--rss-noise-mb", type=float, default=24.0)
    p.add_argument("--max-fd-growth", type=int, default=64)
    p.add_argument("--max-p99-ratio", type=float, default=3.0)
    p.add_argument("--p99-floor-ms", type=float, default=2000.0)
    p.add_argument("--max-backlog-growth", type=float, default=None,
                   help="route+send entries; default: one interval of traffic")
    p.add_argument("--json", type=Path, help="write the samples and the verdict here")
    p.add_argument("--keep", action="store_true", help="keep the run's database and schema")
    args = p.parse_args(argv)
    if args.max_backlog_growth is None:
        args.max_backlog_growth = args.rate * args.interval
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: servers are stopped
    with tempfile.TemporaryDirectory(prefix="msgcore-soak-") as tmp, store_servers(Path(tmp)) as servers:
        run = asyncio.run(soak(args, servers.mongo_url, servers.pg_url, Path(tmp)))
    fails = verdict(run, args)
    print_summary(run, args, fails)
    if args.json:
        args.json.write_text(json.dumps({**asdict(run), "fails": fails}, default=str, indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
