"""Projector benchmark: replay and steady-state throughput, follow lag, rebuild time and memory.

    python -m ops.bench.projector --events 1000000 [--batch 1000] [--follow-events M] [--rate R]

Uses MSGCORE_MONGO_URL / MSGCORE_PG_URL if set, else starts the embedded servers in a temp dir.
Steps, each printing its figures:

1. Load: N events (full lifecycles: accepted, routed, sent, delivered/undelivered, billed; N/5
   messages over several tenants, routes and UTC days) inserted straight into a fresh database's
   `events` collection (unordered insert_many batches, the EventStore indexes in place).
2. Projector: a `Projector` on a fresh schema replays the log (replay events/s), then follows the
   change stream while M more events are inserted at a steady rate: applied events/s while
   following, the lag of each insert batch (insert returned -> projector applied it) and the lag
   of the last one.
3. Rebuild: `projections.rebuild.rebuild` of that schema from the whole log (N + M events): wall
   time per phase, events/s, and peak RSS of this process and of the (local, embedded) MongoDB-wire
   and PostgreSQL server processes, sampled every 0.5 s.
4. A summary table.

The projector runs inside this process (as in the rebuild); the follow-phase documents are
generated before the clock starts. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import psycopg
from psycopg import sql
from pymongo import AsyncMongoClient

from ops.bench.projector_follow import projector_steps
from ops.bench.projector_load import EVENTS_PER_MESSAGE, Lifecycles, load
from ops.bench.projector_rebuild import CATCHUP_MARGIN, catchup_probe, rebuild_step
from ops.bench.projector_support import Figures, RssSampler, log
from ops.bench.support import store_servers


async def bench(args: argparse.Namespace, mongo_url: str, pg_url: str, sampler: RssSampler,
                external: tuple[bool, bool]) -> None:
    """Steps 1 to 4; `external`: (MongoDB, PostgreSQL) named by the environment, cleaned up at the end."""
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    db_name, schema = f"bench_projector_{stamp}", f"benchproj_{stamp}"
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    events = client[db_name]["events"]
    gen = Lifecycles(salt=random.SystemRandom().getrandbits(24))
    fig = Figures()
    started = time.perf_counter()
    try:
        sampler.set_phase("load")
        log(f"loading {args.events} events into {db_name}.events")
        t0 = time.perf_counter()
        n = await load(events, gen, args.events, args.days, args.insert_batch, fig)
        load_rate = n / (time.perf_counter() - t0)
        m = await projector_steps(args, events, pg_url, schema, gen, n, load_rate, sampler, fig)
        await _settle(args, sampler)
        if args.skip_rebuild:
            print("\n3. Rebuild: skipped (--skip-rebuild)")
        else:
            await catchup_probe(events, args.batch, fig)
            await rebuild_step(args, events, pg_url, schema, n + m, sampler, fig)
    finally:
        await _drop_external(client, db_name, pg_url, schema, external)
    _print_summary(args, fig, sampler, external, time.perf_counter() - started)


async def _settle(args: argparse.Namespace, sampler: RssSampler) -> None:
    settle = 0.0 if args.skip_rebuild else args.settle if args.settle >= 0 else CATCHUP_MARGIN.total_seconds() + 10
    if settle > 0:
        # The rebuild's shadow projector re-reads every event whose `_id` is within the catch-up
        # margin of its replay's start, one `_id`-range page at a time; waiting this long keeps
        # the follow phase's events out of that window (see the catch-up probe figures).
        sampler.set_phase("settle")
        log(f"waiting {settle:.0f} s before the rebuild (--settle)")
        await asyncio.sleep(settle)


async def _drop_external(client: AsyncMongoClient[dict[str, Any]], db_name: str, pg_url: str, schema: str,
                         external: tuple[bool, bool]) -> None:
    """Embedded servers live in a temp dir that goes away; what the run made in external ones is dropped."""
    if external[0]:
        await client.drop_database(db_name)
    if external[1]:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            cur = await conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (schema + "%",))
            for (name,) in await cur.fetchall():
                await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    await client.close()


def _print_summary(args: argparse.Namespace, fig: Figures, sampler: RssSampler, external: tuple[bool, bool],
                   total_s: float) -> None:
    print(f"\n4. Summary (N={args.events}, batch {args.batch}, total {total_s:.0f} s; "
          f"MongoDB {'external' if external[0] else 'embedded'}, "
          f"PostgreSQL {'external' if external[1] else 'embedded'})")
    print(f"  load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    width = max(len(k) for k, _ in fig.rows)
    print(f"  {'figure':{width}}  value")
    print(f"  {'-' * width}  {'-' * 40}")
    for k, v in fig.rows:
        print(f"  {k:{width}}  {v.strip()}")
    print("  peak RSS MB per phase:")
    for phase, peaks in sampler.peaks.items():
        if phase in ("start", "after", "rebuild-baseline"):
            continue
        print(f"    {phase:8} " + "  ".join(f"{k}={v:.0f}" for k, v in sorted(peaks.items())))


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=20_000, help="events in the log before the projector starts")
    p.add_argument("--batch", type=int, default=1000, help="projector / rebuild batch size")
    p.add_argument("--follow-events", type=int, default=0,
                   help="events inserted while the projector follows (default min(100000, N/10))")
    p.add_argument("--rate", type=float, default=0.0,
                   help="follow-phase insert rate, events/s (default: half the measured load rate)")
    p.add_argument("--follow-batch", type=int, default=500, help="events per insert while following")
    p.add_argument("--insert-batch", type=int, default=5000, help="events per insert_many while loading")
    p.add_argument("--days", type=float, default=7.0, help="UTC days the loaded log spans")
    p.add_argument("--settle", type=float, default=-1.0,
                   help="seconds to wait between the follow phase and the rebuild (default: the projector's "
                        "catch-up margin + 10 s, so the rebuild's catch-up window holds no follow-phase events)")
    p.add_argument("--skip-rebuild", action="store_true", help="stop after the projector step")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up waiting on the projector after this")
    args = p.parse_args()
    if args.follow_events <= 0:
        args.follow_events = max(EVENTS_PER_MESSAGE, min(100_000, args.events // 10))
    return args


def main() -> None:
    args = _args()
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    external = (bool(os.environ.get("MSGCORE_MONGO_URL", "")), bool(os.environ.get("MSGCORE_PG_URL", "")))
    with tempfile.TemporaryDirectory(prefix="msgcore-bench-projector-") as tmp, store_servers(Path(tmp)) as servers:
        # The sampler's names for the servers this run started (they label the RSS figures).
        pids = {name: servers.pids[key] for name, key in (("mongo", "mongo-server"), ("postgres", "pg-server"))
                if key in servers.pids}
        sampler = RssSampler(pids)
        sampler.start()
        try:
            print(f"servers: mongo {'embedded pid ' + str(pids['mongo']) if 'mongo' in pids else 'external'}, "
                  f"postgres {'embedded pid ' + str(pids['postgres']) if 'postgres' in pids else 'external'}; "
                  f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GB RAM, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
            asyncio.run(bench(args, servers.mongo_url, servers.pg_url, sampler, external))
        finally:
            sampler.done.set()


if __name__ == "__main__":
    main()
