"""End-to-end benchmark: N messages posted over HTTP to a running stack with the simulator as SMSC.

    python -m ops.bench_e2e [--messages 20000] [--batch 500] [--concurrency 4]

Uses MSGCORE_MONGO_URL / MSGCORE_PG_URL if set, else starts the embedded servers in a temp dir.
Prints: accepted msg/s, delivered-and-billed msg/s, latency percentiles (accepted -> submit_sm at the
simulator, accepted -> billed), projector lag at the end, MongoDB documents written per message
(counted in the oplog), CPU seconds per 1,000 messages per component, peak RSS per process, and the
raw write rate of the MongoDB server in the same run, with the limit it implies.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql
from pymongo import AsyncMongoClient, ReplaceOne

from core.domain.routing import Route
from core.store.eventstore import EventStore
from ops.bench_support import pct, store_servers
from ops.stack import Stack, seed


async def raw_write_rate(client: AsyncMongoClient, seconds: float = 3.0, batch: int = 1000) -> float:
    """Documents/s the server takes in unordered batches of event-sized documents."""
    coll = client["msgcore_bench_raw"]["docs"]
    await coll.drop()
    doc = {"message_id": "01M83DG2ZW93JSXZG9BRM5XMPH", "type": "accepted", "tenant_id": "bench",
           "data": {"to": "+4915112345678", "sender": "bench", "text": "x" * 40, "parts": 1}}
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await coll.insert_many([{**doc, "seq": n + i} for i in range(batch)], ordered=False)
        n += batch
    rate = n / (time.perf_counter() - start)
    await client.drop_database("msgcore_bench_raw")
    return rate


async def raw_replace_rate(client: AsyncMongoClient, seconds: float = 3.0, batch: int = 500) -> float:
    """Documents/s the server replaces in transactions of `batch` version-guarded statements: the
    write a head update costs. On some servers it is far dearer than an insert."""
    coll = client["msgcore_bench_raw"]["heads"]
    await coll.drop()
    await coll.create_index([("queue", 1), ("due_at", 1)])
    await coll.insert_many([{"_id": i, "version": 0, "queue": "q", "due_at": time.time()} for i in range(batch)])
    n, version, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        ops = [ReplaceOne({"_id": i, "version": version}, {"version": version + 1, "queue": "q", "due_at": time.time()})
               for i in range(batch)]
        async with client.start_session() as s, await s.start_transaction():
            await coll.bulk_write(ops, ordered=False, session=s)
        n, version = n + batch, version + 1
    rate = n / (time.perf_counter() - start)
    await client.drop_database("msgcore_bench_raw")
    return rate


async def oplog_writes(client: AsyncMongoClient, db_name: str, since: Any) -> int:
    """Document writes to `db_name` recorded in the oplog after `since` (transactions unpacked)."""
    count = 0
    prefix = db_name + "."
    async for entry in client.local["oplog.rs"].find({"ts": {"$gt": since}}):
        inner = entry.get("o", {}).get("applyOps") if entry.get("op") == "c" else None
        if inner is not None:
            count += sum(1 for op in inner if str(op.get("ns", "")).startswith(prefix))
        elif str(entry.get("ns", "")).startswith(prefix):
            count += 1
    return count


class RssSampler(threading.Thread):
    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack, self.peak, self.done = stack, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for name, mb in self.stack.rss_mb().items():
                self.peak[name] = max(self.peak.get(name, 0.0), mb)


async def post_all(stack: Stack, key: str, n: int, batch: int, concurrency: int) -> float:
    bodies = [{"messages": [{"to": f"+4917{(start + i):09d}", "from": "bench", "text": f"Your code is {start + i:06d}"}
                            for i in range(min(batch, n - start))]} for start in range(0, n, batch)]
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def sender(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            r = await http.post("/v1/messages", json=body)
            if r.status_code != 202:
                raise RuntimeError(f"POST /v1/messages answered {r.status_code}: {r.text[:300]}")

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=120) as http:
        await asyncio.gather(*(sender(http) for _ in range(concurrency)))
    return time.perf_counter() - start


async def latencies(client: AsyncMongoClient, db_name: str, journal: Path) -> dict[str, list[float]]:
    accepted: dict[str, datetime] = {}
    billed: dict[str, datetime] = {}
    to_of: dict[str, str] = {}
    async for e in client[db_name]["events"].find({"type": {"$in": ["accepted", "billed"]}},
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
            "accepted->billed": [(billed[m] - accepted[m]).total_seconds() * 1000 for m in billed]}


async def idle_probes(stack: Stack, client: AsyncMongoClient, db_name: str, key: str, n: int) -> dict[str, list[float]]:
    """Latency with no backlog: single messages posted one at a time, each awaited until billed."""
    store = EventStore(client[db_name])
    out: dict[str, list[float]] = {"accepted->sent": [], "accepted->billed": []}
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}) as http:
        for i in range(n):
            r = await http.post("/v1/messages", json={"to": f"+4916{i:09d}", "from": "probe", "text": "probe"})
            mid = r.json()["id"]
            for _ in range(600):
                head = await store.head(mid)
                if head and head.get("billed"):
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


async def bench(args: argparse.Namespace, mongo_url: str, pg_url: str, work: Path) -> None:
    client: AsyncMongoClient = AsyncMongoClient(mongo_url, tz_aware=True)
    raw = await raw_write_rate(client)
    raw_replace = await raw_replace_rate(client)
    stack = Stack(mongo_url, pg_url, f"bench_{int(time.time())}", f"bench_{int(time.time())}", work / "stack",
                  receipt_delay_s=args.receipt_delay)
    keys = await seed(mongo_url, stack.mongo_db, [Route(id="sim", port=stack.sim_port, price_per_part=5,
                                                        window=args.window)], ["bench"])
    stack.start_all()
    sampler = RssSampler(stack)
    try:
        await asyncio.to_thread(stack.wait_http)
        await asyncio.sleep(2)  # let every worker connect and bind
        sampler.start()
        db = client[stack.mongo_db]
        op_start = (await client.admin.command("hello"))["operationTime"]
        cpu0 = stack.cpu_s()
        t0 = time.perf_counter()
        post_s = await post_all(stack, keys["bench"], args.messages, args.batch, args.concurrency)
        # One index probe per poll: counting documents would itself load the server under test.
        store = EventStore(db)
        while await store.any_unfinished():
            await asyncio.sleep(0.5)
        billed_s = time.perf_counter() - t0
        cpu1 = stack.cpu_s()
        t_billed = time.perf_counter()
        total_events = await db["events"].count_documents({})
        while pg_count(stack, "message_events") < total_events:
            await asyncio.sleep(0.1)
        lag_s = time.perf_counter() - t_billed
        writes = await oplog_writes(client, stack.mongo_db, op_start)
        lat = await latencies(client, stack.mongo_db, stack.journal)
        probes = await idle_probes(stack, client, stack.mongo_db, keys["bench"], args.probes)
    finally:
        sampler.done.set()
        stack.stop_all()
        await client.drop_database(stack.mongo_db)
        await client.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(stack.schema)))

    n = args.messages
    per_msg = writes / n
    print(f"\nmsgcore end-to-end benchmark: {n} messages, batches of {args.batch}, {args.concurrency} clients")
    print(f"  accepted                 {n / post_s:9.0f} msg/s   ({post_s:.1f} s)")
    print(f"  delivered and billed     {n / billed_s:9.0f} msg/s   ({billed_s:.1f} s from first POST)")
    for name, values in lat.items():
        print(f"  {name:24} p50 {pct(values, 50):7.0f} ms  p95 {pct(values, 95):7.0f} ms  p99 {pct(values, 99):7.0f} ms"
              f"  (n={len(values)}, mean {statistics.fmean(values) if values else float('nan'):.0f} ms)")
    for name, values in probes.items():
        print(f"  idle {name:19} p50 {pct(values, 50):7.0f} ms  p95 {pct(values, 95):7.0f} ms"
              f"  p99 {pct(values, 99):7.0f} ms  (n={len(values)} single messages, no backlog)")
    print(f"  projector lag at end     {lag_s:9.2f} s")
    print(f"  MongoDB writes/message   {per_msg:9.2f}   (oplog entries for the run's database)")
    limit = raw / per_msg
    rate = n / billed_s
    print(f"  MongoDB raw write rate   {raw:9.0f} docs/s inserted in batches -> limit {limit:.0f} msg/s at"
          f" {per_msg:.1f} writes/msg; achieved {100 * rate / limit:.0f} %")
    # Six of the writes per message are head updates (one insert, five replaces/updates).
    mixed = 1 / ((per_msg - 6) / raw + 6 / raw_replace)
    print(f"  MongoDB raw replace rate {raw_replace:9.0f} docs/s in transactions -> limit {mixed:.0f} msg/s with"
          f" 6 head updates/msg; achieved {100 * rate / mixed:.0f} %")
    print("  CPU s per 1,000 msgs     " + "  ".join(f"{k}={1000 * (cpu1[k] - cpu0.get(k, 0)) / n:.2f}"
                                                  for k in cpu1))
    msgcore_cpu = sum(cpu1[k] - cpu0.get(k, 0) for k in cpu1 if k != "smsc-sim")
    print(f"  CPU per message (msgcore processes, simulator excluded) {1000 * msgcore_cpu / n:.2f} ms")
    print("  peak RSS MB              " + "  ".join(f"{k}={v:.0f}" for k, v in sorted(sampler.peak.items())))


def main() -> None:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--receipt-delay", type=float, default=0.2)
    p.add_argument("--probes", type=int, default=30, help="single messages timed after the run, with no backlog")
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="msgcore-bench-") as tmp, store_servers(Path(tmp)) as servers:
        asyncio.run(bench(args, servers.mongo_url, servers.pg_url, Path(tmp)))

if __name__ == "__main__":
    main()
