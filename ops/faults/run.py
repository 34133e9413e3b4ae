"""Fault injection against real processes on loopback: each scenario posts a bounded number of
messages, breaks something mid-run, repairs it, waits for every message to finish, and counts.

    python -m ops.faults.run [--messages 2000] [--scenario NAME ...] [--deadline 900] [--validity 300]

Prints a table: scenario, accepted, delivered, expired, lost, duplicates at the SMSC, duplicates
explained by the log (a `sent` marked possible_duplicate, or a retry after an OUTCOME_UNKNOWN), and the
`msgcore verify` result. Expected: lost = 0 everywhere, duplicates <= explained, verify clean.

Scenarios: kill -9 of each component, MongoDB restarted, PostgreSQL down 30 s, the SMSC away 10 s, two
connectors racing for the route, a connector paused (SIGSTOP) longer than its lease and then resumed
(the standby must have taken the route over, and the stale one is fenced: `verify` proves it never
committed over the new owner), and graceful restarts of every component (no possible duplicate at
all). The injection happens once 30 % of the messages reached the SMSC (read from the `await` topic
counters, not from the events). Settling waits on the topics' backlogs and the timers first, then folds
only the messages not finished yet, so 20,000 messages per scenario settle in bounded time (at most
the receipt validity after the last send, for receipts an SMSC dropped). Uses the embedded servers
(some scenarios stop and start them); those scenarios are skipped when MSGCORE_MONGO_URL /
MSGCORE_PG_URL name external servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from core.domain.events import utcnow
from core.domain.routing import Route
from core.store.mongo import connect
from ops.embedded import EmbeddedMongo, EmbeddedPostgres
from ops.faults.client import SubmitProgress, submit_batches
from ops.faults.counting import explained_duplicates, finished, fold_all
from ops.progress import read_progress, spent_minor
from ops.stack import WORKERS, Stack, seed

LEASE_S = 15
# The server aborts a transaction left open this long (MongoDB's transactionLifetimeLimitSeconds default,
# and the embedded server's). A connector paused in the middle of a commit holds its transaction, and
# with it the owner document its commit fences on: no standby can take the key over before the server
# aborts that transaction, whatever the lease says. The pause outlasts both, so the takeover happens
# while the old owner sleeps and the fence is what stops it when it wakes.
TXN_LIFETIME_S = 60
PAUSE_S = max(LEASE_S, TXN_LIFETIME_S) + 10
DEFAULT_VALIDITY_S = 300
ROUTE = "sim"
OWNER_KEY = f"connector|send:{ROUTE}"
HOLDER_PID = re.compile(r":(\d+)(?:/|$)")  # holder ids are "connector@<host>:<pid>/<route>"
PRICE = 5  # per part; every fault scenario text is one GSM-7 part
QUIET_S = 5.0  # nothing moved for this long: look at the messages themselves
FOLD_EVERY_S = 15.0


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
    client: Any  # the driver's client (core.store.mongo.connect)
    n: int
    problems: list[str] = field(default_factory=list)  # what an injection found wrong (reported as notes)

    @property
    def db(self) -> Any:
        return self.client[self.stack.mongo_db]


Inject = Callable[[Run], Awaitable[None]]


@dataclass
class Scenario:
    name: str
    inject: Inject
    extra: tuple[str, ...] = ()  # more component copies, e.g. a second connector
    needs_embedded: str = ""  # "mongo" / "pg" when the scenario stops that server
    # When to strike: once this share of the messages reached the SMSC ("sent"), or was accepted by the
    # API ("accepted": a fault of the API itself must hit while batches are still being posted).
    at: str = "sent"


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


# ---- injections -----------------------------------------------------------------------------------


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


async def _owner(run: Run) -> dict[str, Any]:
    return await run.db["owners"].find_one({"_id": OWNER_KEY}) or {}


def _holder_process(run: Run, holder: str) -> str | None:
    """The stack's name of the connector process that holds the route (from the holder id's pid)."""
    m = HOLDER_PID.search(holder)
    if m is None:
        return None
    return next((name for name, p in run.stack.procs.items() if p.pid == int(m.group(1))), None)


async def pause_connector(run: Run) -> None:
    """SIGSTOP the connector that owns the route for longer than its lease (PAUSE_S); the standby must
    take the route over (a higher epoch, another holder) while it sleeps; then it resumes (SIGCONT)
    with a stale epoch: every commit it tries is fenced, and `verify` finds nothing committed twice."""
    before = await _owner(run)
    name = _holder_process(run, str(before.get("holder", ""))) or "connector"
    proc = run.stack.procs[name]
    proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(PAUSE_S)
        during = await _owner(run)
    finally:
        proc.send_signal(signal.SIGCONT)
    if int(during.get("epoch", 0)) <= int(before.get("epoch", 0)) or _holder_process(
            run, str(during.get("holder", ""))) == name:
        run.problems.append(f"no takeover while {name} was paused: owner {OWNER_KEY} epoch {before.get('epoch')} "
                            f"-> {during.get('epoch')}, holder {during.get('holder')}")


async def graceful_restarts(run: Run) -> None:
    """SIGTERM each component in turn and start it again: a graceful stop finishes or releases its
    in-flight work, so this must leave no possible duplicate at all."""
    for name in ("api", *WORKERS):
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
    Scenario("kill -9 api", kill9("api"), at="accepted"),
    Scenario("kill -9 router", kill9("router")),
    Scenario("kill -9 connector", kill9("connector")),
    Scenario("kill -9 scheduler", kill9("scheduler")),
    Scenario("kill -9 projector", kill9("projector")),
    Scenario("mongo restart", restart_mongo, needs_embedded="mongo"),
    Scenario("postgres down 30s", pg_down_30s, needs_embedded="pg"),
    Scenario("smsc away 10s", smsc_away),
    Scenario("two connectors race", nothing, extra=("connector",)),
    Scenario("connector paused past lease", pause_connector, extra=("connector",)),
]


# ---- a scenario -----------------------------------------------------------------------------------


async def _sent(run: Run) -> int:
    """Messages handed to the SMSC so far (the `await` topics' counters); 0 while the store is away."""
    try:
        return (await read_progress(run.db, with_timers=False)).sent
    except Exception:  # the store restarting: the driver's errors are core/store's business
        return 0


async def run_scenario(sc: Scenario, servers: Servers, n: int, work: Path, deadline_s: float,
                       keep: bool = False, validity_s: int = DEFAULT_VALIDITY_S) -> Outcome:
    out = Outcome(sc.name)
    tag = f"f{int(time.time() * 1000) % 10**9}"
    stack = Stack(servers.mongo_url, servers.pg_url, tag, tag, work / tag, receipt_delay_s=0.2,
                  extra_env={"MSGCORE_LEASE_S": str(LEASE_S)})
    client = connect(servers.mongo_url, "faults")
    keys = await seed(servers.mongo_url, stack.mongo_db, [Route(id=ROUTE, port=stack.sim_port, price_per_part=PRICE,
                                                                window=50)], ["acme"])
    run = Run(stack, servers, client, n)
    started = time.monotonic()
    try:
        stack.start_all()
        for i, extra in enumerate(sc.extra, start=2):
            stack.start(extra, f"{extra}#{i}")
        await asyncio.to_thread(stack.wait_http)
        numbers = [f"+4917{i:09d}" for i in range(n)]
        posted = SubmitProgress()
        submit = asyncio.create_task(submit_batches(stack.api_url, keys["acme"], numbers, validity_s=validity_s,
                                                    progress=posted))
        while not submit.done() and (posted.accepted if sc.at == "accepted" else await _sent(run)) < n * 0.3:
            await asyncio.sleep(0.05 if sc.at == "accepted" else 0.2)
        await sc.inject(run)
        ids = await submit
        out.accepted = len(set(ids))
        unfinished = await _settle(run, ids, deadline_s)
        await _count(out, run, ids, unfinished)
        out.verify = await _verify(run)
        out.notes += run.problems
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


async def _settle(run: Run, ids: list[str], deadline_s: float) -> list[str]:
    """Wait (bounded) until every message is finished and the projector has every event; return the
    messages still unfinished at the deadline.

    Polled without reading `events` while anything moves: the route and send backlogs, the timers and
    the tenant's spend (every message billed = done). Once all is quiet but some message is not billed
    (it failed, or waits for a receipt until its validity ends), the unfinished ones are folded, at most
    every FOLD_EVERY_S seconds (the first fold is one pass over the log, later ones read a few)."""
    end = time.monotonic() + deadline_s
    left = list(dict.fromkeys(ids))
    everything = PRICE * len(left)
    spent, quiet_since, folded_at = -1, time.monotonic(), float("-inf")
    while left and time.monotonic() < end:
        try:
            progress = await read_progress(run.db)
            now_spent = await spent_minor(run.db, "acme")
            if now_spent >= everything and progress.work_left == 0:
                left = []  # every message billed, nothing waits in a topic or on a timer
                break
            if now_spent != spent or progress.work_left:
                spent, quiet_since = now_spent, time.monotonic()
            elif time.monotonic() - quiet_since > QUIET_S and time.monotonic() - folded_at > FOLD_EVERY_S:
                states = await fold_all(run.db, left)
                left = [m for m in left if not finished(states.get(m))]
                folded_at = time.monotonic()
        except Exception as e:  # the store coming back (the driver's errors are core/store's business)
            print(f"   settle: store not answering ({type(e).__name__}); polling again", flush=True)
        if left:
            await asyncio.sleep(1)
    events = await run.db["events"].count_documents({})
    while time.monotonic() < end:
        with psycopg.connect(run.stack.pg_url) as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}.message_events").format(
                sql.Identifier(run.stack.schema))).fetchone()
        if row and row[0] >= events:
            break
        await asyncio.sleep(1)
    return left


async def _count(out: Outcome, run: Run, ids: list[str], unfinished: list[str]) -> None:
    out.lost = len(set(unfinished))
    states = Counter(s.state for s in (await fold_all(run.db, ids)).values() if s is not None)
    out.delivered, out.expired = states["delivered"], states["expired"]
    journal = run.stack.journal
    lines = journal.read_text().splitlines() if journal.exists() else []
    per_number = Counter("+" + json.loads(line)["destination"] for line in lines)
    out.smsc_duplicates = sum(c - 1 for c in per_number.values() if c > 1)
    by_message: dict[str, list[dict[str, Any]]] = {}
    async for e in run.db["events"].find({"$or": [{"type": "sent", "data.possible_duplicate": True},
                                                  {"type": "retry", "data.error_name": "OUTCOME_UNKNOWN"}]},
                                         {"message_id": 1, "seq": 1, "type": 1, "data": 1}):
        by_message.setdefault(e["message_id"], []).append(e)
    out.explained = sum(explained_duplicates(evs) for evs in by_message.values())


async def _verify(run: Run) -> str:
    from ops.verify import verify

    report = await verify(run.db, run.stack.pg_url, run.stack.schema, utcnow())
    if report.ok:
        return "clean"
    kinds = ",".join(f"{k}={n}" for k, n in sorted(report.discrepancy_counts.items()))
    return f"{sum(report.discrepancy_counts.values())} discrepancies ({kinds})"


def print_table(outcomes: list[Outcome]) -> None:
    head = ["scenario", "accepted", "delivered", "expired", "lost", "dup@smsc", "explained", "verify", "s"]
    rows: list[list[object]] = [[o.scenario, o.accepted, o.delivered, o.expired, o.lost, o.smsc_duplicates,
                                 o.explained, o.verify, f"{o.seconds:.0f}"] for o in outcomes]
    table: list[list[object]] = [list(head), *rows]
    widths = [max(len(str(x)) for x in col) for col in zip(*table, strict=True)]
    for r in table:
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
            outcome = await run_scenario(sc, servers, args.messages, work, args.deadline, args.keep, args.validity)
            print(f"   {outcome}", flush=True)
            outcomes.append(outcome)
    finally:
        for s in (servers.mongo, servers.pg):
            if s is not None:
                s.stop()
    return outcomes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--scenario", action="append", help="run only these (repeatable)")
    p.add_argument("--deadline", type=float, default=900.0, help="seconds to wait for a scenario to settle")
    p.add_argument("--validity", type=int, default=DEFAULT_VALIDITY_S,
                   help="each message's validity (s): how long a receipt an SMSC dropped is waited for")
    p.add_argument("--keep", action="store_true", help="keep each scenario's database and schema (debugging)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="msgcore-faults-") as tmp:
        outcomes = asyncio.run(main_async(args, Path(tmp)))
    print()
    print_table(outcomes)
    bad = [o for o in outcomes if o.lost or o.smsc_duplicates > o.explained or o.verify not in ("clean", "-")
           or (o.notes and not o.notes[0].startswith("skipped"))]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
