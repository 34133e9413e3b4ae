"""Campaign benchmark: a large recipient list (1,000,000 by default) end to end on the embedded default.

    python -m ops.bench.campaign [--recipients 1000000] [--run-seconds 180] [--probe-interval 2]

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
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import psycopg
from psycopg import sql

from core.config import Settings
from core.domain.routing import Route
from core.store.mongo import connect
from ops.bench.campaign_csv import write_csv
from ops.bench.campaign_probes import Journal, Prober
from ops.bench.campaign_report import print_results
from ops.bench.campaign_run import Cpu, Run
from ops.bench.support import note, run_with_store_servers
from ops.stack import Stack, seed


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
    shop, bank = _api_client(stack, keys["shop"]), _api_client(stack, keys["bank"])
    client = connect(mongo_url, "bench-campaign")
    run = Run(args, stack, facts, shop, Cpu(stack, servers), journal, Prober(bank, journal), client[stack.mongo_db])
    try:
        await _phases(run, stack, journal)
    finally:
        await shop.aclose()
        await bank.aclose()
        await client.close()
        await _teardown(args, stack, mongo_url, pg_url)

    print_results(args, settings, route, facts, journal, run.prober, run.results)


def _api_client(stack: Stack, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


async def _phases(run: Run, stack: Stack, journal: Journal) -> None:
    """Every phase in order, the simulator's journal followed meanwhile; on failure the components'
    log tails go to stderr before the error propagates."""
    stop_journal = asyncio.Event()
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


async def _teardown(args: argparse.Namespace, stack: Stack, mongo_url: str, pg_url: str) -> None:
    """Stop the components, keep their logs if asked, and drop what the run created in external stores
    (embedded ones go away with the temp dir)."""
    note("stopping the components")
    note(f"stopped (exit codes; the api's -15 is uvicorn re-raising SIGTERM after its graceful shutdown):"
         f" {stack.stop_all()}")
    if args.keep_logs is not None:
        shutil.copytree(stack.log_dir, args.keep_logs, dirs_exist_ok=True, ignore=shutil.ignore_patterns("data"))
        note(f"logs copied to {args.keep_logs}")
    if os.environ.get("MSGCORE_MONGO_URL"):
        dropper = connect(mongo_url, "bench-campaign")
        await dropper.drop_database(stack.mongo_db)
        await dropper.close()
    if os.environ.get("MSGCORE_PG_URL"):
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(stack.schema)))


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
    run_with_store_servers(bench, args, "msgcore-bench-campaign-")


if __name__ == "__main__":
    main()

