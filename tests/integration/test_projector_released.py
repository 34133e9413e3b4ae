"""`released` events and the log's `topic`/`pos` fields in the reporting tables (real servers).

A `released` event (a timer handed a waiting message back to a stage) is counted in
`message_events` and `daily_stats` like any event but moves neither `messages.state` nor a stage
timestamp nor a latest-wins column. Event documents that carry `topic`/`pos` project exactly as
those that do not.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql
from pymongo.asynchronous.database import AsyncDatabase

from projections.projector import apply_events
from projections.queries import daily_stats_rows, fetch_message_events_rows, fetch_messages_rows, recount_daily_stats
from projections.replay import replay_into
from projections.schema import migrate
from tests.integration.test_projector import (
    assert_same_tables,
    events_collection,
    insert,
    make_projector,
    running,
    wait_following,
    wait_projected,
)

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


@pytest.fixture
def replay_schema(pg_schema: str, pg_url: str) -> Iterator[str]:
    """A schema for the reference replay, dropped after the test."""
    name = f"{pg_schema}_ref"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def stream(kinds: list[tuple[str, str | None, dict[str, Any], str | None]]) -> list[dict[str, Any]]:
    """Event documents of one message: (type, route_id, data, topic) per event, 10 s apart."""
    mid = f"m-{uuid.uuid4().hex[:8]}"
    docs = []
    for seq, (kind, route, data, topic) in enumerate(kinds, start=1):
        d: dict[str, Any] = {"message_id": mid, "seq": seq, "type": kind, "at": T0 + timedelta(seconds=10 * seq),
                             "tenant_id": "t1", "route_id": route, "channel": "sms", "v": 1, "data": data}  # fmt: skip
        if topic is not None:
            d |= {"topic": topic, "pos": seq * 100}
        docs.append(d)
    return docs


ACCEPTED = {"to": "+4915100000001", "sender": "acme", "text": "hi", "encoding": "gsm7", "parts": 1, "priority": 10,
            "validity_s": 3600, "send_at": None, "campaign_id": None, "client_ref": None}  # fmt: skip
ROUTED = {"route_id": "r1", "price_per_part": 5, "currency": "EUR", "strategy": "failover"}
RETRY = {"route_id": "r1", "attempt": 1, "error_code": 88, "error_name": "ESME_RTHROTTLED",
         "next_at": T0 + timedelta(seconds=45), "exclude_route": True}  # fmt: skip


def retried_and_delivered() -> list[dict[str, Any]]:
    """accepted -> routed(r1) -> retry -> released (back to the router) -> routed(r2) -> sent ->
    delivered + billed; every hand-over carries a topic and a position, as the new log writes them."""
    routed_r2 = {**ROUTED, "route_id": "r2"}
    sent = {"route_id": "r2", "smsc_message_ids": ["s1"], "attempt": 2, "parts": 1}
    receipt = {"route_id": "r2", "smsc_message_id": "s1", "stat": "DELIVRD", "err": "000", "done_at": T0}
    bill = {"route_id": "r2", "parts": 1, "price_per_part": 5, "amount": 5, "currency": "EUR"}
    return stream([
        ("accepted", None, ACCEPTED, "route"),
        ("routed", "r1", ROUTED, "send:r1"),
        ("retry", "r1", RETRY, None),
        ("released", "r1", {"reason": "retry", "topic": "route"}, "route"),
        ("routed", "r2", routed_r2, "send:r2"),
        ("sent", "r2", sent, "await:r2"),
        ("delivered", "r2", receipt, None),
        ("billed", "r2", bill, None),
    ])  # fmt: skip


def waiting_then_released() -> list[dict[str, Any]]:
    """A scheduled message released by its timer: still `accepted`, nothing else moved."""
    return stream([
        ("accepted", None, {**ACCEPTED, "send_at": T0 + timedelta(minutes=5)}, None),
        ("released", "r9", {"reason": "send_at", "topic": "route"}, "route"),
    ])  # fmt: skip


async def test_released_counts_as_an_event_but_moves_no_message_column(pg_url: str, pg_schema: str) -> None:
    await migrate(pg_url, pg_schema)
    delivered, waiting = retried_and_delivered(), waiting_then_released()
    assert await apply_events(pg_url, pg_schema, delivered + waiting) == len(delivered) + len(waiting)

    rows = await fetch_messages_rows(pg_url, pg_schema)
    row = rows[delivered[0]["message_id"]]
    assert (row["state"], row["last_seq"], row["route_id"], row["billed"]) == ("delivered", 8, "r2", True)
    assert row["routed_at"] == delivered[1]["at"]  # the first routing, not the release
    row = rows[waiting[0]["message_id"]]
    assert (row["state"], row["last_seq"], row["route_id"]) == ("accepted", 2, None)
    assert row["accepted_at"] == waiting[0]["at"] and row["routed_at"] is None
    assert row["updated_at"] == waiting[1]["at"]

    audit = [r for r in (await fetch_message_events_rows(pg_url, pg_schema)).values() if r["type"] == "released"]
    assert sorted(r["data"]["reason"] for r in audit) == ["retry", "send_at"]
    assert all(set(r["data"]) == {"reason", "topic"} for r in audit)  # `topic`/`pos` of the log not copied
    daily = await daily_stats_rows(pg_url, pg_schema)
    assert sum(v[0] for k, v in daily.items() if k[-1] == "released") == 2
    assert daily == await recount_daily_stats(pg_url, pg_schema)


async def test_released_applied_first_does_not_hold_the_state_back(pg_url: str, pg_schema: str) -> None:
    """Out of order (as a catch-up scan may deliver): the release before the retry it ends."""
    await migrate(pg_url, pg_schema)
    docs = retried_and_delivered()[:4]
    assert await apply_events(pg_url, pg_schema, [docs[3]]) == 1
    assert await apply_events(pg_url, pg_schema, docs[:3]) == 3
    row = (await fetch_messages_rows(pg_url, pg_schema))[docs[0]["message_id"]]
    assert (row["state"], row["last_seq"], row["route_id"], row["error_code"]) == ("retry", 4, "r1", 88)


async def test_change_stream_and_replay_agree_on_released(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, replay_schema: str
) -> None:
    events = await events_collection(mongo_db)
    docs = retried_and_delivered() + waiting_then_released()
    projector = make_projector(events, pg_url, pg_schema)
    async with running(projector):
        await wait_following(projector)
        await insert(events, docs)
        await wait_projected(pg_url, pg_schema, len(docs))
    await replay_into(events, pg_url, replay_schema)
    await assert_same_tables(pg_url, pg_schema, replay_schema)
