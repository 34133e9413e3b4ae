"""Projector benchmark: replay and steady-state throughput, follow lag, rebuild time and memory.

    python -m ops.bench_projector --events 1000000 [--batch 1000] [--follow-events M] [--rate R]

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
import gc
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg
from bson import ObjectId
from psycopg import sql
from pymongo import DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from core.store.eventstore import EventStore
from ops.bench_support import pct, postgres_pid
from ops.embedded import EmbeddedMongo, EmbeddedPostgres
from projections.projector import Projector
from projections.rebuild import rebuild

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
TENANTS = ("acme", "globex", "initech", "umbrella", "hooli")
# (route id, price per part in minor units, currency, share of the traffic)
ROUTES = (("de-tmo", 5, "EUR", 4), ("de-vf", 6, "EUR", 3), ("uk-o2", 4, "GBP", 2), ("intl", 9, "EUR", 1))
EVENTS_PER_MESSAGE = 5
MB = 2**20
CATCHUP_MARGIN = timedelta(seconds=300)  # Projector's default catchup_margin_s


def log(text: str) -> None:
    print(f"{datetime.now(UTC).strftime('%H:%M:%SZ')} {text}", flush=True)


def ulid(ms: int, salt: int, index: int) -> str:
    """A ULID-shaped message id: time-ordered like `core.ids.new_message_id`, unique by `index`."""
    value = (ms << 80) | ((salt & 0xFFFFFF) << 56) | (index & (2**56 - 1))
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


# --- event documents -------------------------------------------------------------------------------


@dataclass
class Lifecycles:
    """Generates full message lifecycles as event documents, in the order the log would hold them."""

    salt: int
    rng: random.Random = field(default_factory=lambda: random.Random(4711))
    _route_pool: list[tuple[str, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._route_pool = [(r, p, c) for r, p, c, share in ROUTES for _ in range(share)]

    def message(self, index: int, accepted_at: datetime) -> list[dict[str, Any]]:
        rng = self.rng
        tenant = TENANTS[index % len(TENANTS)]
        route, price, currency = rng.choice(self._route_pool)
        parts = 1 if rng.random() < 0.8 else rng.randint(2, 4)
        ms = int(accepted_at.timestamp() * 1000)
        mid = ulid(ms, self.salt, index)
        campaign = f"{tenant}-c{(index // 5000) % 40:02d}" if rng.random() < 0.4 else None
        smsc_ids = [f"{route}-{index:x}-{p}" for p in range(parts)]
        delivered = rng.random() >= 0.06
        t_routed = accepted_at + timedelta(milliseconds=rng.randint(5, 80))
        t_sent = t_routed + timedelta(milliseconds=rng.randint(20, 400))
        t_receipt = t_sent + timedelta(milliseconds=rng.randint(800, 20_000))
        t_billed = t_receipt + timedelta(milliseconds=rng.randint(5, 200))
        receipt = {"route_id": route, "smsc_message_id": smsc_ids[0], "stat": "DELIVRD" if delivered else "UNDELIV",
                   "err": "000" if delivered else "001", "done_at": t_receipt}
        kinds: list[tuple[str, datetime, dict[str, Any]]] = [
            ("accepted", accepted_at, {
                "to": f"+49151{index % 10**8:08d}", "sender": tenant, "text": f"Your code is {index % 10**6:06d}",
                "encoding": "gsm7", "parts": parts, "priority": 0 if campaign else 10, "validity_s": 172_800,
                "send_at": None, "campaign_id": campaign, "client_ref": None}),
            ("routed", t_routed, {"route_id": route, "price_per_part": price, "currency": currency,
                                  "strategy": "failover"}),
            ("sent", t_sent, {"route_id": route, "smsc_message_ids": smsc_ids, "attempt": 1, "parts": parts}),
            ("delivered" if delivered else "undelivered", t_receipt, receipt),
            ("billed", t_billed, {"route_id": route, "parts": parts, "price_per_part": price,
                                  "amount": parts * price, "currency": currency}),
        ]
        return [{"message_id": mid, "seq": seq, "type": kind, "at": _ms(at), "tenant_id": tenant,
                 "route_id": None if kind == "accepted" else route, "channel": "sms", "v": 1, "data": data}
                for seq, (kind, at, data) in enumerate(kinds, start=1)]

    def chunks(self, first: int, messages: int, start: datetime, spacing_s: float,
               per_chunk: int) -> Iterator[list[dict[str, Any]]]:
        """Events of `messages` messages (indexes from `first`), `per_chunk` messages at a time,
        each chunk in time order (messages accepted `spacing_s` apart, many in flight at once)."""
        for lo in range(0, messages, per_chunk):
            docs: list[dict[str, Any]] = []
            for i in range(lo, min(messages, lo + per_chunk)):
                docs.extend(self.message(first + i, start + timedelta(seconds=i * spacing_s)))
            docs.sort(key=lambda d: d["at"])
            yield docs


def _ms(t: datetime) -> datetime:
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


# --- memory sampling ---------------------------------------------------------------------------------


def _tree_rss(pid: int) -> tuple[float, float] | None:
    """(sum of RSS over the process and its descendants, largest single RSS) in MB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    values = []
    for p in procs:
        try:
            values.append(p.memory_info().rss / MB)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return (sum(values), max(values)) if values else None


class RssSampler(threading.Thread):
    """Peak RSS per phase: this process, and the server process trees it knows the pids of."""

    def __init__(self, servers: dict[str, int], interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.servers, self.interval_s = servers, interval_s
        self.me = psutil.Process()
        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self.done = threading.Event()
        self._lock = threading.Lock()

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
        self.sample()

    def sample(self) -> None:
        values = {"bench": self.me.memory_info().rss / MB}
        for name, pid in self.servers.items():
            tree = _tree_rss(pid)
            if tree is not None:
                values[f"{name} (sum)"], values[f"{name} (max proc)"] = tree
        with self._lock:
            peak = self.peaks.setdefault(self.phase, {})
            for k, v in values.items():
                peak[k] = max(peak.get(k, 0.0), v)

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()


# --- steps -------------------------------------------------------------------------------------------


@dataclass
class Figures:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name:44} {value}", flush=True)


async def load(events: AsyncCollection[dict[str, Any]], gen: Lifecycles, n: int, days: float, insert_batch: int,
               fig: Figures) -> int:
    messages = max(1, n // EVENTS_PER_MESSAGE)
    start = datetime.now(UTC) - timedelta(days=days, hours=1)
    spacing = days * 86_400 / messages
    per_chunk = max(1, insert_batch // EVENTS_PER_MESSAGE)
    await EventStore(events.database).ensure_indexes()
    inserted, gen_s, last_report = 0, 0.0, time.perf_counter()
    t0 = time.perf_counter()
    chunks = gen.chunks(0, messages, start, spacing, per_chunk)
    while True:
        g0 = time.perf_counter()
        docs = next(chunks, None)
        gen_s += time.perf_counter() - g0
        if docs is None:
            break
        await events.insert_many(docs, ordered=False)
        inserted += len(docs)
        if time.perf_counter() - last_report >= 15:
            last_report = time.perf_counter()
            log(f"load: {inserted}/{messages * EVENTS_PER_MESSAGE} events, "
                f"{inserted / (last_report - t0):.0f} docs/s")
    wall = time.perf_counter() - t0
    print(f"\n1. Load: {inserted} events ({messages} messages, {len(TENANTS)} tenants, {len(ROUTES)} routes, "
          f"{days:g} days) in insert_many batches of {per_chunk * EVENTS_PER_MESSAGE} (unordered)")
    fig.add("load rate (wall, incl. generating docs)", f"{inserted / wall:9.0f} docs/s   ({wall:.1f} s)")
    fig.add("load rate (server time only)", f"{inserted / max(wall - gen_s, 1e-9):9.0f} docs/s   "
            f"({wall - gen_s:.1f} s inserting, {gen_s:.1f} s generating)")
    return inserted


async def checkpoint_applied(pg_url: str, schema: str) -> int | None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL("SELECT events_applied FROM {}.checkpoints WHERE projection = %s").format(
            sql.Identifier(schema)), ("reporting",))
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def pg_count(pg_url: str, schema: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema),
                                                                            sql.Identifier(table)))
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _wait_applied(projector: Projector, task: asyncio.Task[None], target: int, timeout_s: float,
                        poll_s: float = 0.005) -> float:
    deadline = time.perf_counter() + timeout_s
    while projector.stats.applied < target:
        if task.done():
            task.result()
            raise RuntimeError("the projector stopped")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"projector applied {projector.stats.applied} of {target} within {timeout_s:.0f}s")
        await asyncio.sleep(poll_s)
    return time.perf_counter()


async def projector_steps(args: argparse.Namespace, events: AsyncCollection[dict[str, Any]], pg_url: str, schema: str,
                          gen: Lifecycles, n_loaded: int, load_rate: float, sampler: RssSampler,
                          fig: Figures) -> int:
    follow_messages = max(1, args.follow_events // EVENTS_PER_MESSAGE)
    # Generated before any clock starts; `at` spread over the insertion window, starting now.
    rate = args.rate if args.rate > 0 else max(500.0, 0.5 * load_rate)
    follow_s = follow_messages * EVENTS_PER_MESSAGE / rate
    per_chunk = max(1, args.follow_batch // EVENTS_PER_MESSAGE)
    batches = list(gen.chunks(10**9, follow_messages, datetime.now(UTC) + timedelta(seconds=30),
                              follow_s / follow_messages, per_chunk))
    m = sum(len(b) for b in batches)

    print(f"\n2. Projector on a fresh schema, batch {args.batch}: replay of {n_loaded} events, "
          f"then following while {m} events are inserted at {rate:.0f} events/s")
    sampler.set_phase("replay")
    projector = Projector(events, pg_url, schema, batch_size=args.batch)
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(projector.run(stop), name="bench-projector")
    try:
        t_replayed = await _wait_applied(projector, task, n_loaded, timeout_s=args.timeout, poll_s=0.05)
        replay_s = t_replayed - t0
        fig.add("replay (fresh schema, sorted scan)", f"{n_loaded / replay_s:9.0f} events/s   ({replay_s:.1f} s)")
        sampler.set_phase("follow")
        await asyncio.sleep(1.0)  # the follow loop is waiting on the change stream
        base = projector.stats.applied
        ck_base = await checkpoint_applied(pg_url, schema)

        # applied-counter samples, for per-batch lag and windowed rates
        samples: list[tuple[float, int]] = []
        sampling = True

        async def sample_applied() -> None:
            while sampling:
                samples.append((time.perf_counter(), projector.stats.applied - base))
                await asyncio.sleep(0.005)

        sampler_task = asyncio.create_task(sample_applied())
        inserted_at: list[tuple[float, int]] = []  # (insert returned, cumulative events inserted)
        total = 0
        t_first = time.perf_counter()
        for k, docs in enumerate(batches):
            due = t_first + k * len(batches[0]) / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await events.insert_many(docs, ordered=False)
            total += len(docs)
            inserted_at.append((time.perf_counter(), total))
        t_last_insert = inserted_at[-1][0]
        t_done = await _wait_applied(projector, task, base + m, timeout_s=args.timeout)
        sampling = False
        await sampler_task
        samples.append((t_done, projector.stats.applied - base))
        ck_end = await checkpoint_applied(pg_url, schema)
    finally:
        stop.set()
        await task
    del batches
    gc.collect()

    insert_s = t_last_insert - t_first
    # lag of each insert batch: from its insert returning to the projector having applied it
    lags: list[float] = []
    j = 0
    for t_ins, cum in inserted_at:
        while j < len(samples) and samples[j][1] < cum:
            j += 1
        if j < len(samples):
            lags.append(max(0.0, samples[j][0] - t_ins))
    applied_in_window = max((a for t, a in samples if t <= t_last_insert), default=0)
    backlog = max((cum - next((a for t, a in samples if t >= t_ins), m)) for t_ins, cum in inserted_at)
    # windowed rates (1 s windows) while inserting, first and last second dropped
    rates = []
    w0 = t_first + 1.0
    while w0 + 1.0 <= t_last_insert:
        a0 = max((a for t, a in samples if t <= w0), default=0)
        a1 = max((a for t, a in samples if t <= w0 + 1.0), default=0)
        rates.append(a1 - a0)
        w0 += 1.0
    fig.add("follow: insert rate achieved", f"{m / max(insert_s, 1e-9):9.0f} events/s   ({insert_s:.1f} s, "
            f"batches of {batches_size(inserted_at)})")
    fig.add("follow: applied while inserting", f"{applied_in_window / max(insert_s, 1e-9):9.0f} events/s")
    if rates:
        fig.add("follow: applied per 1 s window (p50/min/max)",
                f"{statistics.median(rates):9.0f} / {min(rates):.0f} / {max(rates):.0f} events/s")
    fig.add("follow: applied, first insert -> all applied", f"{m / (t_done - t_first):9.0f} events/s   "
            f"({t_done - t_first:.1f} s)")
    fig.add("follow: lag per insert batch (p50/p95/max)",
            f"{pct(lags, 50):9.3f} / {pct(lags, 95):.3f} / {max(lags, default=float('nan')):.3f} s")
    fig.add("follow: max backlog (inserted, not applied)", f"{backlog:9d} events")
    fig.add("follow: lag at end (last insert -> applied)", f"{t_done - t_last_insert:9.3f} s")
    # Kept up: it applied (nearly) everything while the inserts went on and drained the rest at once.
    kept_up = t_done - t_last_insert < 2.0 and applied_in_window >= 0.95 * m
    fig.add("follow: projector kept up with the inserts", "      yes   (applied rate = insert rate: a lower bound "
            "of its capacity)" if kept_up else "       no   (applied rate while inserting = its capacity)")
    fig.add("follow: checkpoint events_applied delta", f"{(ck_end or 0) - (ck_base or 0):9d}   "
            f"(stats: {m} new, {projector.stats.batches} batches in all, "
            f"{projector.stats.streams_opened} stream(s) opened)")
    return m


def batches_size(inserted_at: list[tuple[float, int]]) -> int:
    return inserted_at[0][1] if inserted_at else 0


async def catchup_probe(events: AsyncCollection[dict[str, Any]], batch: int, fig: Figures) -> None:
    """Cost of the queries the rebuild's catch-up makes against the full log: one page of the
    `_id`-range scan (the Projector's catch-up page) and the newest event by `_id`."""
    now = datetime.now(UTC)
    lo, hi = ObjectId.from_datetime(now - CATCHUP_MARGIN), ObjectId.from_datetime(now + CATCHUP_MARGIN)
    t0 = time.perf_counter()
    page = await events.find({"_id": {"$gte": lo, "$lte": hi}}, sort=[("_id", 1)], limit=batch).to_list(None)
    t1 = time.perf_counter()
    await events.find({}, {"message_id": 1, "seq": 1}).sort("_id", DESCENDING).limit(1).to_list(1)
    t2 = time.perf_counter()
    fig.add("catch-up page query (_id range, limit batch)", f"{t1 - t0:9.2f} s   ({len(page)} events in the "
            f"{CATCHUP_MARGIN.total_seconds():.0f} s window now)")
    fig.add("newest-event query (sort _id desc, limit 1)", f"{t2 - t1:9.2f} s")


async def rebuild_step(args: argparse.Namespace, events: AsyncCollection[dict[str, Any]], pg_url: str,
                       schema: str, total: int, sampler: RssSampler, fig: Figures) -> None:
    print(f"\n3. Rebuild of schema {schema} from the whole log ({total} events), batch {args.batch}, "
          "no live projector running")
    phases: list[tuple[float, str]] = []
    last_progress = [time.perf_counter()]

    def on_phase(text: str) -> None:
        phases.append((time.perf_counter(), text))
        log(f"rebuild: {text}")

    def on_progress(done: int, estimate: int) -> None:
        if time.perf_counter() - last_progress[0] >= 30:
            last_progress[0] = time.perf_counter()
            log(f"rebuild: replayed {done}/{estimate}")

    gc.collect()
    sampler.set_phase("rebuild-baseline")
    sampler.set_phase("rebuild")
    t0 = time.perf_counter()
    result = await rebuild(events, pg_url, schema, batch_size=args.batch, stop_live=True,
                           catch_up_timeout_s=args.timeout, progress=on_progress, phase=on_phase)
    wall = time.perf_counter() - t0
    sampler.set_phase("after")
    rows = await pg_count(pg_url, schema, "message_events")
    fig.add("rebuild: wall time", f"{wall:9.1f} s   (RebuildResult.seconds {result.seconds:.1f})")
    fig.add("rebuild: events/s (replayed+followed / wall)",
            f"{(result.replayed + result.followed) / wall:9.0f} events/s   "
            f"({result.replayed} replayed, {result.followed} followed)")
    ends = [*phases[1:], (t0 + wall, "end")]
    labels = {"replaying": "replay into the shadow", "catching": "catch-up (shadow projector)",
              "stopping": "stop the live projector (lock)", "final": "final catch-up", "swapping": "swap"}
    for (t_start, text), (t_end, _) in zip(phases, ends, strict=True):
        label = labels.get(text.split()[0])
        if label is None:
            continue
        extra = ""
        if text.startswith("replaying"):
            extra = f"   -> {result.replayed / max(t_end - t_start, 1e-9):.0f} events/s"
        fig.add(f"rebuild phase: {label}", f"{t_end - t_start:9.1f} s{extra}")
    base = sampler.peaks.get("rebuild-baseline", {})
    peak = sampler.peaks.get("rebuild", {})
    for k in sorted(peak):
        fig.add(f"rebuild: peak RSS {k}", f"{peak[k]:9.0f} MB   (before: {base.get(k, float('nan')):.0f} MB)")
    fig.add("rebuild: message_events rows after swap", f"{rows:9d}   (log: {total})")


async def bench(args: argparse.Namespace, mongo_url: str, pg_url: str, sampler: RssSampler,
                external: tuple[bool, bool]) -> None:
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
        settle = 0.0 if args.skip_rebuild else args.settle if args.settle >= 0 else CATCHUP_MARGIN.total_seconds() + 10
        if settle > 0:
            # The rebuild's shadow projector re-reads every event whose `_id` is within the catch-up
            # margin of its replay's start, one `_id`-range page at a time; waiting this long keeps
            # the follow phase's events out of that window (see the catch-up probe figures).
            sampler.set_phase("settle")
            log(f"waiting {settle:.0f} s before the rebuild (--settle)")
            await asyncio.sleep(settle)
        if args.skip_rebuild:
            print("\n3. Rebuild: skipped (--skip-rebuild)")
        else:
            await catchup_probe(events, args.batch, fig)
            await rebuild_step(args, events, pg_url, schema, n + m, sampler, fig)
    finally:
        # Embedded servers live in a temp dir that goes away; external ones are cleaned up.
        if external[0]:
            await client.drop_database(db_name)
        if external[1]:
            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
                cur = await conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (schema + "%",))
                for (name,) in await cur.fetchall():
                    await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        await client.close()

    print(f"\n4. Summary (N={args.events}, batch {args.batch}, total {time.perf_counter() - started:.0f} s; "
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


def main() -> None:
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
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="msgcore-bench-projector-") as tmp:
        work = Path(tmp)
        mongo_url, pg_url = os.environ.get("MSGCORE_MONGO_URL", ""), os.environ.get("MSGCORE_PG_URL", "")
        external = (bool(mongo_url), bool(pg_url))
        mongo: EmbeddedMongo | None = None
        pg: EmbeddedPostgres | None = None
        sampler: RssSampler | None = None
        try:
            pids: dict[str, int] = {}
            if not mongo_url:
                mongo = EmbeddedMongo(work)
                mongo.start()
                mongo_url = mongo.url
                if mongo.proc is not None:
                    pids["mongo"] = mongo.proc.pid
            if not pg_url:
                pg = EmbeddedPostgres(work)
                pg.start()
                pg_url = pg.url
                pid = postgres_pid(pg)
                if pid is not None:
                    pids["postgres"] = pid
            sampler = RssSampler(pids)
            sampler.start()
            print(f"servers: mongo {'embedded pid ' + str(pids['mongo']) if 'mongo' in pids else 'external'}, "
                  f"postgres {'embedded pid ' + str(pids['postgres']) if 'postgres' in pids else 'external'}; "
                  f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GB RAM, load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
            asyncio.run(bench(args, mongo_url, pg_url, sampler, external))
        finally:
            if sampler is not None:
                sampler.done.set()
            if pg is not None:
                pg.stop()
            if mongo is not None:
                mongo.stop()


if __name__ == "__main__":
    main()
