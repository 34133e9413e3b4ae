"""End-to-end benchmark: N messages posted over HTTP to a running stack with the simulator as SMSC.

    python -m ops.bench.e2e [--messages 20000] [--batch 500] [--concurrency 4] [--rate R]

Uses MSGCORE_MONGO_URL / MSGCORE_PG_URL if set, else starts the embedded servers in a temp dir. Every
component runs as its own process (ops/stack.py). Not a test: nothing here asserts.

Two modes: as fast as the clients can post (default: the maximum rate), or `--rate R`: R msg/s in
small batches on a fixed schedule (never more than a second's worth at once), to measure latency under
a known load, e.g. at half of the maximum rate.

Completion: every accepted message has its `billed` event. Polled without reading `events`: the
tenant's `spent_minor` is written in the same commit as each `billed` (one `_id` read), and the
topics' counters and checkpoints say where the rest stands; the `billed` events are counted once at
the end.

Printed: accepted msg/s, delivered-and-billed msg/s, accepted->submit_sm (simulator journal) and
accepted->billed p50/p95/p99, idle probes (single messages one at a time, each polled by folding its
events until billed), projector lag at the end, MongoDB documents written per message (oplog entries
for the run's database) split by collection (events, topic counters, checkpoints, attempts, attempt
fences, owners, tenants, timers, other) and how many of them were updates of a per-message document, CPU seconds per
1,000 messages per component and in total over the msgcore processes, peak RSS, and the STORE CEILING
measured in the same run: the server's own rate for batched inserts of event-shaped documents in
transactions into a collection with the events indexes, divided by 5 (five events per message), and
the achieved rate as a fraction of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from core.domain.routing import Route
from core.store.eventstore import EventStore
from core.store.mongo import connect
from ops.bench.store_figures import EVENTS_PER_MESSAGE, PRICE, TENANT, oplog_writes, store_ceiling
from ops.bench.support import pct, run_with_store_servers, tree_cpu_s
from ops.progress import read_progress, spent_minor
from ops.stack import Stack, seed

# The collections a message's life writes to, in print order; anything else is "other".
COLLECTIONS = ("events", "topics", "checkpoints", "attempts", "attempt_fences", "owners", "tenants", "timers")
PER_MESSAGE = ("events", "timers")  # documents keyed by message: an update of one is a per-message rewrite


class RssSampler(threading.Thread):
    """Peak RSS (MB) per process of the stack, sampled every 0.5 s until `done` is set."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack, self.done = stack, threading.Event()
        self.peak: dict[str, float] = {}

    def run(self) -> None:
        while not self.done.wait(0.5):
            for name, mb in self.stack.rss_mb().items():
                self.peak[name] = max(self.peak.get(name, 0.0), mb)


# ---- posting ---------------------------------------------------------------------------------------


def bodies(n: int, batch: int, first: int = 0) -> list[dict[str, Any]]:
    return [{"messages": [{"to": f"+4917{(start + i):09d}", "from": "bench", "text": f"Your code is {start + i:06d}"}
                          for i in range(min(batch, first + n - start))]} for start in range(first, first + n, batch)]


async def _post(http: httpx.AsyncClient, body: dict[str, Any]) -> None:
    r = await http.post("/v1/messages", json=body)
    if r.status_code != 202:
        raise RuntimeError(f"POST /v1/messages answered {r.status_code}: {r.text[:300]}")


async def post_all(http: httpx.AsyncClient, n: int, batch: int, concurrency: int) -> float:
    """Post as fast as `concurrency` clients can; returns the seconds it took."""
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies(n, batch):
        queue.put_nowait(b)

    async def sender() -> None:
        while not queue.empty():
            await _post(http, queue.get_nowait())

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.perf_counter() - start


async def post_at_rate(http: httpx.AsyncClient, n: int, rate: float, concurrency: int) -> float:
    """Post `n` messages at `rate` msg/s: a batch every 1/20 s (or one message at a time below 20 msg/s),
    each sent at its scheduled time. A schedule that falls behind is not caught up in a burst: at most
    `concurrency` POSTs are in flight, and a late batch is sent when a client is free."""
    batch = max(1, math.ceil(rate / 20))
    interval = batch / rate
    pending: set[asyncio.Task[None]] = set()
    room = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> None:
        try:
            await _post(http, body)
        finally:
            room.release()

    start = time.perf_counter()
    for k, body in enumerate(bodies(n, batch)):
        delay = start + k * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await room.acquire()
        task = asyncio.create_task(one(body))
        pending.add(task)
        task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return time.perf_counter() - start


async def wait_billed(db: Any, n: int, timeout_s: float) -> None:
    """Until the tenant's spend says `n` messages are billed (one `_id` read per poll)."""
    deadline = time.monotonic() + timeout_s
    last_note = time.monotonic()
    while await spent_minor(db, TENANT) < n * PRICE:
        if time.monotonic() > deadline:
            progress = await read_progress(db)
            raise TimeoutError(f"not every message billed within {timeout_s:.0f}s: {progress.summary()}")
        if time.monotonic() - last_note > 15:
            last_note = time.monotonic()
            billed = await spent_minor(db, TENANT) // PRICE
            print(f"  ... {billed} of {n} billed; {(await read_progress(db)).summary()}", flush=True)
        await asyncio.sleep(0.2)


# ---- latencies -------------------------------------------------------------------------------------


async def latencies(db: Any, journal: Path) -> dict[str, list[float]]:
    accepted: dict[str, datetime] = {}
    billed: dict[str, datetime] = {}
    to_of: dict[str, str] = {}
    async for e in db["events"].find({"type": {"$in": ["accepted", "billed"]}},
                                     {"message_id": 1, "type": 1, "at": 1, "data.to": 1}):
        if e["type"] == "accepted":
            accepted[e["message_id"]] = e["at"]
            to_of[e["data"]["to"].lstrip("+")] = e["message_id"]
        else:
            billed[e["message_id"]] = e["at"]
    submit = []
    for line in journal.read_text().splitlines():
        j = json.loads(line)
        mid = to_of.get(j["destination"])
        if mid:
            submit.append((datetime.fromisoformat(j["at"]) - accepted[mid]).total_seconds() * 1000)
    return {"accepted->submit_sm": submit,
            "accepted->billed": [(billed[m] - accepted[m]).total_seconds() * 1000 for m in billed if m in accepted]}


async def idle_probes(http: httpx.AsyncClient, db: Any, n: int) -> dict[str, list[float]]:
    """Latency with no backlog: single messages posted one at a time, each polled (the fold of its
    events) until billed."""
    store = EventStore(db)
    out: dict[str, list[float]] = {"accepted->sent": [], "accepted->billed": []}
    for i in range(n):
        r = await http.post("/v1/messages", json={"to": f"+4916{i:09d}", "from": "probe", "text": "probe"})
        mid = r.json()["id"]
        for _ in range(1000):
            state = await store.state(mid)
            if state is not None and state.billed:
                break
            await asyncio.sleep(0.01)
        events = {e.type.value: e.at for e in await store.load_events(mid)}
        if "billed" in events:
            out["accepted->sent"].append((events["sent"] - events["accepted"]).total_seconds() * 1000)
            out["accepted->billed"].append((events["billed"] - events["accepted"]).total_seconds() * 1000)
    return out


def pg_count(stack: Stack, table: str) -> int:
    with psycopg.connect(stack.pg_url) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(stack.schema),
                                                                      sql.Identifier(table))).fetchone()
    return int(row[0]) if row else 0


# ---- the run ---------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, mongo_url: str, pg_url: str, work: Path, servers: dict[str, int]) -> None:
    print("measuring the store's ceiling (batched event inserts in transactions, events indexes) ...", flush=True)
    ceiling_docs = await store_ceiling(mongo_url, args.ceiling_seconds)
    client = connect(mongo_url, "bench")
    stamp = int(time.time())
    stack = Stack(mongo_url, pg_url, f"bench_{stamp}", f"bench_{stamp}", work / "stack",
                  receipt_delay_s=args.receipt_delay)
    keys = await seed(mongo_url, stack.mongo_db, [Route(id="sim", port=stack.sim_port, price_per_part=PRICE,
                                                        window=args.window)], [TENANT])
    stack.start_all()
    sampler = RssSampler(stack)
    fig: dict[str, Any] = {"ceiling_docs": ceiling_docs}
    http = httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {keys[TENANT]}"},
                             timeout=120)
    try:
        await asyncio.to_thread(stack.wait_http)
        await asyncio.sleep(2)  # let every worker connect and bind
        sampler.start()
        db = client[stack.mongo_db]
        op_start = (await client.admin.command("hello"))["operationTime"]
        cpu0 = {**stack.cpu_s(), **{k: tree_cpu_s(p) for k, p in servers.items()}}
        t0 = time.perf_counter()
        if args.rate:
            fig["post_s"] = await post_at_rate(http, args.messages, args.rate, args.concurrency)
        else:
            fig["post_s"] = await post_all(http, args.messages, args.batch, args.concurrency)
        await wait_billed(db, args.messages, args.timeout)
        fig["billed_s"] = time.perf_counter() - t0
        fig["cpu"] = {k: v - cpu0.get(k, 0.0) for k, v in {
            **stack.cpu_s(), **{k: tree_cpu_s(p) for k, p in servers.items()}}.items()}
        fig["progress"] = await read_progress(db)
        t_billed = time.perf_counter()
        fig["writes"] = await oplog_writes(client, stack.mongo_db, op_start)
        total_events = await db["events"].count_documents({})
        fig["billed_events"] = await db["events"].count_documents({"type": "billed"})
        while pg_count(stack, "message_events") < total_events and time.perf_counter() - t_billed < args.timeout:
            await asyncio.sleep(0.1)
        fig["lag_s"] = time.perf_counter() - t_billed
        fig["lat"] = await latencies(db, stack.journal)
        fig["probes"] = await idle_probes(http, db, args.probes)
    finally:
        sampler.done.set()
        await http.aclose()
        stack.stop_all()
        await client.drop_database(stack.mongo_db)
        await client.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(stack.schema)))
    report(args, fig, sampler.peak)


def _line(name: str, values: list[float], extra: str) -> str:
    return (f"  {name:24} p50 {pct(values, 50):7.0f} ms  p95 {pct(values, 95):7.0f} ms  p99 {pct(values, 99):7.0f} ms"
            f"  (n={len(values)}{extra})")


def report(args: argparse.Namespace, fig: dict[str, Any], peak: dict[str, float]) -> None:
    n = args.messages
    mode = f"posted at {args.rate:.0f} msg/s" if args.rate else f"batches of {args.batch}, {args.concurrency} clients"
    rate = n / fig["billed_s"]
    print(f"\nmsgcore end-to-end benchmark: {n} messages, {mode}")
    print(f"  accepted                 {n / fig['post_s']:9.0f} msg/s   ({fig['post_s']:.1f} s)")
    print(f"  delivered and billed     {rate:9.0f} msg/s   ({fig['billed_s']:.1f} s from first POST;"
          f" {fig['billed_events']} billed events)")
    for name, values in fig["lat"].items():
        mean = statistics.fmean(values) if values else float("nan")
        print(_line(name, values, f", mean {mean:.0f} ms"))
    for name, values in fig["probes"].items():
        print(_line(f"idle {name}", values, " single messages, no backlog"))
    print(f"  projector lag at end     {fig['lag_s']:9.2f} s")
    writes: Counter[tuple[str, str]] = fig["writes"]
    total = sum(writes.values())
    by_coll = Counter[str]()
    for (coll, _), k in writes.items():
        by_coll[coll if coll in COLLECTIONS else "other"] += k
    print(f"  MongoDB writes/message   {total / n:9.2f}   (oplog entries for the run's database, idle probes excluded)")
    print("    by collection          " + "  ".join(f"{c}={by_coll[c] / n:.3f}" for c in (*COLLECTIONS, "other")
                                                  if by_coll[c]))
    rewrites = sum(k for (coll, op), k in writes.items() if coll in PER_MESSAGE and op == "u")
    print(f"    per-message rewrites   {rewrites:9d}   (updates of events or timers)")
    ceiling = fig["ceiling_docs"] / EVENTS_PER_MESSAGE
    print(f"  STORE CEILING            {ceiling:9.0f} msg/s   ({fig['ceiling_docs']:.0f} event docs/s in transactions"
          f" with the events indexes, / {EVENTS_PER_MESSAGE}); achieved {100 * rate / ceiling:.0f} % of it")
    cpu: dict[str, float] = fig["cpu"]
    print("  CPU s per 1,000 msgs     " + "  ".join(f"{k}={1000 * v / n:.2f}" for k, v in cpu.items()))
    msgcore_cpu = sum(v for k, v in cpu.items() if k not in ("smsc-sim", "mongo-server", "pg-server"))
    print(f"  CPU per message          {1000 * msgcore_cpu / n:9.3f} ms (msgcore processes: simulator and store"
          " servers excluded)")
    print("  peak RSS MB              " + "  ".join(f"{k}={v:.0f}" for k, v in sorted(peak.items())))
    print(f"  at the end               {fig['progress'].summary()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.0, help="post at this many msg/s (0: as fast as possible)")
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--receipt-delay", type=float, default=0.2)
    p.add_argument("--probes", type=int, default=30, help="single messages timed after the run, with no backlog")
    p.add_argument("--ceiling-seconds", type=float, default=5.0, help="how long the store ceiling is measured")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for every message to be billed")
    args = p.parse_args()
    run_with_store_servers(bench, args)


if __name__ == "__main__":
    main()
