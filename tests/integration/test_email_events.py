"""The e-mail providers' event webhook against real servers (the embedded MongoDB-wire server,
PostgreSQL, a real `mail-sim` posting signed events over HTTP to the API served by uvicorn): signatures
refused with nothing written, each provider event applied once, bounces and complaints feeding the
suppression list, later submissions `rejected` (`suppressed`), and verify and the projector taking it all."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn
from fastapi import FastAPI
from psycopg import sql
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.email import EmailContent
from core.domain.email_events import SIGNATURE_HEADER, TIMESTAMP_HEADER
from core.domain.events import Event, EventType, utcnow
from core.domain.message import event_doc, evolve, state_of_accepted
from core.domain.outcomes import billed_data
from core.domain.routing import Route
from core.email_signatures import new_private_key, public_key_text, sign
from core.ids import new_message_id
from core.store.email_events import EVENT_IDS, ORPHANS, PROVIDER_IDS, provider_id_inserts
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.routes import RouteStore
from core.store.submission import Submission, accepted
from core.store.suppressions import SuppressionStore
from core.store.tenants import TenantStore
from core.store.timers import Timers
from core.store.topics import Write
from core.workers.loop import run_until_stopped
from core.workers.mailer import Mailer
from core.workers.router import Router
from core.workers.timers import TimerReleaser
from ops.embedded import free_port
from ops.mail_sim.events import EventingMailSim, EventPoster, EventSettings
from ops.verify import verify
from projections.replay import replay_into
from tests.support.api import app_client, assert_error
from tests.support.waiting import wait_for

KEY = new_private_key()
EVENTS_KEY = public_key_text(KEY)
FINAL = ("delivered", "bounced", "complained")


async def types_of(store: EventStore, mid: str) -> list[str]:
    return [e.type.value for e in await store.load_events(mid)]


async def run_until_sent(store: EventStore, mailer: Mailer, ids: list[str]) -> None:
    """Router, timer releaser and mailer until every e-mail is sent and billed."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_until_stopped("router", Router(store, RouteStore(store.db), utcnow).step,
                                                   stop, 0.02)),
             asyncio.create_task(run_until_stopped("timers", TimerReleaser(Timers(store.db), LaneBook(store.db),
                                                                           utcnow).step, stop, 0.05)),
             asyncio.create_task(mailer.run(stop))]
    try:
        async def billed() -> bool:
            return all(["billed" in await types_of(store, mid) for mid in ids])

        await wait_for(billed, timeout_s=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def mail(to: str) -> dict[str, Any]:
    return {"channel": "email", "to": to, "from": "shop@acme.example", "subject": "Your order", "text": "Thanks"}


def signed(batch: list[dict[str, Any]], key: Any = KEY) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(batch).encode() + b"\r\n"
    ts = str(int(time.time()))
    return body, {"Content-Type": "application/json", TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(key, ts, body)}


def sg(event: str, event_id: str, provider_id: str, **extra: Any) -> dict[str, Any]:
    return {"event": event, "sg_event_id": event_id, "sg_message_id": f"{provider_id}.filter0001.0",
            "email": "x@example.org", "timestamp": int(time.time()), **extra}


async def sent_email(store: EventStore, to: str, provider_id: str, route: str = "mail") -> str:
    """An e-mail as the mailer leaves it: accepted, routed, sent (with the provider's id) and billed."""
    now, mid = utcnow(), new_message_id()
    s = Submission(to=to, sender="shop@acme.example", text="t", encoding="utf-8", parts=1, channel="email",
                   email=EmailContent(to=to, sender="shop@acme.example", subject="s", text="t").accepted_fields())
    docs = [accepted(mid, "acme", s, now).events[0]]
    state = state_of_accepted(docs[0])
    for kind, data in ((EventType.ROUTED, {"route_id": route, "price_per_part": 2, "currency": "EUR",
                                           "strategy": "failover"}),
                       (EventType.SENT, {"route_id": route, "smsc_message_ids": [], "provider_message_id": provider_id,
                                         "message_id_header": f"<{mid}@acme.example>", "provider": "smtp",
                                         "attempt": 1, "parts": 1, "breaker": "closed"}),
                       (EventType.BILLED, billed_data(route, 1, 2, "EUR"))):
        docs.append(event_doc(state, kind, now, data, route_id=route))
        state = evolve(state, Event.from_doc(docs[-1]))
    write = Write(mid, docs)
    await store.accept([write], side_writes=[(PROVIDER_IDS, provider_id_inserts([write], now))])
    return mid


async def setup(db: AsyncDatabase, *routes: Route) -> tuple[EventStore, dict[str, str]]:
    key = await TenantStore(db).create("acme", "Acme", utcnow())
    for r in routes:
        await RouteStore(db).upsert(r, actor="test", now=utcnow())
    return EventStore(db), {"Authorization": f"Bearer {key}"}


ADMIN = {"Authorization": "Bearer mka_events_test"}


@asynccontextmanager
async def api(db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(mongo_url="mongodb://unused.invalid", admin_key=ADMIN["Authorization"].split()[1])
    async with app_client(create_app(settings, db=db)) as client:
        yield client


async def test_a_bad_signature_is_refused_and_nothing_is_written(mongo_db: AsyncDatabase) -> None:
    routes = (Route(id="mail", kind="smtp", events_key=EVENTS_KEY), Route(id="nokey", kind="smtp"),
              Route(id="badkey", kind="smtp", events_key="bm90IGEga2V5"), Route(id="sms1"))
    store, _ = await setup(mongo_db, *routes)
    mid = await sent_email(store, "bob@example.org", "Q1")
    before = await mongo_db["events"].count_documents({})
    batch = [sg("delivered", "e1", "Q1"), sg("spamreport", "e2", "Q1")]
    body, headers = signed(batch)
    async with api(mongo_db) as client:
        post = client.post
        assert_error(await post("/v1/providers/mail/events", content=body,
                                headers={"Content-Type": "application/json"}), 401, "invalid_signature")
        other = signed(batch, new_private_key())[1]
        assert_error(await post("/v1/providers/mail/events", content=body, headers=other), 401, "invalid_signature")
        tampered = body.replace(b"spamreport", b"delivered ")
        assert_error(await post("/v1/providers/mail/events", content=tampered, headers=headers), 401,
                     "invalid_signature")
        late = {**headers, TIMESTAMP_HEADER: str(int(headers[TIMESTAMP_HEADER]) + 1)}
        assert_error(await post("/v1/providers/mail/events", content=body, headers=late), 401, "invalid_signature")
        for route in ("nokey", "badkey"):
            assert_error(await post(f"/v1/providers/{route}/events", content=body, headers=headers), 403,
                         "provider_events_not_configured")
        for route in ("sms1", "nosuch"):
            assert_error(await post(f"/v1/providers/{route}/events", content=body, headers=headers), 404, "not_found")
        for bad, status, code in ((b"{}", 422, "invalid_events"), (b"[{", 400, "invalid_json")):
            assert_error(await post("/v1/providers/mail/events", content=bad, headers=signed_raw(bad)), status, code)
        assert await mongo_db["events"].count_documents({}) == before
        assert await mongo_db[ORPHANS].count_documents({}) == 0
        # The key is set like any route field, through the admin API; then the same body is taken.
        r = await client.patch("/v1/admin/routes/nokey", json={"events_key": EVENTS_KEY}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["route"]["events_key"] == EVENTS_KEY, r.text
        r = await post("/v1/providers/nokey/events", content=body, headers=headers)
        assert r.status_code == 200 and r.json()["orphans"] == 2, r.text  # Q1 was sent on route mail
    assert await mongo_db["events"].count_documents({}) == before
    assert await mongo_db[ORPHANS].count_documents({"route_id": "nokey"}) == 2
    assert await types_of(store, mid) == ["accepted", "routed", "sent", "billed"]
    assert not await SuppressionStore(mongo_db).list("acme", channel="email")


def signed_raw(body: bytes) -> dict[str, str]:
    ts = str(int(time.time()))
    return {"Content-Type": "application/json", TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign(KEY, ts, body)}


async def test_each_provider_event_is_applied_once_and_bounces_and_complaints_suppress(
        mongo_db: AsyncDatabase) -> None:
    store, auth = await setup(mongo_db, Route(id="mail", kind="smtp", events_key=EVENTS_KEY))
    a, b, c = [await sent_email(store, f"{n}@example.org", f"Q{n}") for n in "abc"]
    elsewhere = await sent_email(store, "o@example.org", "Qo", route="other")  # not this route's: an orphan here
    first = [sg("delivered", "e1", "Qa", response="250 OK"), sg("delivered", "e1", "Qa"),
             sg("bounce", "e2", "Qb", type="bounce", status="5.1.1", reason="550 no such user"),
             sg("delivered", "e9", "Qz"), sg("open", "e10", "Qa"), sg("delivered", "e11", "Qo")]
    body, headers = signed(first)
    async with api(mongo_db) as client:
        answers = await asyncio.gather(*(client.post("/v1/providers/mail/events", content=body, headers=headers)
                                         for _ in range(3)))
        answers.append(await client.post("/v1/providers/mail/events", content=body, headers=headers))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        outs = [r.json() for r in answers]
        assert sum(o["applied"].get("delivered", 0) for o in outs) == 1
        assert sum(o["applied"].get("bounced", 0) for o in outs) == 1
        assert sum(o["suppressed"] for o in outs) == 1
        assert all(o["received"] == 6 and o["ignored"] == 1 and o["orphans"] == 2 for o in outs)
        assert outs[-1]["duplicates"] == 3  # e1 twice in the body, e2 applied before

        later = [sg("bounce", "e3", "Qc", type="blocked", status="4.7.1", reason="rate limited"),
                 sg("spamreport", "e4", "Qa"), sg("delivered", "e5", "Qb")]
        r = await client.post("/v1/providers/mail/events", content=(p := signed(later))[0], headers=p[1])
        assert r.json() | {"received": 3} == {"received": 3, "applied": {"bounced": 1, "complained": 1},
                                             "duplicates": 0, "stale": 1, "orphans": 0, "ignored": 0,
                                             "malformed": 0, "suppressed": 1}

        later_mails = await submit_each(client, auth, ["a@example.org", "b@example.org", "c@example.org"])

    assert await types_of(store, a) == ["accepted", "routed", "sent", "billed", "delivered", "complained"]
    assert await types_of(store, b) == ["accepted", "routed", "sent", "billed", "bounced"]
    assert await types_of(store, c) == ["accepted", "routed", "sent", "billed", "bounced"]
    delivered, bounce_b, bounce_c = [(await store.load_events(mid))[4].data for mid in (a, b, c)]
    assert delivered["provider_event_id"] == "e1" and delivered["response"] == "250 OK"
    assert (bounce_b["bounce_type"], bounce_b["code"], bounce_b["reason"]) == ("hard", "5.1.1", "550 no such user")
    assert bounce_c["bounce_type"] == "soft"
    assert await mongo_db[ORPHANS].count_documents({}) == 2  # kept once each, however often they came
    assert await types_of(store, elsewhere) == ["accepted", "routed", "sent", "billed"]
    # Lookups by `_id` beside the log, no index on `events`: one id per applied provider event.
    assert await mongo_db[EVENT_IDS].count_documents({}) == 4  # e1, e2, e3, e4 (e5 was stale)
    names = set(await mongo_db["events"].index_information())
    assert not names & {"email_sent_provider_id", "provider_event_id"}
    await assert_suppressed(mongo_db, store, later_mails)


async def submit_each(client: httpx.AsyncClient, auth: dict[str, str], tos: list[str]) -> dict[str, tuple[str, ...]]:
    """One e-mail to each address: address -> (id, status, reason)."""
    out = {}
    for to in tos:
        r = await client.post("/v1/messages", json=mail(to), headers=auth)
        assert r.status_code == 202, r.text
        out[to] = (r.json()["id"], r.json()["status"], r.json().get("reason"))
    return out


async def assert_suppressed(db: AsyncDatabase, store: EventStore, later: dict[str, tuple[str, ...]]) -> None:
    """a@ (complaint) and b@ (hard bounce) are on the e-mail list and their later e-mails rejected;
    c@ (soft bounce) is not."""
    entries = await SuppressionStore(db).list("acme", channel="email")
    assert [(e["address"], e["scope"], e["source"]) for e in entries] == [
        ("a@example.org", "*", "complaint"), ("b@example.org", "*", "bounce")]
    assert entries[1]["actor"] == "provider:mail:e2"
    for to in ("a@example.org", "b@example.org"):
        mid, status, reason = later[to]
        assert (status, reason) == ("rejected", "suppressed")
        assert await types_of(store, mid) == ["accepted", "rejected"]  # never sent nor billed
    assert later["c@example.org"][1:] == ("accepted", None)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """The app behind uvicorn on 127.0.0.1, lifespan on (it creates the indexes)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: asyncio.sleep(0, result=server.started), timeout_s=20)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def test_mail_sim_posts_signed_events_that_end_each_email_and_reach_reporting(
        mongo_db: AsyncDatabase, tmp_path: Path, pg_url: str, pg_schema: str) -> None:
    app = create_app(Settings(mongo_url="mongodb://unused.invalid"), db=mongo_db)
    async with serving(app) as url:
        poster = EventPoster(EventSettings(url=f"{url}/v1/providers/mail/events", key=KEY, delay_s=0.2))
        sim = EventingMailSim(tmp_path / "sink", events=poster)
        await sim.start()
        try:
            route = Route(id="mail", kind="smtp", port=sim.port, price_per_part=2, pool=2, events_key=EVENTS_KEY)
            store, auth = await setup(mongo_db, route)
            recipients = ["ann@example.org", "bounce@example.org", "complaint@example.org", "blocked@example.org"]
            async with httpx.AsyncClient(base_url=url) as client:
                ids = [(await client.post("/v1/messages", json=mail(to), headers=auth)).json()["id"]
                       for to in recipients]
                mailer = Mailer(store, RouteStore(mongo_db), route, utcnow, owner="test-mailer", batch_size=20)
                await run_until_sent(store, mailer, ids)

                async def ended() -> bool:
                    return all([(await types_of(store, mid))[-1] in FINAL for mid in ids])

                await wait_for(ended, timeout_s=30)
                again = [(await client.post("/v1/messages", json=mail(to), headers=auth)).json()
                         for to in recipients[1:3]]
        finally:
            await sim.stop()
    assert [(await types_of(store, mid))[4:] for mid in ids] == [
        ["delivered"], ["bounced"], ["delivered", "complained"], ["bounced"]]
    assert [(r["status"], r["reason"]) for r in again] == [("rejected", "suppressed")] * 2
    assert poster.stats["posted"] == 5 and poster.stats["dropped"] == 0

    stats = await replay_into(mongo_db["events"], pg_url, pg_schema)
    assert stats.applied == await mongo_db["events"].count_documents({})
    report = await verify(mongo_db, pg_url, pg_schema, utcnow())
    assert report.ok, report.discrepancies
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute(sql.SQL(
            "SELECT route_id, sent, delivered, bounced, hard_bounced, soft_bounced, complained, delivery_rate, "
            "bounce_rate, hard_bounce_rate, complaint_rate FROM {}").format(
            sql.Identifier(pg_schema, "email_provider_daily")))
        rows = await cur.fetchall()
        cur = await conn.execute(sql.SQL("SELECT state, count(*) FROM {} GROUP BY 1 ORDER BY 1").format(
            sql.Identifier(pg_schema, "messages")))
        states = dict(await cur.fetchall())
    assert [(r[0], *r[1:7], *(float(x) for x in r[7:])) for r in rows] == [
        ("mail", 4, 2, 2, 1, 1, 1, 0.5, 0.5, 0.25, 0.5)]
    assert states == {"bounced": 2, "complained": 1, "delivered": 1, "rejected": 2}
