"""Soak test: the whole stack at a steady rate for a long time, sampled every interval, judged on drift.

    python -m ops.soak [--rate 50] [--minutes 240] [--interval 60] [--fault-every 0]
                       [--faults kill,smsc-drop,store-restart] [--json out.json]

Every component runs as its own process (ops/stack.py) with the simulator as SMSC; MSGCORE_MONGO_URL /
MSGCORE_PG_URL name the servers, else embedded ones are started in a temp dir. Messages are posted at
`--rate` msg/s in small batches on a fixed schedule, each batch with an Idempotency-Key and posted again
until the api answers it (a batch committed before its answer was lost counts once). With
`--fault-every N` (alias `--kill-every`), after every N-th interval comes the next fault of `--faults`
in rotation (ops/soak_faults.py): kill -9 of a worker, an SMSC dropping every bind, a restart of the
embedded MongoDB-wire server (skipped, saying why, when MongoDB is external).

Each interval prints one row: messages accepted by the api (202) and billed, accepted->billed p50/p99
of the messages billed in that interval (from the reporting tables, over a window shifted back by
LAG_MARGIN_S so the projector's lag does not hide any), RSS, CPU and open file descriptors of each
process, backlog per stage, projector lag. At the end: posting stops, the stack drains, `msgcore
verify` runs, and the verdict is printed. Exit status 1 when any check fails:

- lost: every message accepted (202) has been billed once the stack drained;
- drained: the route and send backlogs are back to 0 within `--drain-timeout`;
- verify: `msgcore verify` finds no discrepancy;
- alive: no component died on its own;
- unknown: every batch posted got an answer from the api (202 or a refusal);
- fault: after each fault the stack came back (the connector bound again, the api ready again);
- rss: a process's RSS grows faster than `--max-rss-mb-per-hour` (least-squares slope of the samples
  after warm-up) AND by more than `--rss-noise-mb` in total (a short run's warm-up is not a leak);
- fds: a process's open file descriptors grow by more than `--max-fd-growth`;
- p99: the median p99 of the last third of the samples exceeds `--max-p99-ratio` times that of the
  first third AND `--p99-floor-ms` (latency creeping up as the run goes on);
- backlog: the median route+send backlog of the last third of the samples exceeds that of the first
  third by more than `--max-backlog-growth` entries (default: one interval of traffic). These two
  trends leave out the warm-up and the sample right after each fault (its spike is not a trend).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from dataclasses import asdict
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
from ops.progress import spent_minor
from ops.soak_faults import FAULT_KINDS, Faults, SoakServers, SoakStack, soak_servers
from ops.soak_report import Run, Sample, print_row, print_summary, verdict
from ops.stack import Stack, seed
from ops.verify.run import verify

TENANT, PRICE = "soak", 1
LAG_MARGIN_S = 10.0
RETRY_S = 0.5  # between posts of a batch the api did not answer
RETRY_FOR_S = 120.0  # then its outcome counts as unknown


# ---- load ------------------------------------------------------------------------------------------


async def post_forever(http: httpx.AsyncClient, rate: float, run: Run, stop: asyncio.Event) -> None:
    """Post `rate` msg/s (a batch every 1/20 s, or single messages below 20 msg/s) until `stop`; a late
    batch is sent late, never in a burst of catch-up. Counts 202s in `run.accepted`."""
    batch = max(1, round(rate / 20))
    interval, start, k, n = batch / rate, time.perf_counter(), 0, 0
    stamp = int(time.time())
    while not stop.is_set():
        delay = start + k * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = {"messages": [{"to": f"+4917{n + i:09d}", "from": "soak", "text": f"soak {n + i}"}
                             for i in range(batch)]}
        outcome = await post_batch(http, body, f"soak-{stamp}-{k}")
        if outcome is None:
            run.unknown += batch
        elif outcome:
            run.accepted += batch
        else:
            run.rejected += batch
        n, k = n + batch, k + 1


async def post_batch(http: httpx.AsyncClient, body: dict[str, Any], key: str) -> bool | None:
    """True once the api answers 202, False when it refuses the batch (4xx other than 429), None when
    it gave no answer for RETRY_FOR_S. A 5xx, a 429 or no answer (a store restart, a lost connection)
    is posted again with the same Idempotency-Key: the api answers a batch it already committed with
    its first answer, so a batch is never counted twice nor lost from the count."""
    deadline = time.monotonic() + RETRY_FOR_S
    while True:
        try:
            r = await http.post("/v1/messages", json=body, headers={"Idempotency-Key": key})
            if r.status_code == 202:
                return True
            if r.status_code < 500 and r.status_code != 429:
                return False
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(RETRY_S)


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


# ---- the run ---------------------------------------------------------------------------------------


async def sample_loop(ctx: dict[str, Any], run: Run, args: argparse.Namespace, faults: Faults) -> None:
    start, last_accepted = time.perf_counter(), 0
    count = max(1, round(args.minutes * 60 / args.interval))
    for i in range(count):
        window_start = utcnow()
        await asyncio.sleep(max(0.0, start + (i + 1) * args.interval - time.perf_counter()))
        accepted, last_accepted = run.accepted - last_accepted, run.accepted
        sample = await take_sample(ctx, (window_start, utcnow()), time.perf_counter() - start, accepted,
                                   args.interval)
        run.samples.append(sample)
        print_row(i, sample)
        await faults.after_sample(run, i, count - 1)


async def drain(ctx: dict[str, Any], run: Run, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        waiting = await backlog(ctx["db"])
        run.billed_total = await spent_minor(ctx["db"], TENANT) // PRICE
        if waiting["route"] + waiting["send"] == 0 and run.billed_total >= run.accepted:
            run.drained = True
            return
        await asyncio.sleep(1.0)


async def soak(args: argparse.Namespace, servers: SoakServers, work: Path) -> Run:
    stamp, mongo_url, pg_url = int(time.time()), servers.mongo_url, servers.pg_url
    stack = SoakStack(mongo_url, pg_url, f"soak_{stamp}", f"soak_{stamp}", work / "stack", receipt_delay_s=0.2)
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
            faults = Faults(stack, ctx["db"], args.faults, args.fault_every, servers.mongo)
            poster = asyncio.create_task(post_forever(http, args.rate, run, stop))
            await sample_loop(ctx, run, args, faults)
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
    p.add_argument("--fault-every", "--kill-every", dest="fault_every", type=int, default=0,
                   help="a fault after every N samples (0: never)")
    p.add_argument("--faults", type=_fault_kinds, default=("kill",),
                   help=f"fault kinds in rotation, comma-separated, of {','.join(FAULT_KINDS)} (default: kill)")
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


def _fault_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(FAULT_KINDS)}; got {text!r}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C: servers are stopped
    with tempfile.TemporaryDirectory(prefix="msgcore-soak-") as tmp, soak_servers(Path(tmp)) as servers:
        run = asyncio.run(soak(args, servers, Path(tmp)))
    fails = verdict(run, args)
    print_summary(run, args, fails)
    if args.json:
        args.json.write_text(json.dumps({**asdict(run), "fails": fails}, default=str, indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
