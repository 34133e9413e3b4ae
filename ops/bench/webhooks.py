"""Status webhooks benchmark: deliveries per second to a local receiver, and the extra documents the
webhooks write per message.

    python -m ops.bench.webhooks [--messages 1000] [--endpoints 2]

On the embedded MongoDB-wire server (or MSGCORE_MONGO_URL): registers `--endpoints` endpoints of
one tenant (events ["*"]) on a receiver in its own process (asyncio, HTTP/1.1 keep-alive, checks
every signature with its own HMAC code); writes `--messages` messages of four events each
(accepted, routed, sent, delivered) while the fan-out follows the change stream; then runs the
dispatcher until every hook topic's checkpoint reaches its counter. Prints the fan-out and dispatch
rates, CPU per 1,000 deliveries, and the documents written by the webhooks per message (jobs,
topic counters, checkpoints, attempts, owner writes, delivery records), against the issue's
targets (>= 1,000 deliveries/s; <= 1 extra document per message).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from core.domain.events import utcnow
from core.ids import new_message_id
from core.store.change_feed import ChangeFeed
from core.store.eventstore import EventStore
from core.store.mongo import connect
from core.store.owners import Owners
from core.store.submission import accepted_write
from core.store.topics import EventLog, Write
from core.store.webhook_queue import WebhookQueue
from core.store.webhooks import Webhook, WebhookStore
from core.workers.webhooks import WebhookDispatcher
from core.workers.webhooks_dispatch import DispatchSettings
from core.workers.webhooks_fanout import FanOut
from core.workers.webhooks_send import HookSender
from ops.bench.support import line, note
from ops.embedded import EmbeddedMongo

TENANT = "bench"
LATER = ("routed", "sent", "delivered")


# ---- the receiver (its own process) ----------------------------------------------------------------

def _receiver(port: Any, counts: Any, secrets: dict[str, str], ready: Any) -> None:
    known: dict[str, str] = {}  # `secrets` is a manager's proxy: one round trip per path, not per request

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                fields = dict(h.split(b":", 1) for h in head.split(b"\r\n")[1:] if b":" in h)
                headers = {k.strip().lower(): v.strip() for k, v in fields.items()}
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                path = head.split(b" ", 2)[1].decode()
                if path not in known:
                    known[path] = secrets.get(path, "")
                ok = _verify(known[path], headers.get(b"msgcore-signature", b"").decode(), body)
                with counts.get_lock():
                    counts[0 if ok else 1] += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port.value = server.sockets[0].getsockname()[1]
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _verify(secret: str, header: str, body: bytes) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    mac = hmac.new(secret.encode(), parts.get("t", "").encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, parts.get("v1", ""))


# ---- the run ---------------------------------------------------------------------------------------

async def _wait(predicate: Callable[[], Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: not done within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


async def _load(db: Any, messages: int, rate: float) -> None:
    """`messages` messages of four events: accepted, then the later three, in chunks of 100 (or, at
    `rate` messages/s, a tenth of a second's worth every tenth of a second)."""
    store, log = EventStore(db), EventLog(db)
    chunk = 100 if not rate else max(1, round(rate / 10))
    started = time.monotonic()
    for start in range(0, messages, chunk):
        if rate:
            await asyncio.sleep(max(0.0, started + start / rate - time.monotonic()))
        now = utcnow()
        ids = [new_message_id() for _ in range(min(chunk, messages - start))]
        await store.accept([accepted_write(_accepted(m, now), now) for m in ids])
        await log.commit([Write(m, [{"message_id": m, "seq": 2 + i, "type": t, "at": now, "tenant_id": TENANT,
                                     "channel": "sms", "v": 1, "data": {"route_id": "sim"}}
                                    for i, t in enumerate(LATER)]) for m in ids])


def _accepted(message_id: str, now: Any) -> Any:
    from core.domain.events import Event, EventType

    return Event(message_id=message_id, seq=1, type=EventType.ACCEPTED, at=now, tenant_id=TENANT, data={
        "to": "+4915112345678", "sender": "bench", "text": "hello", "encoding": "gsm7", "parts": 1, "priority": 10,
        "validity_s": 3600, "send_at": None, "campaign_id": None, "client_ref": None})


async def bench(args: argparse.Namespace, mongo_url: str, receiver_port: int, counts: Any) -> dict[str, Any]:
    client = connect(mongo_url, "bench-webhooks")
    db = client[f"bench_webhooks_{os.getpid()}"]
    try:
        store, queue, owners = WebhookStore(db), WebhookQueue(db), Owners(db)
        for s in (EventStore(db), store, queue, owners):
            await s.ensure_indexes()
        hooks = [await store.create(TENANT, f"http://127.0.0.1:{receiver_port}/h{i}", ["*"], utcnow())
                 for i in range(args.endpoints)]
        args.secrets.update({f"/h{i}": h.secret for i, h in enumerate(hooks)})
        fig: dict[str, Any] = {}
        if not args.rate:  # capacity: every job written first, then dispatched flat out
            await _fan_out(db, store, queue, owners, args, fig)
            run = _Dispatch(store, queue, owners, hooks, args)
        else:  # paced: fan-out and dispatcher follow the load as they would in production
            run = _Dispatch(store, queue, owners, hooks, args)
            await _fan_out(db, store, queue, owners, args, fig)
        await run.finish(fig, counts)
        return fig
    finally:
        await client.drop_database(db.name)
        await client.close()


async def _fan_out(db: Any, store: WebhookStore, queue: WebhookQueue, owners: Owners, args: argparse.Namespace,
                   fig: dict[str, Any]) -> None:
    stop = asyncio.Event()
    fan = FanOut(ChangeFeed(db["events"]), store, queue, owners, utcnow, "bench-fanout", refresh_s=1.0)
    task = asyncio.create_task(fan.run(stop))
    await _wait(lambda: _true_if(queue.fanout_token(), lambda t: t[0] is not None), 30)
    note(f"writing {args.messages} messages x 4 events while the fan-out follows")
    started = time.perf_counter()
    await _load(db, args.messages, args.rate)
    expected = args.messages * 4 * args.endpoints
    await _wait(lambda: _true_if(asyncio.sleep(0), lambda _: fan.stats["events"] >= expected), 300)
    fig["fanout_s"] = time.perf_counter() - started
    stop.set()
    await task
    fig["fanout"] = dict(fan.stats)


class _Dispatch:
    """The dispatcher running from construction until `finish` sees every hook topic drained."""

    def __init__(self, store: WebhookStore, queue: WebhookQueue, owners: Owners, hooks: list[Webhook],
                 args: argparse.Namespace) -> None:
        self.queue, self.hooks = queue, hooks
        self.sender = HookSender(timeout_s=10, allow_loopback=True)
        settings = DispatchSettings(batch_jobs=args.batch_jobs, endpoint_concurrency=args.endpoint_concurrency)
        self.d = WebhookDispatcher(store, queue, owners, self.sender, utcnow, "bench-dispatcher", settings,
                                   refresh_s=0.2, concurrency=args.concurrency)
        self.stop = asyncio.Event()
        self.cpu0 = time.process_time()
        note(f"dispatching to {len(hooks)} endpoint(s)")
        self.started = time.perf_counter()
        self.task = asyncio.create_task(self.d.run(self.stop))

    async def finish(self, fig: dict[str, Any], counts: Any) -> None:
        async def drained() -> bool:
            pos = await self.queue.positions([h.topic for h in self.hooks])
            return all(end > 0 and start == end for start, end in pos.values())

        await _wait(drained, 600)
        fig["dispatch_s"] = time.perf_counter() - self.started
        fig["dispatch_cpu_s"] = time.process_time() - self.cpu0
        fig["dispatch"] = {k: sum(o.dispatch.stats[k] for o in self.d.owned.values())
                           for k in ("batches", "events", "docs")}
        fig["valid"], fig["invalid"] = counts[0], counts[1]
        self.stop.set()
        await self.task
        await self.sender.close()


async def _true_if(awaitable: Any, test: Callable[[Any], bool]) -> bool:
    return test(await awaitable)


def _print(args: argparse.Namespace, fig: dict[str, Any]) -> None:
    fan, dis = fig["fanout"], fig["dispatch"]
    deliveries = dis["events"]
    rate = deliveries / fig["dispatch_s"]
    extra = fan["docs"] + dis["docs"]
    mode = f"paced at {args.rate:g} messages/s" if args.rate else "capacity (jobs first, then dispatch)"
    print(f"\nwebhooks, {mode}: {args.messages} messages x 4 events, {args.endpoints} endpoint(s) ['*'], "
          f"{psutil.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    line("fan-out", f"{fan['events']} event copies in {fan['jobs']} jobs, {fan['commits']} commits, "
                    f"{fig['fanout_s']:.2f} s (load included)")
    target = "paced: follows the load" if args.rate else "target >= 1,000/s"
    line("deliveries", f"{deliveries} in {fig['dispatch_s']:.2f} s = {rate:,.0f}/s ({target}); "
                       f"{dis['batches']} batches")
    line("receiver signature check", f"{fig['valid']} valid, {fig['invalid']} invalid")
    cpu_ms = 1_000_000 * fig["dispatch_cpu_s"] / max(1, deliveries)
    what = "dispatcher, fan-out and load" if args.rate else "dispatcher only"
    line("bench process CPU", f"{cpu_ms:.0f} ms per 1,000 deliveries ({what})")
    line("documents written", f"fan-out {fan['docs']} (jobs, counters, token), dispatch {dis['docs']} (attempts, "
                              "owner, records, checkpoints)")
    line("extra documents/message", f"{extra / args.messages:.3f} (target <= 1; events per message: 4)")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--endpoints", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=64, help="POSTs in flight, all endpoints")
    p.add_argument("--endpoint-concurrency", type=int, default=32, help="messages in flight per endpoint")
    p.add_argument("--batch-jobs", type=int, default=20, help="jobs per dispatcher batch")
    p.add_argument("--rate", type=float, default=0.0, help="messages/s written while fan-out and dispatcher run "
                   "(0: write all first, then dispatch flat out: the capacity)")
    return p.parse_args()


def main() -> None:
    args = _args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    manager = mp.Manager()
    args.secrets = manager.dict()
    port, counts, ready = mp.Value("i", 0), mp.Array("q", 2), mp.Event()
    receiver = mp.Process(target=_receiver, args=(port, counts, args.secrets, ready), daemon=True)
    receiver.start()
    ready.wait(30)
    mongo = None
    with tempfile.TemporaryDirectory(prefix="msgcore-bench-webhooks-") as tmp:
        try:
            url = os.environ.get("MSGCORE_MONGO_URL", "")
            if not url:
                mongo = EmbeddedMongo(Path(tmp))
                mongo.start()
                url = mongo.url
            fig = asyncio.run(bench(args, url, port.value, counts))
            _print(args, fig)
        finally:
            if mongo is not None:
                mongo.stop()
            receiver.terminate()
            manager.shutdown()


if __name__ == "__main__":
    main()
