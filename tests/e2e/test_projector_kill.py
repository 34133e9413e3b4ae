"""The projector as a real process, killed with SIGKILL again and again while events stream in (at
random moments: between batches and inside them), restarted each time: afterwards `reporting` equals
a fresh replay of the log, row for row."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import psycopg
from psycopg import sql

from ops.stack import Stack
from projections.queries import fetch_billing_ledger_rows
from projections.replay import replay_into
from tests.conftest import unique_name
from tests.integration.test_projector import assert_same_tables, by_seq, insert, lifecycle
from tests.support.waiting import wait_for

MESSAGES = 600
KILLS = 8


async def test_projector_killed_repeatedly_ends_equal_to_a_fresh_replay(server_urls, mongo_client, tmp_path: Path):
    db_name, schema, reference = unique_name("pk"), unique_name("rep"), unique_name("ref")
    stack = Stack(server_urls["mongo"], server_urls["pg"], db_name, schema, tmp_path / "stack")
    events = mongo_client[db_name]["events"]
    await events.create_index([("message_id", 1), ("seq", 1)], unique=True)
    streams = [lifecycle(i, tenant=f"t{i % 3}") for i in range(MESSAGES)]
    docs = by_seq(streams, range(1, 6))
    rng = random.Random(20261123)
    try:
        stack.start("projector")
        await wait_for(lambda: asyncio.sleep(0, stack.log_tail("projector", 10**7).count("following events") > 0),
                       timeout_s=30)

        async def write() -> None:
            for start in range(0, len(docs), 40):
                await insert(events, docs[start:start + 40])
                await asyncio.sleep(0.1)

        def following() -> int:
            return stack.log_tail("projector", 10**7).count("following events")

        writer = asyncio.create_task(write())
        kills = 0
        while kills < KILLS and not writer.done():
            seen = following()

            async def restarted(seen: int = seen) -> bool:
                return following() > seen or writer.done()

            if kills:
                await wait_for(restarted, timeout_s=30)
            # Mid-stream, at a random moment: between batches or inside one.
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            stack.kill("projector")  # SIGKILL: no chance to finish a batch or save anything
            stack.start("projector")
            kills += 1
        await writer
        assert kills >= 4, f"only {kills} kills landed while events were being written"
        total = await events.count_documents({})

        async def projected() -> bool:
            with psycopg.connect(stack.pg_url) as conn:
                row = conn.execute(sql.SQL("SELECT count(*) FROM {}.message_events")
                                   .format(sql.Identifier(schema))).fetchone()
            return row is not None and row[0] == total

        await wait_for(projected, timeout_s=180, interval_s=0.5)
        await replay_into(events, stack.pg_url, reference)
        await assert_same_tables(stack.pg_url, schema, reference)
        assert await fetch_billing_ledger_rows(stack.pg_url, schema) == await fetch_billing_ledger_rows(
            stack.pg_url, reference)
    finally:
        stack.stop_all()
        await mongo_client.drop_database(db_name)
        with psycopg.connect(stack.pg_url, autocommit=True) as conn:
            for s in (schema, reference):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))
