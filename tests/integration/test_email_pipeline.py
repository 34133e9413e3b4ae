"""E-mail through the pipeline against real servers: the embedded MongoDB-wire server, the router, the
timer releaser, the mailer and real `mail-sim` SMTP servers (their `.eml` sinks are the proof)."""

from __future__ import annotations

import asyncio
import collections
import email
import email.policy
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest_asyncio
from psycopg import sql
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.circuit_breaker import BreakerSettings, BreakerState
from core.domain.email import EmailContent
from core.domain.events import utcnow
from core.domain.routing import Route, Strategy
from core.ids import new_message_id
from core.store.eventstore import EventStore
from core.store.lanes import Batch, LaneBook
from core.store.owners import Owners
from core.store.routes import RouteStore
from core.store.submission import Submission, accepted
from core.store.timers import Timers
from core.workers.loop import run_until_stopped
from core.workers.mailer import Mailer
from core.workers.mailer_batch import decide_batch
from core.workers.router import Router
from core.workers.timers import TimerReleaser
from ops.mail_sim.server import MailSim
from projections.replay import replay_into
from tests.support.waiting import wait_for


@pytest_asyncio.fixture
async def sims(tmp_path: Path) -> AsyncIterator[list[MailSim]]:
    started: list[MailSim] = []

    async def start(name: str, **faults: Any) -> MailSim:
        sim = MailSim(tmp_path / name, faults=faults)
        await sim.start()
        started.append(sim)
        return sim

    holder: list[Any] = [start]
    yield holder  # type: ignore[misc]
    for sim in started:
        await sim.stop()


def email_write(tenant: str, now: datetime, i: int, **fields: str) -> tuple[str, Any]:
    c = EmailContent(to=fields.get("to", f"user{i}@example.org"), sender="shop@acme.example",
                     subject=fields.get("subject", f"order {i}"), text=fields.get("text", f"text {i}"),
                     html=fields.get("html", ""), from_name=fields.get("from_name", ""))
    s = Submission(to=c.to, sender=c.sender, text=c.text, encoding="utf-8", parts=1, validity_s=3600,
                   channel="email", email=c.accepted_fields())
    mid = new_message_id()
    return mid, accepted(mid, tenant, s, now)


async def types_of(store: EventStore, mid: str) -> list[str]:
    return [e.type.value for e in await store.load_events(mid)]


async def run_pipeline(store: EventStore, routes: RouteStore, mailers: list[Mailer], ids: list[str]) -> None:
    """Router, timer releaser and mailers until every message is billed (or failed)."""
    stop = asyncio.Event()
    router = Router(store, routes, utcnow, batch_size=50)
    releaser = TimerReleaser(Timers(store.db), LaneBook(store.db), utcnow)
    tasks = [asyncio.create_task(run_until_stopped("router", router.step, stop, 0.02)),
             asyncio.create_task(run_until_stopped("timers", releaser.step, stop, 0.05)),
             *(asyncio.create_task(m.run(stop)) for m in mailers)]
    try:
        async def done() -> bool:
            last = [(await types_of(store, mid))[-1] for mid in ids]
            return all(t in ("billed", "failed", "unknown") for t in last)
        await wait_for(done, timeout_s=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def setup(mongo_db: AsyncDatabase, *routes_: Route) -> tuple[EventStore, RouteStore]:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    for r in routes_:
        await routes.upsert(r, actor="test", now=utcnow())
    await mongo_db["tenants"].insert_one({"_id": "acme", "name": "Acme", "spent_minor": 0})
    return store, routes


def parse(path: Path) -> email.message.EmailMessage:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)  # type: ignore[return-value]


async def test_an_email_is_accepted_sent_and_billed_through_smtp(mongo_db: AsyncDatabase, sims: Any, pg_url: str,
                                                                 pg_schema: str) -> None:
    sim = await sims[0]("sink")
    route = Route(id="mail", kind="smtp", port=sim.port, price_per_part=3, pool=2)
    store, routes = await setup(mongo_db, route)
    now = utcnow()
    items = [email_write("acme", now, i) for i in range(30)]
    items.append(email_write("acme", now, 99, subject="Grüße aus Köln", text="Hallo", html="<p>Hallo</p>",
                             from_name="Café Acme"))
    await store.accept([w for _, w in items])
    ids = [mid for mid, _ in items]
    mailer = Mailer(store, routes, route, utcnow, owner="test-mailer", batch_size=50)
    await run_pipeline(store, routes, [mailer], ids)

    for mid in ids:
        events = await store.load_events(mid)
        assert [e.type.value for e in events] == ["accepted", "routed", "sent", "billed"], mid
        sent, billed = events[2].data, events[3].data
        assert sent["provider_message_id"] and sent["message_id_header"] == f"<{mid}@acme.example>"
        assert sent["attempt"] == 1 and sent["breaker"] == "closed" and events[2].channel == "email"
        assert billed["amount"] == 3 and billed["parts"] == 1
    assert (await mongo_db["tenants"].find_one({"_id": "acme"}))["spent_minor"] == 3 * len(ids)
    files = sim.eml_files()
    assert len(files) == len(ids)
    assert sim.connections <= 2  # a pool of persistent connections, each carrying many e-mails
    by_id = {str(parse(f)["X-Msgcore-Id"]): f for f in files}
    assert set(by_id) == set(ids)
    special = parse(by_id[ids[-1]])
    raw_headers = by_id[ids[-1]].read_bytes().split(b"\r\n\r\n", 1)[0]
    assert b"=?utf-8?" in raw_headers and "Grüße".encode() not in raw_headers  # RFC 2047 on the wire
    assert special["Subject"] == "Grüße aus Köln" and special["From"].addresses[0].display_name == "Café Acme"
    assert special.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in special.iter_parts()] == ["text/plain", "text/html"]
    sent_provider_ids = {(await store.load_events(mid))[2].data["provider_message_id"] for mid in ids}
    assert sent_provider_ids == {f.stem.split("-", 1)[1] for f in files}
    attempts = [d async for d in mongo_db["attempts"].find({"owner": "connector|send:mail"})]
    assert sum(len(a["message_ids"]) for a in attempts) == len(ids)
    await projected_as_email(mongo_db, pg_url, pg_schema, ids)


async def projected_as_email(mongo_db: AsyncDatabase, pg_url: str, schema: str, ids: list[str]) -> None:
    """The projector takes e-mails as they are: daily_stats says channel email, messages has each row."""
    await replay_into(mongo_db["events"], pg_url, schema)
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        stats = await (await conn.execute(sql.SQL("SELECT channel, state, sum(events), sum(amount_minor) FROM {} "
                                                  "GROUP BY 1, 2").format(sql.Identifier(schema, "daily_stats")))
                       ).fetchall()
        rows = await (await conn.execute(sql.SQL("SELECT state, billed, amount_minor, to_number FROM {} "
                                                 "WHERE message_id = ANY(%s)").format(
            sql.Identifier(schema, "messages")), [ids])).fetchall()
    assert {(c, st): (int(n), int(a or 0)) for c, st, n, a in stats} == {
        ("email", "accepted"): (len(ids), 0), ("email", "routed"): (len(ids), 0), ("email", "sent"): (len(ids), 0),
        ("email", "billed"): (len(ids), 3 * len(ids))}
    assert len(rows) == len(ids) and {(r[0], r[1], r[2]) for r in rows} == {("sent", True, 3)}
    assert all("@" in r[3] for r in rows)


async def test_seed_003_two_providers_failing_every_second_call_deliver_each_email_once(
        mongo_db: AsyncDatabase, sims: Any) -> None:
    lamda = await sims[0]("lamda", every_nth=2)
    delta = await sims[0]("delta", every_nth=2)
    breaker = BreakerSettings(max_failures=1, cool_down_s=0.5)
    a = Route(id="lamda", kind="smtp", port=lamda.port, priority=1, pool=1, strategy=Strategy.FAILOVER,
              breaker=breaker, price_per_part=2)
    b = Route(id="delta", kind="smtp", port=delta.port, priority=2, pool=1, strategy=Strategy.FAILOVER,
              breaker=breaker, price_per_part=2)
    store, routes = await setup(mongo_db, a, b)
    now = utcnow()
    items = [email_write("acme", now, i, subject=f"seed 003 mail {i}") for i in range(4)]
    await store.accept([w for _, w in items])
    ids = [mid for mid, _ in items]
    mailers = [Mailer(store, routes, r, utcnow, owner=f"test-{r.id}", batch_size=10) for r in (a, b)]
    await run_pipeline(store, routes, mailers, ids)

    subjects = sorted(str(parse(f)["Subject"]) for sim in (lamda, delta) for f in sim.eml_files())
    assert subjects == sorted(f"seed 003 mail {i}" for i in range(4))  # every e-mail exactly once
    for mid in ids:
        types = await types_of(store, mid)
        assert types[-2:] == ["sent", "billed"] and types.count("sent") == 1 and types.count("billed") == 1
    assert lamda.plan.counts["temporary"] >= 1 and delta.plan.counts["temporary"] >= 1
    # The switching is visible: retries name the breaker's state; both breakers opened at least once.
    retries = [d async for d in mongo_db["events"].find({"type": "retry"})]
    assert retries and all(r["data"]["breaker"] in {"open", "closed", "half_open"} for r in retries)
    assert any(r["data"]["breaker"] == "open" for r in retries)
    opened = {t.route_id for m in mailers for t in m.transitions if t.after == BreakerState.OPEN}
    assert opened == {"lamda", "delta"}
    routes_used = {(await store.load_events(mid))[-2].route_id for mid in ids}
    assert routes_used == {"lamda", "delta"}


async def test_a_permanent_refusal_ends_failed_with_the_providers_code_and_text(mongo_db: AsyncDatabase,
                                                                                 sims: Any) -> None:
    sim = await sims[0]("sink", failure_ratio=1.0, permanent_share=1.0)
    route = Route(id="mail", kind="smtp", port=sim.port, price_per_part=3)
    store, routes = await setup(mongo_db, route)
    mid, write = email_write("acme", utcnow(), 1)
    await store.accept([write])
    mailer = Mailer(store, routes, route, utcnow, owner="test-mailer")
    await run_pipeline(store, routes, [mailer], [mid])
    events = await store.load_events(mid)
    assert [e.type.value for e in events] == ["accepted", "routed", "failed"]
    failed = events[-1].data
    assert failed["error_code"] == 550 and failed["error_name"] == "SMTP_550"
    assert "Mailbox unavailable" in failed["reason"]
    assert failed["breaker"] == "closed"  # the message's fault, not the route's
    assert sim.eml_files() == [] and (await mongo_db["tenants"].find_one({"_id": "acme"}))["spent_minor"] == 0


async def test_sendgrid_v3_over_http(mongo_db: AsyncDatabase, tmp_path: Path) -> None:
    sim = MailSim(tmp_path / "sg", http_port=0, api_key="sg-key")
    await sim.start()
    try:
        route = Route(id="sg", kind="http", provider="sendgrid", base_url=f"http://127.0.0.1:{sim.http_port}",
                      api_key="sg-key", price_per_part=4)
        store, routes = await setup(mongo_db, route)
        items = [email_write("acme", utcnow(), i, html=f"<p>{i}</p>") for i in range(5)]
        await store.accept([w for _, w in items])
        ids = [mid for mid, _ in items]
        await run_pipeline(store, routes, [Mailer(store, routes, route, utcnow, owner="test-sg")], ids)
    finally:
        await sim.stop()
    files = {f.stem.split("-", 1)[1]: parse(f) for f in sim.eml_files()}
    for mid in ids:
        events = await store.load_events(mid)
        assert [e.type.value for e in events] == ["accepted", "routed", "sent", "billed"]
        sent = events[2].data
        assert sent["provider"] == "sendgrid" and str(files[sent["provider_message_id"]]["X-Msgcore-Id"]) == mid
    assert len(files) == len(ids)


async def open_attempt_then_mailer(mongo_db: AsyncDatabase, sim: MailSim, policy: str) -> tuple[EventStore, list[str]]:
    """Three e-mails routed, an earlier owner's attempt for them left open (it died before its
    commit), then a new mailer takes the route over."""
    route = Route(id="mail", kind="smtp", port=sim.port, on_unknown_outcome=policy, price_per_part=1)
    store, routes = await setup(mongo_db, route)
    items = [email_write("acme", utcnow(), i) for i in range(3)]
    await store.accept([w for _, w in items])
    ids = [mid for mid, _ in items]
    await Router(store, routes, utcnow).step()
    owners = Owners(mongo_db)
    dead = await owners.acquire("connector|send:mail", "dead-mailer", utcnow(), lease_s=0.05)
    assert dead is not None
    await owners.record_attempt(dead, {"send:mail": (0, 3)}, ids, utcnow())
    await asyncio.sleep(0.1)
    await run_pipeline(store, routes, [Mailer(store, routes, route, utcnow, owner="new-mailer")], ids)
    return store, ids


async def test_a_new_owner_resends_an_open_attempt_as_possible_duplicates(mongo_db: AsyncDatabase, sims: Any) -> None:
    sim = await sims[0]("sink")
    store, ids = await open_attempt_then_mailer(mongo_db, sim, "resend")
    for mid in ids:
        sent = (await store.load_events(mid))[2]
        assert sent.type.value == "sent" and sent.data["possible_duplicate"] is True and sent.data["attempt"] == 2
    assert len(sim.eml_files()) == 3


async def test_a_new_owner_holds_an_open_attempt_under_policy_hold(mongo_db: AsyncDatabase, sims: Any) -> None:
    sim = await sims[0]("sink")
    store, ids = await open_attempt_then_mailer(mongo_db, sim, "hold")
    for mid in ids:
        assert await types_of(store, mid) == ["accepted", "routed", "unknown"]
    assert sim.eml_files() == []


async def test_a_connection_dropped_after_data_is_retried_as_a_possible_duplicate(mongo_db: AsyncDatabase,
                                                                                  sims: Any) -> None:
    sim = await sims[0]("sink", drop_ratio=1.0)
    route = Route(id="mail", kind="smtp", port=sim.port, pool=1, breaker=BreakerSettings(max_failures=100))
    store, routes = await setup(mongo_db, route)
    mid, write = email_write("acme", utcnow(), 1)
    await store.accept([write])
    mailer = Mailer(store, routes, route, utcnow, owner="test-mailer")
    stop = asyncio.Event()
    task = asyncio.create_task(mailer.run(stop))
    router = Router(store, routes, utcnow)
    try:
        await router.step()

        async def retried() -> bool:
            return (await types_of(store, mid))[-1] == "retry"
        await wait_for(retried, timeout_s=30)
    finally:
        stop.set()
        await task
    retry = (await store.load_events(mid))[-1].data
    assert retry["error_name"] == "OUTCOME_UNKNOWN" and retry["possible_duplicate"] is True
    assert sim.eml_files() == [] and sim.plan.counts["dropped"] == 1


async def test_a_message_of_a_batch_not_yet_committed_is_skipped_by_the_next_read(mongo_db: AsyncDatabase,
                                                                                   sims: Any) -> None:
    """The mailer reads batch N+1 while batch N is sent and committed: an entry of a message that N
    took (`busy`) is "moved on" for N+1, whatever its stored state still says."""
    sim = await sims[0]("sink")
    route = Route(id="mail", kind="smtp", port=sim.port)
    store, routes = await setup(mongo_db, route)
    items = [email_write("acme", utcnow(), i) for i in range(3)]
    await store.accept([w for _, w in items])
    ids = [mid for mid, _ in items]
    await Router(store, routes, utcnow).step()
    entries = await store.log.read("send:mail", 0, 3)
    docs = await store.log.load_many(ids)
    batch = Batch(entries, {}, {"send:mail": (0, 3)})
    stats: collections.Counter[str] = collections.Counter()
    kw: dict[str, Any] = {"route": route, "book": LaneBook(mongo_db), "unresolved": {}, "now": utcnow(),
                          "stats": stats}
    assert [i.state.message_id for i in decide_batch(batch, docs, busy=set(), **kw).items] == ids
    job = decide_batch(batch, docs, busy={ids[1]}, **kw)
    assert [i.state.message_id for i in job.items] == [ids[0], ids[2]] and job.ids == {ids[0], ids[2]}
    assert job.writes == []
