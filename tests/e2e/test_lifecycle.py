"""The whole product as processes: 1,000 messages posted over HTTP reach the simulator over SMPP,
come back with receipts, are billed, and the reporting tables in PostgreSQL agree with the log.

Progress is watched the way an operator would, without reading `events`: the tenant's spend (written
in the same commit as every `billed`) and the topics' counters and checkpoints."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import psycopg
from psycopg import sql

from core.domain.events import utcnow
from ops.progress import read_progress, spent_minor
from ops.stack import Stack
from ops.verify import verify

LIFECYCLE = ["accepted", "routed", "sent", "delivered", "billed"]
N = 1000
BATCH = 100
PRICE = 5


async def eventually(check, timeout_s: float, what: str, stack: Stack) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            tails = "\n".join(f"--- {n}\n{stack.log_tail(n, 1500)}" for n in stack.procs)
            raise AssertionError(f"{what} not reached within {timeout_s}s\n{tails}")
        await asyncio.sleep(0.5)


async def test_thousand_messages_end_to_end(stack: Stack, mongo_client) -> None:
    stack.start_all()
    await asyncio.to_thread(stack.wait_http)
    key = stack.keys["acme"]  # type: ignore[attr-defined]
    numbers = [f"+4917{i:09d}" for i in range(N)]
    ids: list[str] = []
    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=30) as http:
        for start in range(0, N, BATCH):
            body = {"messages": [{"to": n, "from": "msgcore", "text": f"code {n[-6:]}"}
                                 for n in numbers[start:start + BATCH]]}
            r = await http.post("/v1/messages", json=body)
            assert r.status_code == 202, r.text
            ids += [m["id"] for m in r.json()["messages"]]
    assert len(set(ids)) == N

    db = mongo_client[stack.mongo_db]

    async def all_billed() -> bool:
        return await spent_minor(db, "acme") >= N * PRICE
    await eventually(all_billed, 240, "all messages billed", stack)
    assert await spent_minor(db, "acme") == N * PRICE
    # Every stage has passed everything it was given: nothing waits in a topic or on a timer.
    progress = await read_progress(db)
    assert (progress.backlog("route"), progress.backlog("send"), progress.timers, progress.sent) == (0, 0, 0, N)
    # One-time passwords whose route was UP were routed in the acceptance (no position in `route`).
    routed_at_acceptance = await db["events"].count_documents({"type": "accepted", "topic": None})
    assert progress.written("route") + routed_at_acceptance == progress.written("send") == N

    # Each message's log is exactly the five lifecycle facts, in order.
    by_message: dict[str, list[tuple[int, str]]] = {}
    async for e in db["events"].find({}, {"message_id": 1, "seq": 1, "type": 1}):
        by_message.setdefault(e["message_id"], []).append((e["seq"], e["type"]))
    assert set(by_message) == set(ids)
    for mid, evs in by_message.items():
        assert [t for _, t in sorted(evs)] == LIFECYCLE, mid
        assert [s for s, _ in sorted(evs)] == [1, 2, 3, 4, 5], mid
    # Five documents per message, and no per-message document rewritten: events are only inserted.
    assert await db["events"].count_documents({}) == N * len(LIFECYCLE)

    # The simulator received each message exactly once.
    await eventually(lambda: _journal_complete(stack), 10, "journal flushed", stack)
    journal = [json.loads(line) for line in stack.journal.read_text().splitlines()]
    received = Counter("+" + j["destination"] for j in journal)
    assert received == Counter(numbers)

    # Reporting agrees with the log once the projector has caught up.
    async def projected() -> bool:
        return _pg_count(stack, "message_events") == N * len(LIFECYCLE)
    await eventually(projected, 120, "projector caught up", stack)
    with psycopg.connect(stack.pg_url) as conn:
        schema = sql.Identifier(stack.schema)
        rows = conn.execute(sql.SQL("SELECT state, billed, count(*), sum(amount_minor) FROM {}.messages "
                                    "GROUP BY 1, 2").format(schema)).fetchall()
        assert rows == [("delivered", True, N, N * PRICE)]
        stats = dict(conn.execute(sql.SQL("SELECT state, sum(events) FROM {}.daily_stats WHERE tenant_id = 'acme' "
                                          "GROUP BY 1").format(schema)).fetchall())
        assert stats == dict.fromkeys(LIFECYCLE, N)
        billed = conn.execute(sql.SQL("SELECT sum(amount_minor) FROM {}.daily_stats WHERE state = 'billed'")
                              .format(schema)).fetchone()
        assert billed == (N * PRICE,)

    # And `msgcore verify` finds both stores consistent: topics gapless, checkpoints with outcomes,
    # no open attempt, every message finished, spend = bills, daily_stats = its recount.
    report = await verify(db, stack.pg_url, stack.schema, utcnow())
    assert report.ok, report.discrepancies[:10]
    assert report.counts["terminal"] == N and report.counts["attempts_open"] == 0


async def _journal_complete(stack: Stack) -> bool:
    return stack.journal.exists() and len(stack.journal.read_text().splitlines()) >= N


def _pg_count(stack: Stack, table: str) -> int:
    with psycopg.connect(stack.pg_url) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(stack.schema),
                                                                      sql.Identifier(table))).fetchone()
    return int(row[0]) if row else 0
