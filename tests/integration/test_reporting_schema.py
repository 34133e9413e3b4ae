"""The reporting schema for BI users: billing_ledger, inbound, the views, and the read-only BI role.

Events go through the real projector (change stream + replay) into real PostgreSQL; expectations
are computed from the event documents in Python, independently of the SQL.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg import errors, sql
from pymongo.asynchronous.database import AsyncDatabase

from projections.bi_role import BiRoleError, drop_bi_role, ensure_bi_role
from projections.projector import UnprojectableEvent, apply_events
from projections.queries import (
    REPORTING_VIEWS,
    daily_stats_rows,
    fetch_billing_ledger_rows,
    fetch_inbound_rows,
    fetch_message_events_rows,
    fetch_messages_rows,
    fetch_view,
    recount_daily_stats,
)
from projections.replay import replay_into
from projections.schema import migrate
from tests.integration.test_projector import (
    count_events,
    events_collection,
    insert,
    make_projector,
    running,
    wait_following,
    wait_projected,
)

# Just before a UTC midnight, so the log straddles two days.
BASE = datetime(2026, 3, 1, 23, 57, tzinfo=UTC)
TABLES = ("messages", "message_events", "daily_stats", "billing_ledger", "inbound", "checkpoints", "migrations")

# --- building a log ---------------------------------------------------------------------------------

OUTCOMES = ("failed", "undelivered", "expired", "requeued", "requeued_delivered", "unknown", "accepted")


def message_docs(
    i: int,
    *,
    base: datetime,
    tenant: str,
    route: str,
    outcome: str = "delivered",
    campaign: str | None = None,
    parts: int = 1,
    latency_s: float = 60.0,
    price: int = 5,
    currency: str = "EUR",
) -> list[dict[str, Any]]:
    """Event documents (the shape of core/domain/events.py) of one outbound message."""
    mid = f"m{i:05d}-{uuid.uuid4().hex[:6]}"
    t0 = base + timedelta(seconds=i)
    kinds: list[tuple[str, dict[str, Any], float]] = [
        ("accepted", {"to": f"+49151{i:07d}", "sender": "acme", "text": "hello", "encoding": "gsm7", "parts": parts,
                      "priority": 0, "validity_s": 3600, "send_at": None, "campaign_id": campaign,
                      "client_ref": None}, 0),
    ]  # fmt: skip
    routed = {"route_id": route, "price_per_part": price, "currency": currency, "strategy": "failover"}
    smsc_ids = [f"s{i}-{p}" for p in range(parts)]
    if outcome != "accepted":
        kinds.append(("routed", routed, 0.5))
    if outcome in ("failed", "requeued", "requeued_delivered"):
        kinds.append(("failed", {"route_id": route, "attempt": 1, "error_code": 69, "error_name": "ESME_RSUBMITFAIL",
                                 "reason": "submit failed"}, 1))  # fmt: skip
        if outcome != "failed":
            kinds.append(("requeued", {"reason": "carrier fixed", "actor": "cli:alice", "previous_state": "failed"}, 2))
        if outcome == "requeued_delivered":
            kinds.append(("routed", routed, 3))
    if outcome == "unknown":
        kinds.append(("unknown", {"route_id": route, "attempt": 1, "reason": "bind lost", "smsc_message_ids": []}, 1))
    if outcome in ("delivered", "undelivered", "expired", "requeued_delivered"):
        kinds.append(("sent", {"route_id": route, "smsc_message_ids": smsc_ids, "attempt": 1, "parts": parts}, 4))
        if outcome == "expired":
            kinds.append(("expired", {"reason": "validity"}, latency_s))
        else:
            receipt = "undelivered" if outcome == "undelivered" else "delivered"
            kinds.append(
                (
                    receipt,
                    {
                        "route_id": route,
                        "smsc_message_id": smsc_ids[0],
                        "stat": "DELIVRD",
                        "err": "000",
                        "done_at": t0 + timedelta(seconds=latency_s - 1),
                    },
                    latency_s,
                )
            )
        kinds.append(("billed", {"route_id": route, "parts": parts, "price_per_part": price, "amount": price * parts,
                                 "currency": currency}, latency_s + 1))  # fmt: skip
    return [
        {"message_id": mid, "seq": seq, "type": kind, "at": t0 + timedelta(seconds=dt), "tenant_id": tenant,
         "route_id": None if kind == "accepted" else route, "channel": "sms", "v": 1, "data": data}
        for seq, (kind, data, dt) in enumerate(kinds, start=1)
    ]  # fmt: skip


def inbound_doc(i: int, *, base: datetime, tenant: str, route: str, reply_to: str | None) -> dict[str, Any]:
    data: dict[str, Any] = {"from": f"+4917{i:08d}", "to": "12345", "text": f"STOP {i}"}
    if reply_to is not None:  # the optional keys are present only sometimes
        data.update(reply_to=reply_to, smsc_message_id=f"mo-{i}")
    return {"message_id": f"in{i:05d}-{uuid.uuid4().hex[:6]}", "seq": 1, "type": "inbound",
            "at": base + timedelta(seconds=200 + i, milliseconds=250), "tenant_id": tenant, "route_id": route,
            "channel": "sms", "v": 1, "data": data}  # fmt: skip


def reporting_log(
    base: datetime,
    n: int = 40,
    tenants: tuple[str, str] = ("t0", "t1"),
    campaigns: tuple[str, str] = ("spring", "winter"),
) -> list[list[dict[str, Any]]]:
    """Streams of `n` outbound messages with every outcome, two campaigns (one billed in two
    currencies), two tenants, three routes, plus inbound messages (two of them replies)."""
    streams = []
    for i in range(n):
        outcome = OUTCOMES[i % 10] if i % 10 < len(OUTCOMES) else "delivered"
        route = ("r-a", "r-b", "r-c")[i % 3]
        campaign = {1: campaigns[0], 2: campaigns[1]}.get(i % 4)
        streams.append(message_docs(
            i, base=base, tenant=tenants[i % 2], route=route, outcome=outcome, campaign=campaign, parts=1 + i % 3,
            latency_s=20 + (i * 37) % 200 + 0.125, price=5 + i % 2, currency="USD" if i == n - 2 else "EUR",
        ))  # fmt: skip
    for j, replied in enumerate([streams[1], streams[7], None]):
        tenant = replied[0]["tenant_id"] if replied else tenants[0]
        streams.append([inbound_doc(n + j, base=base, tenant=tenant, route="r-a",
                                    reply_to=replied[0]["message_id"] if replied else None)])  # fmt: skip
    return streams


def flat(streams: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [ev for s in streams for ev in s]


def by_seq(streams: list[list[dict[str, Any]]], seqs: range) -> list[dict[str, Any]]:
    return [ev for seq in seqs for s in streams for ev in s if ev["seq"] == seq]


# --- expectations, in Python ------------------------------------------------------------------------------

STATE_OF = {"requeued": "retry"}  # the fold's name where it differs from the event type


def utc_day(t: datetime) -> date:
    return t.astimezone(UTC).date()


def expected_ledger(streams: list[list[dict[str, Any]]]) -> dict[tuple[str, int], dict[str, Any]]:
    out = {}
    for s in streams:
        campaign = s[0]["data"].get("campaign_id") if s[0]["type"] == "accepted" else None
        for ev in s:
            if ev["type"] == "billed":
                d = ev["data"]
                out[(ev["message_id"], ev["seq"])] = {
                    "message_id": ev["message_id"], "seq": ev["seq"], "tenant_id": ev["tenant_id"],
                    "route_id": ev["route_id"], "campaign_id": campaign, "billed_at": ev["at"], "parts": d["parts"],
                    "price_per_part_minor": d["price_per_part"], "amount_minor": d["amount"], "currency": d["currency"],
                }  # fmt: skip
    return out


def expected_inbound(streams: list[list[dict[str, Any]]]) -> dict[tuple[str, int], dict[str, Any]]:
    out = {}
    for ev in flat(streams):
        if ev["type"] == "inbound":
            d = ev["data"]
            out[(ev["message_id"], ev["seq"])] = {
                "message_id": ev["message_id"], "seq": ev["seq"], "tenant_id": ev["tenant_id"],
                "route_id": ev["route_id"], "channel": "sms", "from_number": d["from"], "to_number": d["to"],
                "text": d["text"], "received_at": ev["at"], "reply_to": d.get("reply_to"),
                "smsc_message_id": d.get("smsc_message_id"),
            }  # fmt: skip
    return out


def summary(stream: list[dict[str, Any]]) -> dict[str, Any]:
    """The few `messages` facts the views use, folded from one stream."""
    m: dict[str, Any] = {"billed": False, "amount": None, "currency": None, "route": None, "delivered_at": None}
    for ev in stream:
        if ev["type"] != "billed":
            m["state"] = STATE_OF.get(ev["type"], ev["type"])
        if ev["route_id"]:
            m["route"] = ev["route_id"]
        if ev["type"] in ("routed", "billed"):
            m["currency"] = ev["data"]["currency"]
        if ev["type"] == "billed":
            m["billed"], m["amount"] = True, ev["data"]["amount"]
        if ev["type"] in ("delivered", "undelivered", "expired") and m["delivered_at"] is None:
            m["delivered_at"] = ev["at"]
    first = stream[0]
    m.update(tenant=first["tenant_id"], accepted_at=first["at"] if first["type"] == "accepted" else None,
             parts=first["data"].get("parts"), campaign=first["data"].get("campaign_id"))  # fmt: skip
    return m


def rate_of(delivered: int, final: int) -> Decimal | None:
    """PostgreSQL's round(numeric, 4): half away from zero."""
    return (Decimal(delivered) / Decimal(final)).quantize(Decimal("0.0001"), ROUND_HALF_UP) if final else None


def percentile_cont(values: list[float], p: float) -> float:
    v = sorted(values)
    pos = p * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def expected_views(streams: list[list[dict[str, Any]]]) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    docs = flat(streams)
    rate: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    for ev in docs:
        if ev["type"] in ("sent", "delivered", "undelivered", "expired"):
            rate[(utc_day(ev["at"]), ev["route_id"] or "")][ev["type"]] += 1
    delivery = {}
    for key, c in rate.items():
        final = c["delivered"] + c["undelivered"] + c["expired"]
        delivery[key] = {"sent": c["sent"], "delivered": c["delivered"], "undelivered": c["undelivered"],
                         "expired": c["expired"],
                         "delivery_rate": rate_of(c["delivered"], final)}  # fmt: skip

    msgs = [summary(s) for s in streams]
    daily: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    monthly: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    for m in msgs:
        if m["accepted_at"] is None:
            continue
        day = utc_day(m["accepted_at"])
        for table, key in ((daily, (day, m["tenant"], m["currency"])),
                           (monthly, (day.replace(day=1), m["tenant"], m["currency"]))):  # fmt: skip
            table[key].update(accepted=1, parts=m["parts"], billed=int(m["billed"]), spend_minor=m["amount"] or 0)
    volume = {k: {c: v[c] for c in ("accepted", "parts", "billed", "spend_minor")} for k, v in daily.items()}
    volume_m = {k: {c: v[c] for c in ("accepted", "parts", "billed", "spend_minor")} for k, v in monthly.items()}

    camp: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for m in msgs:
        if m["campaign"] is not None:
            camp[(m["campaign"], m["tenant"])].append(m)
    progress = {}
    for key, ms in camp.items():
        states = Counter(m["state"] for m in ms)
        currencies = {m["currency"] for m in ms if m["billed"]}
        row: dict[str, Any] = {s: states[s] for s in ("accepted", "routed", "sent", "retry", "unknown", "delivered",
                                                       "undelivered", "expired", "failed")}  # fmt: skip
        row.update(total=len(ms), in_flight=sum(states[s] for s in ("accepted", "routed", "sent", "retry")),
                   billed=sum(m["billed"] for m in ms),
                   billed_amount_minor=sum(m["amount"] or 0 for m in ms) if len(currencies) <= 1 else None,
                   currency=next(iter(currencies)) if len(currencies) == 1 else None)  # fmt: skip
        progress[key] = row

    lat: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for m in msgs:
        if m["state"] == "delivered":
            ms_ = (m["delivered_at"] - m["accepted_at"]).total_seconds() * 1000
            lat[(m["route"], utc_day(m["delivered_at"]))].append(ms_)
    latency = {
        k: {"delivered": len(v), "p50_ms": percentile_cont(v, 0.5), "p95_ms": percentile_cont(v, 0.95),
            "p99_ms": percentile_cont(v, 0.99)}
        for k, v in lat.items()
    }  # fmt: skip
    return {"delivery_rate_daily": delivery, "tenant_volume_daily": volume, "tenant_volume_monthly": volume_m,
            "campaign_progress": progress, "route_latency": latency}  # fmt: skip


VIEW_KEYS = {
    "delivery_rate_daily": ("day", "route_id"),
    "tenant_volume_daily": ("day", "tenant_id", "currency"),
    "tenant_volume_monthly": ("month", "tenant_id", "currency"),
    "campaign_progress": ("campaign_id", "tenant_id"),
    "route_latency": ("route_id", "day"),
}


async def view_by_key(pg_url: str, schema: str, view: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows = await fetch_view(pg_url, schema, view)
    keys = VIEW_KEYS[view]
    out = {tuple(r[k] for k in keys): r for r in rows}
    assert len(out) == len(rows), f"{view}: key {keys} is not unique"
    return out


async def assert_views_match(pg_url: str, schema: str, streams: list[list[dict[str, Any]]]) -> None:
    want_all = expected_views(streams)
    for view, want in want_all.items():
        got = await view_by_key(pg_url, schema, view)
        assert set(got) == set(want), view
        for key, expected in want.items():
            row = got[key]
            for col, value in expected.items():
                if isinstance(value, float) and col.endswith("_ms"):
                    assert row[col] == pytest.approx(value, abs=1e-6), (view, key, col)
                else:
                    assert row[col] == value, (view, key, col, row[col], value)


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def ref_schema(pg_schema: str, pg_url: str) -> Iterator[str]:
    name = f"{pg_schema}_ref"
    yield name
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest_asyncio.fixture(loop_scope="session")
async def bi_role(pg_url: str) -> AsyncIterator[str]:
    """A unique role name (roles are cluster-wide), dropped with its privileges afterwards."""
    name = f"msgcore_bi_{uuid.uuid4().hex[:10]}"
    yield name
    await drop_bi_role(pg_url, name)


# --- projection of billing_ledger, inbound and the views -------------------------------------------------------


async def test_ledger_inbound_and_views_follow_the_log(
    mongo_db: AsyncDatabase, pg_url: str, pg_schema: str, ref_schema: str
) -> None:
    events = await events_collection(mongo_db)
    streams = reporting_log(BASE)
    docs = flat(streams)
    # Part of the log is replayed when the projector starts, the rest arrives on the change stream.
    await insert(events, by_seq(streams, range(1, 3)))
    projector = make_projector(events, pg_url, pg_schema, batch_size=37)
    async with running(projector):
        await wait_following(projector)
        await insert(events, by_seq(streams, range(3, 20)))
        await wait_projected(pg_url, pg_schema, len(docs))
        await asyncio.sleep(0.2)
    assert projector.applied == len(docs)

    ledger = await fetch_billing_ledger_rows(pg_url, pg_schema)
    assert ledger == expected_ledger(streams)
    assert len(ledger) == sum(ev["type"] == "billed" for ev in docs) > 0
    assert {r["campaign_id"] for r in ledger.values()} == {"spring", "winter", None}
    assert await fetch_inbound_rows(pg_url, pg_schema) == expected_inbound(streams)

    # Every event type reaches the audit copy; messages.state uses the fold's names.
    audit = await fetch_message_events_rows(pg_url, pg_schema)
    assert {r["type"] for r in audit.values()} >= {"requeued", "unknown", "inbound", "expired", "billed"}
    messages = await fetch_messages_rows(pg_url, pg_schema)
    for s in streams:
        assert messages[s[0]["message_id"]]["state"] == summary(s)["state"], s[0]["message_id"]
    states = Counter(m["state"] for m in messages.values())
    assert states["retry"] == 4 and states["unknown"] == 4 and states["inbound"] == 3
    assert "requeued" not in states
    assert await daily_stats_rows(pg_url, pg_schema) == await recount_daily_stats(pg_url, pg_schema)

    await assert_views_match(pg_url, pg_schema, streams)
    rates = await view_by_key(pg_url, pg_schema, "delivery_rate_daily")
    assert len({k[0] for k in rates}) == 2  # straddles a UTC midnight
    progress = await view_by_key(pg_url, pg_schema, "campaign_progress")
    assert progress[("winter", "t0")]["billed_amount_minor"] is None  # billed in EUR and USD
    assert progress[("spring", "t1")]["currency"] == "EUR"

    # A fresh replay of the same log gives the same rows.
    await replay_into(events, pg_url, ref_schema)
    assert await fetch_billing_ledger_rows(pg_url, ref_schema) == ledger
    assert await fetch_inbound_rows(pg_url, ref_schema) == await fetch_inbound_rows(pg_url, pg_schema)
    assert await fetch_messages_rows(pg_url, ref_schema) == messages
    for view in REPORTING_VIEWS:
        assert await view_by_key(pg_url, ref_schema, view) == await view_by_key(pg_url, pg_schema, view), view


async def test_duplicates_and_out_of_order_bills_count_once(pg_url: str, pg_schema: str) -> None:
    await migrate(pg_url, pg_schema)
    streams = reporting_log(BASE, n=12)
    docs = flat(streams)
    delivered = next(s for s in streams if s[-1]["type"] == "billed" and s[0]["data"]["campaign_id"])
    bill = delivered[-1]
    # The bill arrives first (twice), then everything, then everything again.
    assert await apply_events(pg_url, pg_schema, [bill, bill]) == 1
    early = (await fetch_billing_ledger_rows(pg_url, pg_schema))[(bill["message_id"], bill["seq"])]
    assert early["campaign_id"] is None  # its `accepted` event is not there yet
    assert await apply_events(pg_url, pg_schema, docs) == len(docs) - 1
    assert await apply_events(pg_url, pg_schema, docs + docs) == 0
    ledger = await fetch_billing_ledger_rows(pg_url, pg_schema)
    assert ledger == expected_ledger(streams)
    assert ledger[(bill["message_id"], bill["seq"])]["campaign_id"] == delivered[0]["data"]["campaign_id"]
    assert await fetch_inbound_rows(pg_url, pg_schema) == expected_inbound(streams)
    # The ledger, messages and daily_stats agree on the money.
    daily = await daily_stats_rows(pg_url, pg_schema)
    messages = await fetch_messages_rows(pg_url, pg_schema)
    total = sum(r["amount_minor"] for r in ledger.values())
    assert total == sum(v[2] for v in daily.values()) == sum(m["amount_minor"] or 0 for m in messages.values())


async def test_state_after_a_bill_projected_before_its_receipt(pg_url: str, pg_schema: str) -> None:
    await migrate(pg_url, pg_schema)
    stream = message_docs(1, base=BASE, tenant="t1", route="r-a")
    await apply_events(pg_url, pg_schema, [stream[-1]])
    await apply_events(pg_url, pg_schema, stream[:-1])
    assert (await fetch_messages_rows(pg_url, pg_schema))[stream[0]["message_id"]]["state"] == "delivered"


async def test_a_bill_without_amount_stops_the_projection(pg_url: str, pg_schema: str) -> None:
    await migrate(pg_url, pg_schema)
    stream = message_docs(1, base=BASE, tenant="t1", route="r-a")
    bill = stream[-1]
    broken = {**bill, "data": {k: v for k, v in bill["data"].items() if k != "amount"}}
    with pytest.raises(UnprojectableEvent, match="amount"):
        await apply_events(pg_url, pg_schema, [*stream[:-1], broken])
    assert await count_events(pg_url, pg_schema) == 0  # nothing of the batch was written


async def test_migration_backfills_a_schema_projected_before_it(pg_url: str, pg_schema: str) -> None:
    """A schema projected by an older version (no ledger/inbound rows, `requeued` as a state) is
    brought in line by migration 0003, which is safe to run again."""
    await migrate(pg_url, pg_schema)
    streams = reporting_log(BASE, n=20)
    await apply_events(pg_url, pg_schema, flat(streams))
    ledger, inbound = await fetch_billing_ledger_rows(pg_url, pg_schema), await fetch_inbound_rows(pg_url, pg_schema)
    messages = await fetch_messages_rows(pg_url, pg_schema)
    s = sql.Identifier(pg_schema)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DELETE FROM {}.billing_ledger").format(s))
        await conn.execute(sql.SQL("DELETE FROM {}.inbound").format(s))
        await conn.execute(sql.SQL("UPDATE {}.messages SET state = 'requeued' WHERE state = 'retry'").format(s))
        await conn.execute(sql.SQL("DELETE FROM {}.migrations WHERE version LIKE '0003%%'").format(s))
    assert await migrate(pg_url, pg_schema) == ["0003_billing_inbound_views"]
    assert await fetch_billing_ledger_rows(pg_url, pg_schema) == ledger == expected_ledger(streams)
    assert await fetch_inbound_rows(pg_url, pg_schema) == inbound == expected_inbound(streams)
    assert await fetch_messages_rows(pg_url, pg_schema) == messages
    await assert_views_match(pg_url, pg_schema, streams)


# --- the read-only BI role ----------------------------------------------------------------------------------


async def _as_role(conn: psycopg.AsyncConnection, role: str) -> None:
    await conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))


async def test_bi_role_reads_reporting_and_nothing_else(pg_url: str, pg_schema: str, bi_role: str) -> None:
    await migrate(pg_url, pg_schema)
    await apply_events(pg_url, pg_schema, flat(reporting_log(BASE, n=12)))
    other = f"{pg_schema}_other"
    s, o = sql.Identifier(pg_schema), sql.Identifier(other)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(o))
        try:
            await admin.execute(sql.SQL("CREATE TABLE {}.secrets (x int)").format(o))
            await admin.execute(sql.SQL("INSERT INTO {}.secrets VALUES (1)").format(o))
            await admin.execute(sql.SQL("CREATE TABLE public.{} (x int)").format(sql.Identifier(f"{other}_pub")))
            await ensure_bi_role(pg_url, pg_schema, bi_role)
            await ensure_bi_role(pg_url, pg_schema, bi_role)  # idempotent
            cur = await admin.execute("SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = %s", (bi_role,))
            assert await cur.fetchone() == (False, False)  # NOLOGIN without a password

            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
                await _as_role(conn, bi_role)
                for name in (*TABLES, *REPORTING_VIEWS):
                    cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(s, sql.Identifier(name)))
                    row = await cur.fetchone()
                    assert row is not None and (row[0] > 0 or name in ("checkpoints",)), name
                denied = [
                    sql.SQL("INSERT INTO {}.messages (message_id, tenant_id) VALUES ('x', 't')").format(s),
                    sql.SQL("UPDATE {}.billing_ledger SET amount_minor = 0").format(s),
                    sql.SQL("DELETE FROM {}.message_events").format(s),
                    sql.SQL("TRUNCATE {}.daily_stats").format(s),
                    sql.SQL("CREATE TABLE {}.mine (x int)").format(s),
                    sql.SQL("CREATE VIEW {}.mine AS SELECT 1").format(s),
                    sql.SQL("DROP VIEW {}.route_latency").format(s),
                    sql.SQL("ALTER TABLE {}.inbound ADD COLUMN y int").format(s),
                    sql.SQL("CREATE TABLE public.bi_mine (x int)"),
                    sql.SQL("CREATE SCHEMA bi_mine"),
                    sql.SQL("SELECT * FROM {}.secrets").format(o),
                    sql.SQL("SELECT * FROM public.{}").format(sql.Identifier(f"{other}_pub")),
                ]
                for statement in denied:
                    with pytest.raises(errors.InsufficientPrivilege):
                        await conn.execute(statement)
                cur = await conn.execute(
                    "SELECT n.nspname FROM pg_namespace n WHERE has_schema_privilege(n.oid, 'USAGE')"
                    " AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'public')"
                    " AND n.nspname NOT LIKE 'pg_%%'"
                )
                assert [r[0] for r in await cur.fetchall()] == [pg_schema]
        finally:
            await admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(o))
            await admin.execute(sql.SQL("DROP TABLE IF EXISTS public.{}").format(sql.Identifier(f"{other}_pub")))


async def test_bi_role_reads_tables_added_later_and_loses_stray_grants(
    pg_url: str, pg_schema: str, bi_role: str
) -> None:
    other = f"{pg_schema}_other"
    s, o, r = sql.Identifier(pg_schema), sql.Identifier(other), sql.Identifier(bi_role)
    await ensure_bi_role(pg_url, pg_schema, bi_role, password="s3cret'\"pw")
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        cur = await admin.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (bi_role,))
        assert await cur.fetchone() == (True,)
        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(o))
        try:
            # Someone granted the role more than it should have: write access and another schema.
            await admin.execute(sql.SQL("CREATE TABLE {}.t (x int)").format(o))
            await admin.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(o, r))
            await admin.execute(sql.SQL("GRANT SELECT ON {}.t TO {}").format(o, r))
            await admin.execute(sql.SQL("GRANT INSERT ON {}.messages TO {}").format(s, r))
            await admin.execute(sql.SQL("GRANT CREATE ON SCHEMA {} TO {}").format(s, r))
            await ensure_bi_role(pg_url, pg_schema, bi_role)
            # A later migration (run by the migrator, i.e. the schema owner) adds a table and a view.
            await admin.execute(sql.SQL("CREATE TABLE {}.future (x int)").format(s))
            await admin.execute(sql.SQL("CREATE VIEW {}.future_v AS SELECT 1 AS one").format(s))

            async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
                await _as_role(conn, bi_role)
                await conn.execute(sql.SQL("SELECT * FROM {}.future").format(s))
                await conn.execute(sql.SQL("SELECT * FROM {}.future_v").format(s))
                for statement in (
                    sql.SQL("SELECT * FROM {}.t").format(o),
                    sql.SQL("INSERT INTO {}.messages (message_id, tenant_id) VALUES ('x', 't')").format(s),
                    sql.SQL("CREATE TABLE {}.mine (x int)").format(s),
                    sql.SQL("INSERT INTO {}.future VALUES (1)").format(s),
                ):
                    with pytest.raises(errors.InsufficientPrivilege):
                        await conn.execute(statement)
        finally:
            await admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(o))


async def test_a_privileged_role_is_not_turned_into_the_bi_role(pg_url: str, pg_schema: str, bi_role: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE ROLE {} CREATEDB NOLOGIN").format(sql.Identifier(bi_role)))
    with pytest.raises(BiRoleError, match="createdb"):
        await ensure_bi_role(pg_url, pg_schema, bi_role)
