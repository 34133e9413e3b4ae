"""The suppression list against a real MongoDB (and PostgreSQL for the projector and verify): the
`/v1/suppressions` API with its 4xx answers, rejection at acceptance (batches, idempotent replays,
campaign uploads), the round trips acceptance costs, and the log's readers taking the new events."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest_asyncio
from psycopg import sql
from pymongo import AsyncMongoClient, monitoring
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.consent import Change
from core.domain.events import utcnow
from core.store.eventstore import EventStore
from core.store.lanes import LaneStore
from core.store.suppressions import SuppressionFlags, SuppressionStore
from core.store.tenants import TenantStore
from core.submission_service import Submission, SubmissionService
from ops.verify import verify
from projections.replay import replay_into
from tests.support.api import app_client, assert_error

A, B, C, D = "+4915100000001", "+4915100000002", "+4915100000003", "+4915100000004"


@pytest_asyncio.fixture(loop_scope="session")
async def api(mongo_db: AsyncDatabase) -> AsyncIterator[dict[str, Any]]:
    tenants = TenantStore(mongo_db)
    keys = {t: await tenants.create(t, t.title(), utcnow()) for t in ("acme", "other")}
    app = create_app(Settings(mongo_url="mongodb://unused.invalid"), db=mongo_db)
    async with app_client(app) as client:
        yield {"client": client, "db": mongo_db,
               "auth": {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}}


async def consent_events(db: AsyncDatabase) -> list[dict[str, Any]]:
    return [d async for d in db["events"].find({"type": {"$in": ["opted_out", "opted_in"]}}).sort("_id")]


async def test_add_list_and_remove_through_the_api(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    r = await client.post("/v1/suppressions", json={"address": A, "reason": "asked by phone"}, headers=auth)
    assert r.status_code == 200 and r.json() == {"changed": 1, "unchanged": 0}, r.text
    again = await client.post("/v1/suppressions", json={"address": A}, headers=auth)
    assert again.json() == {"changed": 0, "unchanged": 1}  # already out: no second event
    batch = {"suppressions": [{"address": B, "scope": "AcmeShop"}, {"address": B, "scope": "4930111111"},
                              {"address": C}]}
    assert (await client.post("/v1/suppressions", json=batch, headers=auth)).json()["changed"] == 3

    events = await consent_events(db)
    assert [(e["type"], e["data"]["address"], e["data"]["scope"], e["seq"]) for e in events] == [
        ("opted_out", A, "*", 1), ("opted_out", B, "AcmeShop", 1), ("opted_out", B, "+4930111111", 1),
        ("opted_out", C, "*", 1)]
    assert events[0]["data"]["source"] == "api" and events[0]["data"]["actor"] == "api:acme"
    assert events[0]["data"]["reason"] == "asked by phone" and events[0]["message_id"] == f"sup:acme:sms:{A}:*"

    page1 = (await client.get("/v1/suppressions?limit=2", headers=auth)).json()
    assert [(s["address"], s["scope"]) for s in page1["suppressions"]] == [(A, "*"), (B, "+4930111111")]
    page2 = (await client.get("/v1/suppressions", params={"limit": 2, "after": page1["next_after"]},
                              headers=auth)).json()
    assert [(s["address"], s["scope"]) for s in page2["suppressions"]] == [(B, "AcmeShop"), (C, "*")]
    assert page2["next_after"] is not None
    assert (await client.get("/v1/suppressions", params={"limit": 2, "after": page2["next_after"]},
                             headers=auth)).json() == {"suppressions": [], "next_after": None}
    only_b = (await client.get("/v1/suppressions", params={"address": B}, headers=auth)).json()
    assert {s["scope"] for s in only_b["suppressions"]} == {"AcmeShop", "+4930111111"}
    assert (await client.get("/v1/suppressions", headers=api["auth"]["other"])).json()["suppressions"] == []

    removed = await client.delete(f"/v1/suppressions/{B}", params={"scope": "AcmeShop"}, headers=auth)
    assert removed.json() == {"changed": 1, "unchanged": 0}
    assert (await client.delete(f"/v1/suppressions/{B}", headers=auth)).json()["changed"] == 1  # every scope left
    assert_error(await client.delete(f"/v1/suppressions/{B}", headers=auth), 404, "not_found")
    assert_error(await client.delete(f"/v1/suppressions/{A}", headers=api["auth"]["other"]), 404, "not_found")
    assert (await client.post("/v1/suppressions", json={"address": B, "scope": "AcmeShop"},
                              headers=auth)).json()["changed"] == 1  # out again: the entry's seq 3
    entry = [e for e in await consent_events(db) if e["message_id"] == f"sup:acme:sms:{B}:AcmeShop"]
    assert [(e["type"], e["seq"]) for e in entry] == [("opted_out", 1), ("opted_in", 2), ("opted_out", 3)]
    doc = await db["consent"].find_one({"_id": "acme"})
    assert doc is not None and doc["active"]["sms"] == 3  # A, C, B/AcmeShop


async def test_bad_input_is_refused_whole_with_stable_codes(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    assert_error(await client.post("/v1/suppressions", json={"address": "12345"}, headers=auth),
                 422, "validation_error")
    mixed = {"suppressions": [{"address": A}, {"address": B, "scope": "way too long sender"}]}
    assert_error(await client.post("/v1/suppressions", json=mixed, headers=auth), 422, "validation_error")
    assert_error(await client.post("/v1/suppressions", json={"address": A, "channel": "fax"}, headers=auth),
                 422, "validation_error")
    assert_error(await client.post("/v1/suppressions", content=b"{", headers={**auth, "Content-Type":
                                   "application/json"}), 400, "invalid_json")
    assert_error(await client.delete("/v1/suppressions/not-a-number", headers=auth), 422, "invalid_address")
    assert_error(await client.get("/v1/suppressions?address=abc", headers=auth), 422, "invalid_address")
    assert_error(await client.get("/v1/suppressions?after=!!", headers=auth), 422, "validation_error")
    assert_error(await client.get("/v1/suppressions"), 401, "unauthorized")
    not_a_number = await client.delete("/v1/suppressions/export", headers=auth)  # a route's word, not a number
    assert_error(not_a_number, 405, "method_not_allowed")
    assert not_a_number.headers["allow"] == "GET"
    assert await consent_events(db) == [] and await db["suppressions"].count_documents({}) == 0


async def test_csv_import_is_all_or_nothing_and_export_lists_the_active_entries(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    csv_headers = {**auth, "Content-Type": "text/csv"}
    bad = "phone;scope;reason\n+4915100000001;;\n12345;*;x\n+4915100000003;not a sender id;\n"
    r = await client.post("/v1/suppressions/import", content=bad.encode(), headers=csv_headers)
    details = assert_error(r, 422, "invalid_csv_rows")["details"]
    assert details == {"problems": [{"row": 3, "code": "invalid_phone"}, {"row": 4, "code": "invalid_scope"}],
                       "count": 2}
    assert await consent_events(db) == []  # nothing of the file was written
    assert_error(await client.post("/v1/suppressions/import", content=b"name,scope\nx,*\n", headers=csv_headers),
                 422, "invalid_csv_header")
    assert_error(await client.post("/v1/suppressions/import", content=b"\xff\xfe", headers=csv_headers),
                 422, "invalid_encoding")
    assert_error(await client.post("/v1/suppressions/import", content=b"phone\n", headers={**auth,
                                   "Content-Type": "application/json"}), 415, "unsupported_media_type")

    good = "\ufeffMSISDN,scope,reason\r\n004915100000001,,complaint\r\n+4915100000002,AcmeShop,\r\n\r\n"
    r = await client.post("/v1/suppressions/import", content=good.encode(), headers=csv_headers)
    assert r.status_code == 200 and r.json() == {"changed": 2, "unchanged": 0}, r.text
    events = await consent_events(db)
    assert {(e["data"]["address"], e["data"]["scope"], e["data"]["source"]) for e in events} == {
        (A, "*", "import"), (B, "AcmeShop", "import")}

    export = await client.get("/v1/suppressions/export", headers=auth)
    assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
    lines = export.text.splitlines()
    assert lines[0] == "address,scope,channel,since,source,reason"
    assert [line.split(",")[:3] for line in lines[1:]] == [[A, "*", "sms"], [B, "AcmeShop", "sms"]]
    assert lines[1].endswith(",import,complaint")
    other = await client.get("/v1/suppressions/export", headers=api["auth"]["other"])
    assert other.text.splitlines() == ["address,scope,channel,since,source,reason"]


async def test_keyword_settings_through_the_api(api: dict[str, Any]) -> None:
    client, auth = api["client"], api["auth"]["acme"]
    assert (await client.get("/v1/suppressions/settings", headers=auth)).json() == {
        "languages": [], "keywords": [], "confirm": False,
        "confirm_texts": {"stop": None, "stop_all": None, "start": None}}
    body = {"languages": ["de"], "keywords": [{"keyword": "halt", "action": "stop_all"}], "confirm": True,
            "confirm_texts": {"stop": "Bye"}}
    r = await client.put("/v1/suppressions/settings", json=body, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["keywords"] == [{"keyword": "HALT", "action": "stop_all"}]
    got = (await client.get("/v1/suppressions/settings", headers=auth)).json()
    assert got["languages"] == ["de"] and got["confirm"] is True and got["confirm_texts"]["stop"] == "Bye"
    assert_error(await client.put("/v1/suppressions/settings", json={"languages": ["klingon"]}, headers=auth),
                 422, "validation_error")
    two_words = {"keywords": [{"keyword": "no more", "action": "stop"}]}
    err = assert_error(await client.put("/v1/suppressions/settings", json=two_words, headers=auth),
                       422, "validation_error")
    assert err["details"][0]["field"] == "body.keywords"
    assert (await client.get("/v1/suppressions/settings", headers=auth)).json()["keywords"][0]["keyword"] == "HALT"
    assert (await client.get("/v1/suppressions/settings", headers=api["auth"]["other"])).json()["confirm"] is False


async def test_a_batch_rejects_only_the_suppressed_recipients(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    await client.post("/v1/suppressions", json={"suppressions": [
        {"address": A}, {"address": B, "scope": "AcmeShop"}, {"address": C, "scope": "Other"}]}, headers=auth)
    batch = {"messages": [{"to": n, "from": "AcmeShop", "text": f"hi {n}"} for n in (A, B, C, D)]}
    r = await client.post("/v1/messages", json=batch, headers={**auth, "Idempotency-Key": "batch-1"})
    assert r.status_code == 202, r.text
    answer = r.json()["messages"]
    assert [(m["status"], m.get("reason")) for m in answer] == [
        ("rejected", "opted_out"), ("rejected", "opted_out"), ("accepted", None), ("accepted", None)]
    ids = [m["id"] for m in answer]
    for mid, scope in ((ids[0], "*"), (ids[1], "AcmeShop")):
        events = [e async for e in db["events"].find({"message_id": mid}).sort("seq")]
        assert [(e["type"], e.get("topic")) for e in events] == [("accepted", None), ("rejected", None)]
        assert events[1]["data"] == {"reason": "opted_out", "scope": scope}
        status = (await client.get(f"/v1/messages/{mid}", headers=auth)).json()
        assert status["status"] == "rejected" and not status["billed"]
    for mid in ids[2:]:
        doc = await db["events"].find_one({"message_id": mid, "seq": 1})
        assert doc is not None and doc["topic"] is not None  # handed to the router as always
    assert await db["timers"].count_documents({"message_id": {"$in": ids[:2]}}) == 0

    replay = await client.post("/v1/messages", json=batch, headers={**auth, "Idempotency-Key": "batch-1"})
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert [m["status"] for m in replay.json()["messages"]] == ["rejected", "rejected", "accepted", "accepted"]
    single = await client.post("/v1/messages", json={"to": A, "from": "Another", "text": "x"},
                               headers=api["auth"]["other"])
    assert single.json()["status"] == "accepted"  # another tenant's list is not this one's


class CommandCounter(monitoring.CommandListener):
    def __init__(self) -> None:
        self.reads: list[str] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        collection = event.command.get(event.command_name)
        if event.command_name in ("find", "aggregate") and collection in ("consent", "suppressions"):
            self.reads.append(f"{event.command_name} {collection}")

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


async def test_acceptance_costs_no_round_trip_while_a_tenant_has_no_entries(mongo_url: str,
                                                                           mongo_db: AsyncDatabase) -> None:
    counter = CommandCounter()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True, event_listeners=[counter])
    try:
        db = client[mongo_db.name]
        flags = SuppressionFlags(ttl_s=3600)  # no expiry during the test: what is counted is the cache's effect
        store = SuppressionStore(db, flags)
        service = SubmissionService(EventStore(db), LaneStore(db), set(), suppressions=store)
        sms = [Submission(to=n, sender="Acme", text="x", encoding="gsm7", parts=1, validity_s=600) for n in (A, B)]
        await service.submit("acme", sms, utcnow())
        assert counter.reads == ["find consent"]  # the tenant's flag, once per process and ttl
        counter.reads.clear()
        for _ in range(3):
            await service.submit("acme", sms, utcnow())
        assert counter.reads == []  # no entries: no round trip per batch
        await store.apply("acme", [Change("sms", A, "*", True, "api", "test")], utcnow())
        counter.reads.clear()
        submitted = await service.submit("acme", sms, utcnow())
        assert counter.reads == ["find suppressions"]  # with entries: one query per batch
        assert list(submitted.rejected) == [submitted.ids[0]]
    finally:
        await client.close()


async def test_campaign_upload_reports_opted_out_rows(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    await client.post("/v1/suppressions", json={"suppressions": [
        {"address": A}, {"address": B, "scope": "AcmeShop"}, {"address": C, "scope": "Other"}]}, headers=auth)
    r = await client.post("/v1/campaigns", json={"name": "n", "from": "AcmeShop", "template": "Hi {{name}}"},
                          headers=auth)
    cid = r.json()["id"]
    csv_text = f"phone,name\n{A},a\n{B},b\n{C},c\n{D},d\nbad,e\n"
    report = (await client.post(f"/v1/campaigns/{cid}/recipients", content=csv_text.encode(),
                                headers={**auth, "Content-Type": "text/csv"})).json()
    assert (report["rows"], report["accepted"], report["duplicates"], report["invalid"]) == (5, 2, 0, 3), report
    assert [(p["row"], p["code"]) for p in report["problems"]] == [(2, "opted_out"), (3, "opted_out"),
                                                                    (6, "invalid_phone")]
    assert "every sender" in report["problems"][0]["reason"]
    accepted = {d["data"]["to"] async for d in db["events"].find({"type": "accepted", "data.campaign_id": cid})}
    assert accepted == {C, D}
    problems = (await client.get(f"/v1/campaigns/{cid}/problems", headers=auth)).json()
    assert [p["code"] for p in problems["problems"]][:2] == ["opted_out", "opted_out"]


async def test_verify_and_the_projector_take_the_consent_events(api: dict[str, Any], pg_url: str,
                                                                 pg_schema: str) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    await client.post("/v1/suppressions", json={"address": A}, headers=auth)
    await client.delete(f"/v1/suppressions/{A}", headers=auth)
    await client.post("/v1/suppressions", json={"address": B}, headers=auth)
    r = await client.post("/v1/messages", json={"to": B, "from": "AcmeShop", "text": "x"}, headers=auth)
    rejected_id = r.json()["id"]
    stats = await replay_into(db["events"], pg_url, pg_schema)
    assert stats.applied == 5  # opted_out, opted_in, opted_out, accepted, rejected
    report = await verify(db, pg_url, pg_schema, utcnow())
    assert report.ok, report.discrepancies
    assert report.counts["terminal"] == 3 and report.counts["stuck"] == 0
    s = sql.Identifier(pg_schema)
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        cur = await conn.execute(sql.SQL("SELECT message_id, state, billed FROM {}.messages ORDER BY message_id")
                                 .format(s))
        rows = {m: (state, billed) for m, state, billed in await cur.fetchall()}
        cur = await conn.execute(sql.SQL("SELECT address, scope, active, source FROM {}.suppressions ORDER BY address")
                                 .format(s))
        entries = await cur.fetchall()
        cur = await conn.execute(sql.SQL("SELECT address, change FROM {}.suppression_changes ORDER BY changed_at, seq")
                                 .format(s))
        changes = await cur.fetchall()
    # A suppression entry is not a message: no `messages` row; its changes and state are reported apart.
    assert rows == {rejected_id: ("rejected", False)}
    assert entries == sorted([(A, "*", False, "api"), (B, "*", True, "api")])
    assert changes == [(A, "opted_out"), (A, "opted_in"), (B, "opted_out")]


async def test_concurrent_changes_of_one_entry_write_one_event_each_and_keep_the_count(
        mongo_db: AsyncDatabase) -> None:
    """Ten writers opt the same number out at once: one `opted_out` event, the rest change nothing;
    then ten opt it in at once: one `opted_in`. The tenant's count of active entries stays exact."""
    store = SuppressionStore(mongo_db)
    out = Change("sms", A, "*", True, "api", "test")
    results = await asyncio.gather(*(SuppressionStore(mongo_db).apply("acme", [out], utcnow()) for _ in range(10)))
    assert sum(len(r) for r in results) == 1
    assert (await mongo_db["consent"].find_one({"_id": "acme"}) or {})["active"]["sms"] == 1
    back = Change("sms", A, "*", False, "api", "test")
    results = await asyncio.gather(*(store.apply("acme", [back], utcnow()) for _ in range(10)))
    assert sum(len(r) for r in results) == 1
    events = [(e["type"], e["seq"]) for e in await consent_events(mongo_db)]
    assert events == [("opted_out", 1), ("opted_in", 2)]
    assert (await mongo_db["consent"].find_one({"_id": "acme"}) or {})["active"]["sms"] == 0


async def cli(mongo_url: str, db: AsyncDatabase, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": db.name,
           "MSGCORE_DATA_DIR": str(tmp_path), "MSGCORE_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ops.cli", "suppressions", *args,
                                                cwd=Path(__file__).resolve().parents[2], env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_adds_lists_and_removes(mongo_db: AsyncDatabase, mongo_url: str, tmp_path: Path) -> None:
    code, out, err = await cli(mongo_url, mongo_db, tmp_path, "add", "--tenant", "acme", A, "--reason", "letter")
    assert code == 0 and out.strip() == "opted out", err
    code, out, _ = await cli(mongo_url, mongo_db, tmp_path, "add", "--tenant", "acme", A, "--scope", "AcmeShop")
    assert code == 0
    code, out, _ = await cli(mongo_url, mongo_db, tmp_path, "list", "--tenant", "acme")
    assert [line.split("\t")[:2] for line in out.splitlines()] == [[A, "*"], [A, "AcmeShop"]]
    event = next(e for e in await consent_events(mongo_db) if e["data"]["scope"] == "*")
    assert event["data"]["source"] == "cli" and event["data"]["actor"].startswith("cli")
    assert event["data"]["reason"] == "letter"
    code, _, err = await cli(mongo_url, mongo_db, tmp_path, "add", "--tenant", "acme", "12345")
    assert code == 2 and "E.164" in err
    code, out, err = await cli(mongo_url, mongo_db, tmp_path, "remove", "--tenant", "acme", A)
    assert code == 0 and "2 entries" in out, err
    code, _, err = await cli(mongo_url, mongo_db, tmp_path, "remove", "--tenant", "acme", A)
    assert code == 1 and "not suppressed" in err


async def test_a_message_accepted_before_the_opt_out_is_rejected_by_the_router_not_sent(
        mongo_db: AsyncDatabase) -> None:
    """A campaign or scheduled message accepted while its recipient could still be messaged, the STOP
    recorded before it is routed: the router rejects it (`opted_out`); the others are routed."""
    from core.domain.routing import Route
    from core.store.routes import RouteStore
    from core.workers.router import Router
    from tests.support.factories import accepted

    store = EventStore(mongo_db)
    await RouteStore(mongo_db).upsert(Route(id="sim", port=1), actor="test", now=utcnow())
    items = [accepted("acme", utcnow(), to=n) for n in (A, B, C)]
    await store.accept([w for _, w in items])
    await SuppressionStore(mongo_db).apply("acme", [Change("sms", B, "*", True, "api", "test")], utcnow())
    router = Router(store, RouteStore(mongo_db), utcnow)
    assert await router.step() == 3
    states = await store.states([e.message_id for e, _ in items])
    by_to = {st.to: st for st in states.values()}
    assert by_to[B].state == "rejected" and by_to[B].extra.get("reason") == "opted_out"
    assert by_to[A].state == by_to[C].state == "routed"
    events = await store.log.load_events(by_to[B].message_id)
    assert [e["type"] for e in events] == ["accepted", "rejected"] and "topic" not in events[-1]
    assert events[-1]["data"] == {"reason": "opted_out", "scope": "*"}


async def test_email_entries_through_the_api(api: dict[str, Any]) -> None:
    """The list of channel email (fed by hard bounces and complaints too) is listed, added to and
    removed from like the SMS one; an e-mail to a listed address is rejected `suppressed`."""
    client, auth = api["client"], api["auth"]["acme"]
    r = await client.post("/v1/suppressions", json={"channel": "email", "address": "Bob@Example.ORG"}, headers=auth)
    assert r.status_code == 200 and r.json() == {"changed": 1, "unchanged": 0}
    listed = (await client.get("/v1/suppressions?channel=email", headers=auth)).json()["suppressions"]
    assert [(e["address"], e["scope"], e["channel"]) for e in listed] == [("Bob@example.org", "*", "email")]
    assert (await client.get("/v1/suppressions", headers=auth)).json()["suppressions"] == []  # the SMS list
    mail = {"channel": "email", "to": "Bob@example.org", "from": "shop@acme.example", "subject": "Hi", "text": "x"}
    r = await client.post("/v1/messages", json=mail, headers=auth)
    assert (r.status_code, r.json()["status"], r.json()["reason"]) == (202, "rejected", "suppressed")
    for bad in ({"channel": "email", "address": "not an address"},
                {"channel": "email", "address": "bob@example.org", "scope": "AcmeShop"},
                {"channel": "sms", "address": "bob@example.org"}):
        assert_error(await client.post("/v1/suppressions", json=bad, headers=auth), 422, "validation_error")
    assert_error(await client.get("/v1/suppressions?channel=email&address=nope", headers=auth), 422,
                 "invalid_address")
    r = await client.delete("/v1/suppressions/Bob@Example.ORG?channel=email", headers=auth)
    assert r.status_code == 200 and r.json()["changed"] == 1
    assert (await client.get("/v1/suppressions?channel=email", headers=auth)).json()["suppressions"] == []
    r = await client.post("/v1/messages", json=mail, headers=auth)
    assert r.json()["status"] == "accepted"
