"""E-mail campaigns against real servers: the api (in-process ASGI) on the embedded MongoDB-wire server,
then the router, timer releaser and mailer sending to a real `mail-sim` SMTP server, whose `.eml` files
are the proof. Definitions refused with stable codes, the upload's report (invalid_email, missing_tag,
duplicate, header_injection, suppressed), every accepted row sent once with its tags filled in
(HTML-escaped in html)."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.domain.routing import Route
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from core.store.timers import Timers
from core.workers.loop import run_until_stopped
from core.workers.mailer import Mailer
from core.workers.router import Router
from core.workers.timers import TimerReleaser
from ops.mail_sim.server import MailSim
from projections.replay import replay_into
from tests.support.api import app_client
from tests.support.waiting import wait_for

RECIPIENTS = 300
CAMPAIGN = {"name": "Spring mail", "channel": "email", "from": "Shop@Acme.example", "from_name": "Acme Shop",
            "reply_to": "help@acme.example", "subject": "Hi {{name}}, news from {{city}}",
            "text": "Hello {{name}},\nour shop in {{city}} is open.",
            "html": "<p>Hello <b>{{name}}</b> in {{city}}</p>"}


@pytest_asyncio.fixture(loop_scope="session")
async def api(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> AsyncIterator[dict[str, Any]]:
    key = await TenantStore(mongo_db).create("acme", "Acme", utcnow())
    settings = Settings(mongo_url="mongodb://unused.invalid", pg_url=pg_url, reporting_schema=pg_schema)
    async with app_client(create_app(settings, db=mongo_db)) as client:
        yield {"client": client, "db": mongo_db, "auth": {"Authorization": f"Bearer {key}"}, "pg": (pg_url, pg_schema)}


async def _create(api: dict[str, Any], **body: Any) -> httpx.Response:
    return await api["client"].post("/v1/campaigns", json={**CAMPAIGN, **body}, headers=api["auth"])


async def _upload(api: dict[str, Any], cid: str, text: str) -> httpx.Response:
    return await api["client"].post(f"/v1/campaigns/{cid}/recipients", content=text.encode(),
                                    headers={**api["auth"], "Content-Type": "text/csv"})


def _csv() -> str:
    """A header with a mixed-case address column and an unused column; RECIPIENTS good rows (one with a
    name full of markup) and six bad ones, numbered as the report will name them."""
    lines = ["Name;City;E-Mail;unused"]
    lines += [f"User {i};Köln;user{i}@Example.ORG;x" for i in range(RECIPIENTS - 1)]  # rows 2..300
    lines.append('<Tom & "Jerry">;Bonn;tom@example.org;x')  # row 301
    lines.append("Bad;Bonn;not-an-address;x")  # row 302: invalid_email
    lines.append(";Bonn;nobody@example.org;x")  # row 303: missing_tag
    lines.append("Again;Bonn;USER7@example.org;x")  # row 304: the local part's case matters: a new address
    lines.append("Twice;Bonn;user7@EXAMPLE.org;x")  # row 305: duplicate of row 9 (domain case does not)
    lines.append('"Eve\r\nBcc: all@example.org";Bonn;eve@example.org;x')  # rows 306-307: header_injection
    lines.append("Blocked;Bonn;blocked@EXAMPLE.org;x")  # row 308: suppressed (as normalised)
    return "\r\n".join(lines) + "\r\n"


async def test_bad_definitions_and_files_are_refused_with_stable_codes(api: dict[str, Any]) -> None:
    cases = [({"from": "not an address"}, "invalid_email"), ({"reply_to": "x@"}, "invalid_email"),
             ({"subject": "Hi\r\nBcc: x@example.org"}, "header_injection"), ({"from_name": "A\nB"}, "header_injection"),
             ({"html": "<p>{{name</p>"}, "invalid_template"), ({"subject": "{{}}"}, "invalid_template"),
             ({"text": None, "html": None}, "validation_error"), ({"template": "hi"}, "validation_error"),
             ({"channel": "fax"}, "validation_error")]
    for body, code in cases:
        r = await _create(api, **body)
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), (body, r.text)
    assert await api["db"]["campaigns"].count_documents({"channel": "email"}) == 0  # nothing written
    cid = (await _create(api)).json()["id"]
    r = await _upload(api, cid, "phone,name,city\n+4915100000001,Anna,Köln\n")
    assert r.status_code == 422 and r.json()["error"]["details"]["problem"] == "no_email_column"
    r = await _upload(api, cid, "email,name\nbob@example.org,Bob\n")
    assert r.status_code == 422 and r.json()["error"]["details"]["columns"] == ["city"]


async def _send_everything(db: AsyncDatabase, sim: MailSim, expected: int) -> EventStore:
    """Router, timer releaser and a mailer on a route to `sim` until `expected` e-mails are billed."""
    store = EventStore(db)
    routes = RouteStore(db)
    route = Route(id="mail", kind="smtp", port=sim.port, price_per_part=2, pool=2)
    await routes.upsert(route, actor="test", now=utcnow())
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_until_stopped("router", Router(store, routes, utcnow, batch_size=200).step,
                                                   stop, 0.02)),
             asyncio.create_task(run_until_stopped("timers", TimerReleaser(Timers(db), LaneBook(db), utcnow).step,
                                                   stop, 0.05)),
             asyncio.create_task(Mailer(store, routes, route, utcnow, owner="test-mailer", batch_size=100).run(stop))]
    try:
        async def billed() -> bool:
            return await db["events"].count_documents({"type": "billed", "channel": "email"}) >= expected
        await wait_for(billed, timeout_s=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return store


async def test_an_email_campaign_is_validated_started_and_sent(api: dict[str, Any], tmp_path: Path) -> None:
    client, auth, db = api["client"], api["auth"], api["db"]
    r = await client.post("/v1/suppressions", json={"channel": "email", "address": "blocked@example.org"},
                          headers=auth)
    assert r.status_code in (200, 201), r.text
    r = await _create(api)
    assert r.status_code == 201, r.text
    campaign = r.json()
    assert (campaign["channel"], campaign["from"], campaign["tags"]) == ("email", "Shop@acme.example", ["name", "city"])
    assert campaign["email"]["html"] == CAMPAIGN["html"] and campaign["email"]["from_name"] == "Acme Shop"

    report = (await _upload(api, campaign["id"], _csv())).json()
    good = RECIPIENTS + 1  # row 304's USER7 is another mailbox than user7
    assert (report["rows"], report["accepted"], report["duplicates"], report["invalid"]) == (good + 5, good, 1, 4)
    assert [(p["row"], p["code"]) for p in report["problems"]] == [
        (302, "invalid_email"), (303, "missing_tag"), (305, "duplicate"), (306, "header_injection"),
        (308, "suppressed")]
    assert "not-an-address" in report["problems"][0]["reason"] and "row 9" in report["problems"][2]["reason"]
    again = (await _upload(api, campaign["id"], _csv())).json()  # the same file again accepts nothing twice
    assert (again["accepted"], again["duplicates"]) == (0, good + 1)
    problems = (await client.get(f"/v1/campaigns/{campaign['id']}/problems?after_row=301&limit=3", headers=auth)).json()
    assert [p["code"] for p in problems["problems"]] == ["invalid_email", "invalid_email", "missing_tag"]

    tom = await db["events"].find_one({"type": "accepted", "data.campaign_id": campaign["id"],
                                       "data.to": "tom@example.org"})
    assert tom is not None and tom["channel"] == "email" and tom["data"]["campaign_row"] == 301
    assert tom["data"]["subject"] == 'Hi <Tom & "Jerry">, news from Bonn'
    assert tom["data"]["html"] == "<p>Hello <b>&lt;Tom &amp; &quot;Jerry&quot;&gt;</b> in Bonn</p>"
    assert tom["data"]["text"] == 'Hello <Tom & "Jerry">,\nour shop in Bonn is open.'
    assert (tom["data"]["sender"], tom["data"]["from_name"], tom["data"]["reply_to"]) == (
        "Shop@acme.example", "Acme Shop", "help@acme.example")

    r = await client.post(f"/v1/campaigns/{campaign['id']}/start", headers=auth)
    assert (r.status_code, r.json()["status"]) == (200, "running")
    sim = MailSim(tmp_path / "sink")
    await sim.start()
    try:
        await _send_everything(db, sim, good)
        files = sim.eml_files()
    finally:
        await sim.stop()
    assert len(files) == good  # each accepted row once, nothing for the refused ones
    mails = [email.message_from_bytes(f.read_bytes(), policy=email.policy.default) for f in files]
    to_tom = [m for m in mails if str(m["To"]) == "tom@example.org"]
    assert len(to_tom) == 1 and to_tom[0]["Subject"] == 'Hi <Tom & "Jerry">, news from Bonn'
    html = to_tom[0].get_body(("html",))
    assert html is not None and "&lt;Tom &amp; &quot;Jerry&quot;&gt;" in html.get_content()
    assert to_tom[0]["From"].addresses[0].display_name == "Acme Shop"
    assert {str(m["To"]) for m in mails} >= {"user0@example.org", "USER7@example.org"}
    assert not {"blocked@example.org", "eve@example.org", "nobody@example.org"} & {str(m["To"]) for m in mails}
    await replay_into(db["events"], *api["pg"])  # the reporting tables the status reads (the projector's work)
    status = (await client.get(f"/v1/campaigns/{campaign['id']}", headers=auth)).json()
    assert sum(status["counts"].values()) == good and status["counts"].get("sent") == good, status["counts"]
    assert (status["progress"]["total"], status["progress"]["waiting"], status["progress"]["done_percent"]) == (
        good, 0, 100.0)
    assert status["recipients"]["accepted"] == good and status["encodings"] == {"utf-8": good}
    assert status["problems_by_code"] == {"invalid_email": 2, "missing_tag": 2, "duplicate": good + 2,
                                          "header_injection": 2, "suppressed": 2}  # two uploads
