"""Fault injection against real processes on loopback: each scenario posts a bounded number of
messages, breaks something mid-run, repairs it, waits for every message to finish, and counts.

    python -m ops.faults.run [--messages 2000] [--scenario NAME ...]

Prints a table: scenario, accepted, delivered, lost, duplicates at the SMSC, duplicates explained by
policy (a `sent` marked possible_duplicate, or a retry after an unknown outcome), and the `verify`
result. Expected: lost = 0 everywhere, duplicates <= explained, verify clean.
Uses the embedded servers (they are stopped and started by some scenarios); scenarios that stop a
server are skipped when MSGCORE_MONGO_URL / MSGCORE_PG_URL name external servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql
from pymongo import AsyncMongoClient

from core.domain.events import utcnow
from core.domain.routing import Route
from core.store.eventstore import EventStore
from ops.embedded import EmbeddedMongo, EmbeddedPostgres
from ops.faults.client import submit_batches
from ops.stack import Stack, seed

LEASE_S = 15
VALIDITY_S = 300


@dataclass
class Servers:
    mongo_url: str
    pg_url: str
    mongo: EmbeddedMongo | None = None
    pg: EmbeddedPostgres | None = None


@dataclass
class Run:
    stack: Stack
    servers: Servers
    client: AsyncMongoClient
    n: int


Inject = Callable[[Run], Awaitable[None]]


@dataclass
class Scenario:
    name: str
    inject: Inject
    extra: tuple[str, ...] = ()  # more component copies, e.g. a second connector
    needs_embedded: str = ""  # "mongo" / "pg" when the scenario stops that server


@dataclass
class Outcome:
    scenario: str
    accepted: int = 0
    delivered: int = 0
    expired: int = 0
    lost: int = 0
    smsc_duplicates: int = 0
    explained: int = 0
    verify: str = "-"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


async def _restart(run: Run, name: str, sig: int = signal.SIGKILL, down_s: float = 1.0) -> None:
    run.stack.kill(name, sig)
    await asyncio.sleep(down_s)
    component = name.split("#")[0]
    run.stack.start(component, name)


def kill9(name: str, down_s: float = 1.0) -> Inject:
    async def inject(run: Run) -> None:
        await _restart(run, name, signal.SIGKILL, down_s)
    return inject


async def restart_mongo(run: Run) -> None:
    assert run.servers.mongo is not None
    run.servers.mongo.stop()
    await asyncio.sleep(5)
    await asyncio.to_thread(run.servers.mongo.start)


async def pg_down_30s(run: Run) -> None:
    assert run.servers.pg is not None
    run.servers.pg.stop()
    await asyncio.sleep(30)
    await asyncio.to_thread(run.servers.pg.start)


async def smsc_away(run: Run) -> None:
    """The SMSC drops every connection and refuses binds for 10 s (its port is closed)."""
    run.stack.stop("smsc-sim")
    await asyncio.sleep(10)
    run.stack.start("smsc-sim")


async def pause_connector(run: Run) -> None:
    """SIGSTOP one connector past its lease; the other takes its messages; then it resumes."""
    proc = run.stack.procs["connector"]
    proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(LEASE_S + 10)
    proc.send_signal(signal.SIGCONT)


async def graceful_restarts(run: Run) -> None:
    """SIGTERM each component in turn and start it again: a graceful stop finishes or releases its
    in-flight work, so this must leave no possible duplicate at all."""
    for name in ("api", "router", "connector", "biller", "scheduler", "projector"):
        code = await asyncio.to_thread(run.stack.stop, name)
        if code not in (0, -signal.SIGTERM):
            raise RuntimeError(f"{name} exited with {code} on SIGTERM")
        run.stack.start(name)
        await asyncio.sleep(0.5)


async def nothing(run: Run) -> None:
    return None


SCENARIOS = [
    Scenario("baseline", nothing),
    Scenario("graceful restarts", graceful_restarts),
    Scenario("kill -9 api", kill9("api")),
    Scenario("kill -9 router", kill9("router")),
    Scenario("kill -9 connector", kill9("connector")),
    Scenario("kill -9 projector", kill9("projector")),
    Scenario("mongo restart", restart_mongo, needs_embedded="mongo"),
    Scenario("postgres down 30s", pg_down_30s, needs_embedded="pg"),
    Scenario("smsc away 10s", smsc_away),
    Scenario("two connectors race", nothing, extra=("connector",)),
    Scenario("connector paused past lease", pause_connector, extra=("connector",)),
]


async def _progress(stack: Stack) -> int:
    return len(stack.journal.read_text().splitlines()) if stack.journal.exists() else 0


async def run_scenario(sc: Scenario, servers: Servers, n: int, work: Path, deadline_s: float,
                       keep: bool = False) -> Outcome:
    out = Outcome(sc.name)
    tag = f"f{int(time.time() * 1000) % 10**9}"
    stack = Stack(servers.mongo_url, servers.pg_url, tag, tag, work / tag, receipt_delay_s=0.2,
                  extra_env={"MSGCORE_LEASE_S": str(LEASE_S)})
    client: AsyncMongoClient = AsyncMongoClient(servers.mongo_url, tz_aware=True)
    keys = await seed(servers.mongo_url, stack.mongo_db, [Route(id="sim", port=stack.sim_port, price_per_part=5,
                                                                window=50)], ["acme"])
    started = time.monotonic()
    try:
        stack.start_all()
        for i, extra in enumerate(sc.extra, start=2):
            stack.start(extra, f"{extra}#{i}")
        await asyncio.to_thread(stack.wait_http)
        numbers = [f"+4917{i:09d}" for i in range(n)]
        submit = asyncio.create_task(submit_batches(stack.api_url, keys["acme"], numbers, validity_s=VALIDITY_S))
        while await _progress(stack) < n * 0.3 and not submit.done():
            await asyncio.sleep(0.2)
        await sc.inject(Run(stack, servers, client, n))
        ids = await submit
        out.accepted = len(set(ids))
        await _settle(stack, client, deadline_s)
        await _count(out, stack, client, ids, numbers)
        out.verify = await _verify(stack, client)
    except Exception as e:  # a scenario that breaks is reported, and the next one still runs
        out.notes.append(f"{type(e).__name__}: {e}")
    finally:
        codes = stack.stop_all()
        out.notes += [f"{k} exited {v}" for k, v in codes.items() if v not in (0, -15, None)]
        if not keep:
            await client.drop_database(stack.mongo_db)
            with psycopg.connect(servers.pg_url, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(stack.schema)))
        await client.close()
    out.seconds = time.monotonic() - started
    return out


async def _settle(stack: Stack, client: AsyncMongoClient, deadline_s: float) -> None:
    """Wait (bounded) until no head has work left and the projector has every event."""
    db = client[stack.mongo_db]
    store = EventStore(db)
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and await store.any_unfinished():
        await asyncio.sleep(1)
    events = await db["events"].count_documents({})
    while time.monotonic() < end:
        with psycopg.connect(stack.pg_url) as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}.message_events").format(
                sql.Identifier(stack.schema))).fetchone()
        if row and row[0] >= events:
            return
        await asyncio.sleep(1)


async def _count(out: Outcome, stack: Stack, client: AsyncMongoClient, ids: list[str], numbers: list[str]) -> None:
    db = client[stack.mongo_db]
    final = {"delivered", "undelivered", "expired", "failed", "rejected", "canceled", "dead_lettered"}
    heads = {d["_id"]: d async for d in db["streams"].find({}, {"state": 1, "queue": 1})}
    done = {i for i in ids if i in heads and heads[i]["state"] in final and heads[i]["queue"] is None}
    out.lost = len(set(ids) - done)
    states = Counter(heads[i]["state"] for i in done)
    out.delivered, out.expired = states["delivered"], states["expired"]
    journal = [json.loads(line) for line in stack.journal.read_text().splitlines()] if stack.journal.exists() else []
    per_number = Counter("+" + j["destination"] for j in journal)
    out.smsc_duplicates = sum(c - 1 for c in per_number.values() if c > 1)
    explained = set()
    async for e in db["events"].find({"$or": [{"type": "sent", "data.possible_duplicate": True},
                                              {"type": "retry", "data.error_name": "OUTCOME_UNKNOWN"}]},
                                     {"message_id": 1}):
        explained.add(e["message_id"])
    out.explained = len(explained)


async def _verify(stack: Stack, client: AsyncMongoClient) -> str:
    try:
        from ops.verify import verify
    except ImportError:
        return "n/a"
    report = await verify(client[stack.mongo_db], stack.pg_url, stack.schema, utcnow())
    return "clean" if report.ok else f"{len(report.discrepancies)} discrepancies"


def print_table(outcomes: list[Outcome]) -> None:
    head = ["scenario", "accepted", "delivered", "expired", "lost", "dup@smsc", "explained", "verify", "s"]
    rows = [[o.scenario, o.accepted, o.delivered, o.expired, o.lost, o.smsc_duplicates, o.explained, o.verify,
             f"{o.seconds:.0f}"] for o in outcomes]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    for r in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)))
    for o in outcomes:
        for note in o.notes:
            print(f"  note [{o.scenario}]: {note}")


async def main_async(args: argparse.Namespace, work: Path) -> list[Outcome]:
    servers = Servers(os.environ.get("MSGCORE_MONGO_URL", ""), os.environ.get("MSGCORE_PG_URL", ""))
    if not servers.mongo_url:
        servers.mongo = EmbeddedMongo(work / "servers")
        servers.mongo.start()
        servers.mongo_url = servers.mongo.url
    if not servers.pg_url:
        servers.pg = EmbeddedPostgres(work / "servers")
        servers.pg.start()
        servers.pg_url = servers.pg.url
    outcomes = []
    try:
        for sc in SCENARIOS:
            if args.scenario and sc.name not in args.scenario:
                continue
            if sc.needs_embedded and getattr(servers, sc.needs_embedded) is None:
                outcomes.append(Outcome(sc.name, notes=["skipped: needs the embedded server"]))
                continue
            print(f"-- {sc.name}", flush=True)
            outcomes.append(await run_scenario(sc, servers, args.messages, work, args.deadline, args.keep))
    finally:
        for s in (servers.mongo, servers.pg):
            if s is not None:
                s.stop()
    return outcomes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--scenario", action="append", help="run only these (repeatable)")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds to wait for a scenario to settle")
    p.add_argument("--keep", action="store_true", help="keep each scenario's database and schema (debugging)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="msgcore-faults-") as tmp:
        outcomes = asyncio.run(main_async(args, Path(tmp)))
    print()
    print_table(outcomes)
    bad = [o for o in outcomes if o.lost or o.smsc_duplicates > o.explained or o.verify not in ("clean", "n/a", "-")]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
