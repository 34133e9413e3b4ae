"""E-mail benchmark: N e-mails posted over HTTP to a running stack with `mail-sim` as the provider.

    python -m ops.bench.email [--emails 5000] [--transport smtp|http] [--pool 4] [--batch 500] [--no-pipelining]

Starts the embedded servers in a temp dir (or uses MSGCORE_MONGO_URL / MSGCORE_PG_URL), then the api,
router, mailer, projector and mail-sim as processes (ops/stack.py), one e-mail route to mail-sim
(SMTP with `--pool` persistent connections, or its SendGrid v3 endpoint over HTTP). Not a test:
nothing here asserts.

Printed: accepted e-mails/s, sent-and-billed e-mails/s (accepted -> routed -> sent -> billed: an
e-mail is billed when the provider takes it), the .eml files mail-sim kept (each e-mail exactly once),
MongoDB documents written per e-mail by collection, CPU ms per e-mail per process and in total over
the msgcore processes, and the store's ceiling for four events per e-mail measured in the same run
(the issue's target is 500 e-mails/s or that ceiling if lower). Also printed: the rate at which the
e-mails still waiting when the last POST was answered were sent and billed (the send side alone).
`--no-pipelining`: mail-sim does not offer SMTP PIPELINING (four round trips per e-mail, not two).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from core.domain.routing import Route
from core.store.mongo import connect
from ops.bench.store_figures import PRICE, TENANT, oplog_writes, store_ceiling
from ops.bench.support import run_with_store_servers, tree_cpu_s
from ops.progress import spent_minor
from ops.stack import Stack, seed

EVENTS_PER_EMAIL = 4  # accepted, routed, sent, billed (delivery events come later from the provider)
COMPONENTS = ("mail-sim", "api", "router", "mailer", "projector")
EXCLUDED = ("mail-sim", "mongo-server", "pg-server")  # not msgcore's CPU


def bodies(n: int, batch: int) -> list[dict[str, Any]]:
    return [{"messages": [{"channel": "email", "to": f"user{start + i}@example.org", "from": "shop@acme.example",
                           "from_name": "Acme Shop", "subject": f"Your order {start + i}",
                           "text": f"Thanks for order {start + i}.", "html": f"<p>Thanks for order {start + i}.</p>"}
                          for i in range(min(batch, n - start))]} for start in range(0, n, batch)]


async def post_all(http: httpx.AsyncClient, n: int, batch: int, concurrency: int) -> float:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies(n, batch):
        queue.put_nowait(b)

    async def sender() -> None:
        while not queue.empty():
            r = await http.post("/v1/messages", json=queue.get_nowait())
            if r.status_code != 202:
                raise RuntimeError(f"POST /v1/messages answered {r.status_code}: {r.text[:300]}")

    start = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return time.perf_counter() - start


async def wait_billed(db: Any, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await spent_minor(db, TENANT) < n * PRICE:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{await spent_minor(db, TENANT) // PRICE} of {n} e-mails billed after {timeout_s:.0f}s")
        await asyncio.sleep(0.2)


def route_for(args: argparse.Namespace, stack: Stack) -> Route:
    if args.transport == "http":
        return Route(id="mail", kind="http", provider="sendgrid", base_url=f"http://127.0.0.1:{stack.mail_http_port}",
                     api_key="bench", pool=args.pool, price_per_part=PRICE)
    return Route(id="mail", kind="smtp", port=stack.mail_port, pool=args.pool, price_per_part=PRICE)


async def bench(args: argparse.Namespace, mongo_url: str, pg_url: str, work: Path, servers: dict[str, int]) -> None:
    print("measuring the store's ceiling (batched event inserts in transactions, events indexes) ...", flush=True)
    ceiling_docs = await store_ceiling(mongo_url, args.ceiling_seconds)
    client = connect(mongo_url, "bench")
    stamp = int(time.time())
    stack = Stack(mongo_url, pg_url, f"bench_{stamp}", f"bench_{stamp}", work / "stack")
    if args.no_pipelining:
        stack.extra_env["MSGCORE_MAIL_SIM_PIPELINING"] = "0"
    keys = await seed(mongo_url, stack.mongo_db, [route_for(args, stack)], [TENANT])
    stack.start_all(COMPONENTS)
    fig: dict[str, Any] = {"ceiling": ceiling_docs / EVENTS_PER_EMAIL}
    http = httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {keys[TENANT]}"}, timeout=120)
    try:
        await asyncio.to_thread(stack.wait_http)
        await asyncio.sleep(2)  # let the mailer take its route
        db = client[stack.mongo_db]
        op_start = (await client.admin.command("hello"))["operationTime"]
        cpu0 = {**stack.cpu_s(), **{k: tree_cpu_s(p) for k, p in servers.items()}}
        t0 = time.perf_counter()
        fig["post_s"] = await post_all(http, args.emails, args.batch, args.concurrency)
        fig["billed_at_post"] = await spent_minor(db, TENANT) // PRICE
        await wait_billed(db, args.emails, args.timeout)
        fig["billed_s"] = time.perf_counter() - t0
        fig["cpu"] = {k: v - cpu0.get(k, 0.0) for k, v in {
            **stack.cpu_s(), **{k: tree_cpu_s(p) for k, p in servers.items()}}.items()}
        fig["writes"] = await oplog_writes(client, stack.mongo_db, op_start)
        fig["sent_events"] = await db["events"].count_documents({"type": "sent"})
        fig["eml"] = len(list(stack.mail_sink.glob("*.eml")))
    finally:
        await http.aclose()
        stack.stop_all()
        await client.drop_database(stack.mongo_db)
        await client.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(stack.schema)))
    report(args, fig)


def report(args: argparse.Namespace, fig: dict[str, Any]) -> None:
    n = args.emails
    rate = n / fig["billed_s"]
    print(f"\nmsgcore e-mail benchmark: {n} e-mails over {args.transport} (pool {args.pool}) to mail-sim"
          f"{' (no PIPELINING)' if args.no_pipelining else ''}, batches of {args.batch}, {args.concurrency} clients")
    print(f"  accepted                 {n / fig['post_s']:9.0f} e-mails/s   ({fig['post_s']:.1f} s)")
    print(f"  sent and billed          {rate:9.0f} e-mails/s   ({fig['billed_s']:.1f} s from first POST;"
          f" {fig['sent_events']} sent events, {fig['eml']} .eml files at mail-sim)")
    left, drain_s = n - fig["billed_at_post"], fig["billed_s"] - fig["post_s"]
    if left > 0 and drain_s > 0:
        print(f"  after the last POST      {left / drain_s:9.0f} e-mails/s   ({left} e-mails left to send, "
              f"sent and billed in {drain_s:.1f} s)")
    writes: Counter[tuple[str, str]] = fig["writes"]
    by_coll = Counter[str]()
    for (coll, _), k in writes.items():
        by_coll[coll] += k
    print(f"  MongoDB writes/e-mail    {sum(writes.values()) / n:9.2f}   "
          + "  ".join(f"{c}={k / n:.3f}" for c, k in by_coll.most_common()))
    print(f"  STORE CEILING            {fig['ceiling']:9.0f} e-mails/s   (event docs/s in transactions / "
          f"{EVENTS_PER_EMAIL}); achieved {100 * rate / fig['ceiling']:.0f} % of it")
    cpu: dict[str, float] = fig["cpu"]
    print("  CPU ms per e-mail        " + "  ".join(f"{k}={1000 * v / n:.2f}" for k, v in cpu.items()))
    ours = sum(v for k, v in cpu.items() if k not in EXCLUDED)
    print(f"  CPU per e-mail           {1000 * ours / n:9.3f} ms (msgcore processes: mail-sim and store servers"
          " excluded)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emails", type=int, default=5000)
    p.add_argument("--transport", choices=("smtp", "http"), default="smtp")
    p.add_argument("--pool", type=int, default=4, help="SMTP connections (or HTTP requests in flight) of the route")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--no-pipelining", action="store_true", help="mail-sim does not offer SMTP PIPELINING")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--ceiling-seconds", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    run_with_store_servers(bench, args)


if __name__ == "__main__":
    main()
