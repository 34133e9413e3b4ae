"""`msgcore verify` against real MongoDB-wire and PostgreSQL servers (never mocked).

A small log is written the way the stages write it, through the real `EventLog.commit`: messages
accepted into the `route` topic, a router and a connector reading their topics by position and
moving their checkpoints, receipts with `billed` and the tenants' spend in one commit, an expirer, a
timer released by the real `Timers`. It is projected by the real replay (or the live Projector) and
verified clean; each other test plants one kind of discrepancy and checks that verify names it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import Event, EventType, utcnow
from core.domain.message import MessageState, await_topic, event_doc, evolve, routed_message, send_topic
from core.store.eventstore import EventStore
from core.store.owners import Owners, Ownership
from core.store.timers import Timers, timer_doc
from core.store.topics import EventLog, Write, checkpoint_id, spend_updates
from ops.verify import VerifyReport, verify
from projections.projector import Projector
from projections.replay import replay_into
from tests.support.factories import accepted

REPO = Path(__file__).resolve().parents[2]
ROUTE = "r1"
SEND, AWAIT = send_topic(ROUTE, ""), await_topic(ROUTE)
CONNECTOR = f"connector|{SEND}"
PRICE = 5
Step = tuple[EventType, dict[str, Any], str | None]  # event type, data, topic


@dataclass
class Log:
    """The messages written, by role; the time the log was written at (10 minutes ago)."""

    db: AsyncDatabase
    base: datetime
    ids: dict[str, str] = field(default_factory=dict)
    own: Ownership | None = None

    @property
    def store(self) -> EventStore:
        return EventStore(self.db)

    @property
    def log(self) -> EventLog:
        return EventLog(self.db)

    def role(self, mid: str) -> str:
        return next(r for r, m in self.ids.items() if m == mid)

    async def total_events(self) -> int:
        return await self.db["events"].count_documents({})


def chain(state: MessageState, at: datetime, steps: list[Step], timer: dict[str, Any] | None = None) -> Write:
    """One message's next events (consecutive seqs, each checked by the fold) as one write."""
    docs, topics = [], []
    for kind, data, topic in steps:
        doc = event_doc(state, kind, at, data, route_id=data.get("route_id"))
        state = evolve(state, Event.from_doc(doc))
        docs.append(doc)
        topics.append(topic)
    return Write(state.message_id, docs, topics, timer=timer)


def routed(state: MessageState) -> Step:
    return EventType.ROUTED, {"route_id": ROUTE, "price_per_part": PRICE, "currency": "EUR", "strategy": "smart",
                              "message": routed_message(state)}, SEND


def sent(state: MessageState, expires_at: datetime, **extra: Any) -> Step:
    return EventType.SENT, {"route_id": ROUTE, "smsc_message_ids": [f"smsc-{state.message_id}-{state.version}"],
                            "attempt": state.attempts + 1, "parts": 1, "price_per_part": PRICE, "currency": "EUR",
                            "expires_at": expires_at, **extra}, AWAIT


def outcome(kind: EventType, state: MessageState) -> list[Step]:
    """A receipt (or an expiry) and its bill, as one commit writes them."""
    data = {"reason": "no delivery receipt within validity"} if kind == EventType.EXPIRED else {
        "route_id": ROUTE, "smsc_message_id": state.smsc_message_ids[0], "stat": "DELIVRD", "err": "000",
        "done_at": None}
    return [(kind, data, None), (EventType.BILLED, {"route_id": ROUTE, "parts": 1, "price_per_part": PRICE,
                                                    "amount": PRICE, "currency": "EUR"}, None)]


def retry(state: MessageState, at: datetime, due_at: datetime, error_name: str) -> Write:
    w = chain(state, at, [(EventType.RETRY, {"route_id": ROUTE, "attempt": state.attempts + 1, "error_code": 8,
                                             "error_name": error_name, "next_at": due_at}, None)])
    w.timer = timer_doc(message_id=state.message_id, tenant_id=state.tenant_id, topic="route",
                        seq=state.version + 1, due_at=due_at, reason="retry")
    return w


def _spend(batch: Any) -> list[tuple[str, list[Any]]]:
    per: dict[str, int] = {}
    for w in batch:
        for d in w.events:
            if d["type"] == "billed":
                per[d["tenant_id"]] = per.get(d["tenant_id"], 0) + d["data"]["amount"]
    return [("tenants", spend_updates(per, utcnow()))]


Decide = Callable[[dict[str, Any], MessageState], Write | None]


async def consume(lg: Log, consumer: str, topic: str, decide: Decide, *, end: int | None = None,
                  fence: Ownership | None = None) -> int:
    """Read [checkpoint, end or counter) of `topic` and commit the decisions with the checkpoint move,
    as a stage does; an attempt document first when fenced (the connector). Returns the new checkpoint."""
    start = (await lg.log.load_checkpoints(consumer, [topic]))[topic]
    end = (await lg.log.counters([topic]))[topic] if end is None else end
    entries = await lg.log.read(topic, start, end)
    states = await lg.store.states(e["message_id"] for e in entries)
    writes = [w for e in entries if (w := decide(e, states[e["message_id"]])) is not None]
    if fence is not None:
        await Owners(lg.db).record_attempt(fence, {topic: (start, end)}, [e["message_id"] for e in entries],
                                           lg.base)
    await lg.log.commit(writes, moves={checkpoint_id(consumer, topic): (start, end)}, extra=_spend,
                        fence=fence.fence if fence else None)
    return end


async def receipts(lg: Log, decide: Callable[[str, MessageState], Write | None]) -> None:
    states = await lg.store.states(lg.ids.values())
    writes = [w for role, mid in lg.ids.items() if (w := decide(role, states[mid])) is not None]
    await lg.log.commit(writes, extra=_spend)


FIRST_ROUND = ["delivered0", "delivered1", "delivered2", "delivered3", "undelivered", "resent", "retried", "expired",
               "failed", "on_timer", "held", "in_receipt"]  # fmt: skip


class Stages:
    """What each stage decides for each role of `FIRST_ROUND` (and the retried message's second round)."""

    def __init__(self, lg: Log, at: datetime, later: datetime, past: datetime) -> None:
        self.lg, self.at, self.later, self.past = lg, at, later, past

    def route(self, entry: dict[str, Any], state: MessageState) -> Write | None:
        if self.lg.role(state.message_id) == "held":  # a suspended tenant: no event, a timer back into `route`
            return Write(state.message_id, [], timer=timer_doc(
                message_id=state.message_id, tenant_id=state.tenant_id, topic=entry["topic"], seq=state.version,
                due_at=self.later, reason="tenant_suspended"))
        return chain(state, self.at, [routed(state)])

    def send(self, entry: dict[str, Any], state: MessageState) -> Write | None:
        role = self.lg.role(state.message_id)
        if role == "failed":
            return chain(state, self.at, [(EventType.FAILED, {"route_id": ROUTE, "attempt": 1, "error_code": 69,
                                                              "error_name": "ESME_RSUBMITFAIL", "reason": "refused"},
                                           None)])
        if role == "on_timer":
            return retry(state, self.at, self.later, "ESME_RTHROTTLED")
        extra = {"possible_duplicate": True} if role == "resent" else {}
        expires = self.later if role in ("in_receipt", "retried2") else self.past
        return chain(state, self.at, [sent(state, expires, **extra)])

    def receipt(self, role: str, state: MessageState) -> Write | None:
        if role.startswith("delivered") or role in ("resent", "retried2"):
            return chain(state, self.at, outcome(EventType.DELIVERED, state))
        if role == "undelivered":
            return chain(state, self.at, outcome(EventType.UNDELIVERED, state))
        if role == "retried" and state.state == "sent":
            return retry(state, self.at, self.past, "OUTCOME_UNKNOWN")
        return None

    def expire(self, entry: dict[str, Any], state: MessageState) -> Write | None:
        if state.state != "sent" or state.version != entry["seq"]:
            return None
        return chain(state, self.at, outcome(EventType.EXPIRED, state))


async def build_log(db: AsyncDatabase) -> Log:
    """14 messages: 9 finished (4 delivered, undelivered, resent as a possible duplicate, retried and sent
    twice, expired, failed), 2 on timers (a retry back-off, a suspended tenant's hold), 1 awaiting its
    receipt, 1 in the connector's backlog, 1 in the router's."""
    store = EventStore(db)
    await store.ensure_indexes()
    now = utcnow()
    lg = Log(db, base=now - timedelta(minutes=10))
    stages = Stages(lg, lg.base, now + timedelta(hours=1), lg.base - timedelta(minutes=1))
    await db["tenants"].insert_many([{"_id": t, "status": "active", "spent_minor": 0} for t in ("t0", "t1")])
    lg.own = await Owners(db).acquire(CONNECTOR, "test-connector", now, 3600)

    async def accept(role: str, tenant: str = "t1") -> None:
        event, write = accepted(tenant, lg.base, to=f"+49151{len(lg.ids):07d}")
        await store.accept([write])
        lg.ids[role] = event.message_id

    for i, role in enumerate(FIRST_ROUND):
        await accept(role, f"t{i % 2}" if role.startswith("delivered") else "t1")
    await consume(lg, "router", "route", stages.route)
    await consume(lg, "connector", SEND, stages.send, fence=lg.own)
    await receipts(lg, stages.receipt)
    await_end = (await lg.log.counters([AWAIT]))[AWAIT]
    await consume(lg, "expirer", AWAIT, stages.expire, end=await_end - 1)  # stops at in_receipt: still waiting
    released = await Timers(db).release_due(now, 100, lambda tenant: False)
    assert released.released == [lg.ids["retried"]]
    await consume(lg, "router", "route", stages.route)
    lg.ids["retried2"] = lg.ids.pop("retried")  # its second round
    await consume(lg, "connector", SEND, stages.send, fence=lg.own)
    await receipts(lg, lambda role, state: stages.receipt(role, state) if role == "retried2" else None)
    lg.ids["retried"] = lg.ids.pop("retried2")
    await accept("in_send")
    await consume(lg, "router", "route", stages.route)
    await accept("in_route")
    return lg


@pytest.fixture
async def projected(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> Log:
    lg = await build_log(mongo_db)
    stats = await replay_into(mongo_db["events"], pg_url, pg_schema)
    assert stats.applied == await lg.total_events() == 57
    return lg


async def run_verify(db: AsyncDatabase, pg_url: str | None, schema: str, **kw: Any) -> VerifyReport:
    return await verify(db, pg_url, schema, utcnow(), **kw)


def kinds_for(report: VerifyReport, message_id: str | None) -> set[str]:
    return {d.kind for d in report.discrepancies if d.message_id == message_id}


def found(report: VerifyReport) -> list[tuple[str, str | None]]:
    return sorted(((d.kind, d.message_id) for d in report.discrepancies), key=str)


async def pg_exec(pg_url: str, statement: str, schema: str, *params: Any) -> int:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL(statement).format(s=sql.Identifier(schema)), params)
        return cur.rowcount


async def last_event(db: AsyncDatabase, mid: str) -> dict[str, Any]:
    doc = await db["events"].find_one({"message_id": mid}, sort=[("seq", -1)])
    assert doc is not None
    return doc


# --- clean -------------------------------------------------------------------------------------------


async def test_clean_log_verifies(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert report.ok, report.discrepancies
    assert report.reporting_checked
    c = report.counts
    assert c["messages"] == len(projected.ids) == 14
    assert c["events"] == c["projected"] == 57
    assert (c["terminal"], c["in_flight"], c["stuck"]) == (9, 5, 0)
    assert (c["on_timer"], c["awaiting_receipt"], c["in_backlog"]) == (2, 1, 2)
    assert c["topics"] == 3 and c["positions"] == await mongo_db["events"].count_documents({"topic": {"$exists": 1}})
    assert c["billed"] == 8 and c["attempts_open"] == 0
    assert c["possible_duplicates"] == 1 and c["multi_sent"] == 1 and c["not_yet_projected"] == 0
    assert [(n.kind, n.message_id) for n in report.notes] == [("possible_duplicate", projected.ids["resent"])]
    assert report.projector_position is not None

    mongo_only = await run_verify(mongo_db, None, pg_schema)
    assert mongo_only.ok and not mongo_only.reporting_checked and mongo_only.counts["projected"] == 0


async def test_live_projector_and_events_not_yet_projected(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str
) -> None:
    lg = await build_log(mongo_db)
    projector = Projector(mongo_db["events"], pg_url, pg_schema, batch_size=100, batch_wait_s=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while projector.applied < await lg.total_events():
            assert loop.time() < deadline, "projector did not catch up"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert (await run_verify(mongo_db, pg_url, pg_schema)).ok

    # With the projector stopped, a fresh message is not in the reporting tables yet: not a fault.
    _, write = accepted("t1", utcnow())
    await lg.store.accept([write])
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert report.ok, report.discrepancies
    assert report.counts["not_yet_projected"] == 1 and report.counts["in_backlog"] == 3


# --- the log: topics, checkpoints, attempts ------------------------------------------------------------


async def test_gap_in_a_topic(mongo_db: AsyncDatabase, projected: Log) -> None:
    await mongo_db["topics"].update_one({"_id": "route"}, {"$inc": {"pos": 2}})  # positions nobody wrote
    report = await run_verify(mongo_db, None, "-")
    [d] = report.discrepancies
    assert (d.kind, d.message_id) == ("topic_gap", None)
    assert "topic route: 2 of positions" in d.detail


async def test_position_beyond_its_counter(mongo_db: AsyncDatabase, projected: Log) -> None:
    await mongo_db["topics"].update_one({"_id": AWAIT}, {"$inc": {"pos": -1}})
    report = await run_verify(mongo_db, None, "-")
    assert [d.kind for d in report.discrepancies] == ["position_beyond_counter"]
    assert f"topic {AWAIT}" in report.discrepancies[0].detail


async def test_checkpoint_ahead_of_its_topic(mongo_db: AsyncDatabase, projected: Log) -> None:
    counter = (await projected.log.counters([AWAIT]))[AWAIT]
    await mongo_db["checkpoints"].update_one({"_id": checkpoint_id("expirer", AWAIT)}, {"$set": {"pos": counter + 3}})
    report = await run_verify(mongo_db, None, "-")
    # The receipt wait of in_receipt is now behind the checkpoint with no outcome, too.
    assert found(report) == sorted([("checkpoint_ahead", None), ("no_outcome", projected.ids["in_receipt"])], key=str)


async def test_position_below_a_checkpoint_without_outcome(mongo_db: AsyncDatabase, projected: Log) -> None:
    mid = projected.ids["in_send"]
    entry = await last_event(mongo_db, mid)
    await mongo_db["checkpoints"].update_one({"_id": checkpoint_id("connector", SEND)},
                                             {"$set": {"pos": entry["pos"] + 1}})
    report = await run_verify(mongo_db, None, "-")
    [d] = report.discrepancies
    assert (d.kind, d.message_id) == ("no_outcome", mid)
    assert f"{SEND}@{entry['pos']} (routed seq 2) is below the connector checkpoint" in d.detail
    assert report.counts["stuck"] == 1


async def test_held_message_needs_its_timer(mongo_db: AsyncDatabase, projected: Log) -> None:
    mid = projected.ids["held"]  # below the router's checkpoint: only its timer explains it
    await mongo_db["timers"].delete_one({"_id": mid})
    report = await run_verify(mongo_db, None, "-")
    assert found(report) == [("no_outcome", mid)]


async def test_attempt_past_the_checkpoint(mongo_db: AsyncDatabase, projected: Log) -> None:
    assert projected.own is not None
    entry = await last_event(mongo_db, projected.ids["in_send"])
    ranges = {SEND: (entry["pos"], entry["pos"] + 1)}
    owners = Owners(mongo_db)
    await owners.record_attempt(projected.own, ranges, [projected.ids["in_send"]], utcnow())
    report = await run_verify(mongo_db, None, "-")
    assert report.ok and report.counts["attempts_open"] == 1
    [note] = [n for n in report.notes if n.kind == "attempt_in_flight"]
    assert f"owner {CONNECTOR} epoch {projected.own.epoch} (current" in note.detail

    await mongo_db["attempts"].update_many({}, {"$set": {"at": utcnow() - timedelta(hours=2)}})
    report = await run_verify(mongo_db, None, "-")
    [d] = report.discrepancies
    assert d.kind == "attempt_unresolved" and f"{SEND}[{entry['pos']},{entry['pos'] + 1})" in d.detail


# --- messages ------------------------------------------------------------------------------------------


async def test_second_send_without_possible_duplicate(mongo_db: AsyncDatabase, projected: Log) -> None:
    mid = projected.ids["in_receipt"]
    last = await last_event(mongo_db, mid)
    again = {**last, "seq": last["seq"] + 1, "at": utcnow() - timedelta(minutes=5)}
    for k in ("_id", "topic", "pos"):
        again.pop(k)
    await mongo_db["events"].insert_one(again)  # a corrupt append, bypassing the stages
    report = await run_verify(mongo_db, None, "-")
    assert kinds_for(report, mid) == {"duplicate_sent", "fold_failed"}
    [d] = [d for d in report.discrepancies if d.kind == "duplicate_sent"]
    assert f"seq {again['seq']}" in d.detail
    assert report.counts["possible_duplicates"] == 1  # the explained one is still just a note


async def test_gap_in_seq(mongo_db: AsyncDatabase, projected: Log) -> None:
    mid = projected.ids["failed"]
    await mongo_db["events"].update_one({"message_id": mid, "seq": 3}, {"$set": {"seq": 4}})
    report = await run_verify(mongo_db, None, "-")
    [d] = report.discrepancies
    assert (d.kind, d.message_id) == ("fold_failed", mid) and "expected 3, found 4" in d.detail


async def test_billed_twice(mongo_db: AsyncDatabase, projected: Log) -> None:
    mid = projected.ids["delivered0"]
    bill = await last_event(mongo_db, mid)
    await mongo_db["events"].insert_one({**{k: v for k, v in bill.items() if k != "_id"}, "seq": bill["seq"] + 1})
    report = await run_verify(mongo_db, None, "-")
    assert kinds_for(report, mid) == {"billed_twice", "fold_failed"}
    [d] = [d for d in report.discrepancies if d.kind == "spend_mismatch"]
    assert "tenant t0: spent_minor 10, billed events sum to 15" in d.detail


async def test_unbilled_outcome(mongo_db: AsyncDatabase, projected: Log) -> None:
    mid = projected.ids["delivered1"]
    await mongo_db["events"].delete_one({"message_id": mid, "type": "billed"})
    report = await run_verify(mongo_db, None, "-")
    assert found(report) == sorted([("spend_mismatch", None), ("unbilled", mid)], key=str)


async def test_spend_differs_from_bills(mongo_db: AsyncDatabase, projected: Log) -> None:
    await mongo_db["tenants"].update_one({"_id": "t1"}, {"$inc": {"spent_minor": 1}})
    report = await run_verify(mongo_db, None, "-")
    [d] = report.discrepancies
    assert d.kind == "spend_mismatch" and d.detail == "tenant t1: spent_minor 31, billed events sum to 30"


async def test_stuck_messages(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    old = utcnow() - timedelta(hours=2)
    _, write = accepted("t1", old)  # waits in `route` for two hours: no router is running
    await projected.store.accept([write])
    stale_timer = projected.ids["on_timer"]
    await mongo_db["timers"].update_one({"_id": stale_timer}, {"$set": {"due_at": old}})
    report = await run_verify(mongo_db, None, "-")
    assert [d.kind for d in report.discrepancies] == ["stuck", "stuck"]
    details = {d.message_id: d.detail for d in report.discrepancies}
    assert "waits in route@" in details[write.message_id] and "is a consumer of that topic running?" in \
        details[write.message_id]
    assert "retry timer due" in details[stale_timer] and "scheduler" in details[stale_timer]
    assert report.counts["stuck"] == 2
    # A longer tolerance accepts both as in flight.
    assert (await run_verify(mongo_db, None, "-", stale_after_s=3 * 3600)).ok


async def test_paused_lane_waits_without_limit(mongo_db: AsyncDatabase, projected: Log) -> None:
    old = utcnow() - timedelta(hours=2)
    _, write = accepted("t1", old, campaign_id="c42", priority=0)
    await projected.store.accept([write])
    await mongo_db["lanes"].insert_one({"_id": "c:c42", "tenant_id": "t1", "state": "paused"})
    report = await run_verify(mongo_db, None, "-")
    assert report.ok, report.discrepancies
    assert report.counts["paused"] == 1


# --- reporting -----------------------------------------------------------------------------------------


async def test_event_missing_from_message_events(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log
) -> None:
    mid = projected.ids["delivered0"]
    n = await pg_exec(pg_url, "DELETE FROM {s}.message_events WHERE message_id = %s AND seq = 3", pg_schema, mid)
    assert n == 1
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert "event_not_projected" in kinds_for(report, mid)
    [d] = [d for d in report.discrepancies if d.kind == "event_not_projected"]
    assert "seq 3 'sent'" in d.detail
    # The stored daily_stats still count the deleted row: the recount no longer does.
    assert report.discrepancy_counts["daily_stats_mismatch"] == 1
    assert report.counts["not_yet_projected"] == 0


async def test_extra_row_in_message_events(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log
) -> None:
    mid = projected.ids["in_receipt"]
    await pg_exec(pg_url, "INSERT INTO {s}.message_events (message_id, seq, type, at, tenant_id, route_id) "
                  "VALUES (%s, 9, 'delivered', now(), 't1', 'r1'), ('ZZZ-ghost', 1, 'accepted', now(), 't1', NULL)",
                  pg_schema, mid)  # fmt: skip
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert kinds_for(report, mid) == {"extra_projected_event"}
    assert kinds_for(report, "ZZZ-ghost") == {"extra_projected_event"}
    assert report.discrepancy_counts["daily_stats_mismatch"] >= 1


async def test_daily_stats_off_by_one(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    n = await pg_exec(pg_url, "UPDATE {s}.daily_stats SET events = events + 1 WHERE state = 'billed' AND tenant_id = "
                      "'t1'", pg_schema)  # fmt: skip
    assert n >= 1
    report = await run_verify(mongo_db, pg_url, pg_schema)
    assert set(report.discrepancy_counts) == {"daily_stats_mismatch"}
    assert all(d.message_id is None and "state=billed" in d.detail for d in report.discrepancies)


async def test_messages_row_disagrees(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, projected: Log) -> None:
    mid = projected.ids["undelivered"]
    await pg_exec(pg_url, "UPDATE {s}.messages SET state = 'delivered', amount_minor = 0 WHERE message_id = %s",
                  pg_schema, mid)
    report = await run_verify(mongo_db, pg_url, pg_schema)
    [d] = report.discrepancies
    assert (d.kind, d.message_id) == ("messages_row_mismatch", mid)
    assert "state: row='delivered' events='undelivered'" in d.detail and "amount_minor" in d.detail


async def test_missing_reporting_schema_is_a_config_error(mongo_db: AsyncDatabase, pg_url: str) -> None:
    from ops.verify import VerifyError

    with pytest.raises(VerifyError, match="no_such_schema"):
        await run_verify(mongo_db, pg_url, "no_such_schema")


# --- the command -------------------------------------------------------------------------------------


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", "verify", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


async def test_cli_exit_codes(
    mongo_db: AsyncDatabase, mongo_url: str, pg_url: str, pg_schema: str, projected: Log, tmp_path: Path
) -> None:
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": mongo_db.name, "MSGCORE_PG_URL": pg_url,
           "MSGCORE_REPORTING_SCHEMA": pg_schema, "MSGCORE_DATA_DIR": str(tmp_path)}  # fmt: skip
    clean = await asyncio.to_thread(run_cli, env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "OK: no discrepancies" in clean.stdout and "messages=14" in clean.stdout
    assert "topics=3" in clean.stdout and "checkpoints=3" in clean.stdout
    assert f"note:possible_duplicate\t{projected.ids['resent']}" in clean.stdout

    mid = projected.ids["in_send"]
    entry = await last_event(mongo_db, mid)
    await mongo_db["checkpoints"].update_one({"_id": checkpoint_id("connector", SEND)},
                                             {"$set": {"pos": entry["pos"] + 1}})
    broken = await asyncio.to_thread(run_cli, env, "--stale-after", "1800")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert f"no_outcome\t{mid}\t" in broken.stdout
    assert "FAILED: 1 discrepancies (no_outcome=1)" in broken.stdout

    wrong = await asyncio.to_thread(run_cli, {**env, "MSGCORE_REPORTING_SCHEMA": "no_such_schema"})
    assert wrong.returncode == 2 and "no_such_schema" in wrong.stderr
