"""The campaigns API against a real MongoDB: create, upload CSV (validation report), start/pause/
resume/cancel, scheduling, tenant isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import EventType, utcnow
from core.domain.message import await_topic, event_doc, state_of_routed
from core.domain.routing import Route, RouteStatus
from core.store.campaigns import CampaignStore
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from core.store.timers import Timers, timer_doc
from core.store.topics import Write, checkpoint_id
from core.workers.campaigns import CampaignSweeper
from core.workers.router import Router
from core.workers.timers import TimerReleaser
from tests.support.api import app_client
from tests.support.waiting import wait_for

TEMPLATE = "Hi {{first_name}}! Stop by {{ store_name }} today."

CSV = (
    "\ufeffPhone,First_Name,store_name,unused\r\n"  # BOM, CRLF, header case, an extra column
    "+4915100000001,Anna,\"Köln, Hbf\",x\r\n"  # a quoted comma
    "0049 151 000-00002,محمد,Berlin,\r\n"  # 00 prefix and separators; an Arabic name (UCS-2)
    "12345,Bob,Berlin,\r\n"  # no + or 00: invalid
    "+4915100000004,,Berlin,\r\n"  # missing tag value
    "+4915100000001,Anna again,Bonn,\r\n"  # duplicate of row 2
    "+4915100000005,Zoë 😀,\"Main\nStreet\",\r\n"  # a quoted newline; emoji
    "+4915100000006,Eve\r\n"  # too few fields
)


@pytest_asyncio.fixture(loop_scope="session")
async def api(mongo_db: AsyncDatabase) -> AsyncIterator[dict[str, Any]]:
    tenants = TenantStore(mongo_db)
    keys = {t: await tenants.create(t, t.title(), utcnow()) for t in ("acme", "other")}
    app = create_app(Settings(mongo_url="mongodb://unused.invalid"), db=mongo_db)
    async with app_client(app) as client:
        yield {"client": client, "db": mongo_db,
               "auth": {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}}


async def _create(api: dict[str, Any], tenant: str = "acme", **body: Any) -> dict[str, Any]:
    payload = {"name": "Spring sale", "from": "AcmeShop", "template": TEMPLATE, **body}
    r = await api["client"].post("/v1/campaigns", json=payload, headers=api["auth"][tenant])
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def _upload(api: dict[str, Any], cid: str, text: str | bytes, tenant: str = "acme") -> httpx.Response:
    data = text.encode() if isinstance(text, str) else text
    return await api["client"].post(f"/v1/campaigns/{cid}/recipients", content=data,
                                    headers={**api["auth"][tenant], "Content-Type": "text/csv"})


async def campaign_messages(db: AsyncDatabase, campaign_id: str) -> dict[str, dict[str, Any]]:
    """The `accepted` events of a campaign's messages, by phone number."""
    return {d["data"]["to"]: d async for d in db["events"].find({"type": "accepted", "data.campaign_id": campaign_id})}


async def test_upload_reports_every_row_and_accepts_the_valid_ones(api: dict[str, Any]) -> None:
    campaign = await _create(api)
    assert campaign["status"] == "draft" and campaign["tags"] == ["first_name", "store_name"]
    r = await _upload(api, campaign["id"], CSV)
    assert r.status_code == 200, r.text
    report = r.json()
    assert (report["rows"], report["accepted"], report["duplicates"], report["invalid"]) == (7, 3, 1, 3)
    assert [(p["row"], p["code"]) for p in report["problems"]] == [
        (4, "invalid_phone"), (5, "missing_tag"), (6, "duplicate"), (9, "field_count")]
    assert "first_name" in report["problems"][1]["reason"] and "row 2" in report["problems"][2]["reason"]

    messages = await campaign_messages(api["db"], campaign["id"])
    assert set(messages) == {"+4915100000001", "+4915100000002", "+4915100000005"}
    assert messages["+4915100000001"]["data"]["text"] == "Hi Anna! Stop by Köln, Hbf today."
    assert messages["+4915100000002"]["data"]["encoding"] == "ucs2"
    assert messages["+4915100000005"]["data"]["text"] == "Hi Zoë 😀! Stop by Main\nStreet today."
    # Handed to the router's topic of the campaign's lane, at dense positions.
    assert {m["topic"] for m in messages.values()} == {f"route~c:{campaign['id']}"}
    assert sorted(m["pos"] for m in messages.values()) == [0, 1, 2]
    assert all(m["tenant_id"] == "acme" and m["data"]["priority"] == 0 and m["seq"] == 1 for m in messages.values())

    got = (await api["client"].get(f"/v1/campaigns/{campaign['id']}", headers=api["auth"]["acme"])).json()
    assert got["recipients"] == {"rows": 7, "accepted": 3, "duplicates": 1, "invalid": 3,
                                 "parts": sum(m["data"]["parts"] for m in messages.values())}
    assert got["encodings"] == {"gsm7": 1, "ucs2": 2}
    assert got["problems_by_code"] == {"invalid_phone": 1, "missing_tag": 1, "duplicate": 1, "field_count": 1}
    page = (await api["client"].get(f"/v1/campaigns/{campaign['id']}/problems?limit=2",
                                    headers=api["auth"]["acme"])).json()
    assert [p["row"] for p in page["problems"]] == [4, 5] and page["next_after_row"] == 5

    # The same file again: nothing new, every row reported.
    again = (await _upload(api, campaign["id"], CSV)).json()
    assert (again["accepted"], again["duplicates"], again["invalid"]) == (0, 4, 3)
    assert len(await campaign_messages(api["db"], campaign["id"])) == 3
    assert (await api["db"]["topics"].find_one({"_id": f"route~c:{campaign['id']}"}))["pos"] == 3


async def test_unusable_files_are_refused_whole(api: dict[str, Any]) -> None:
    campaign = await _create(api)
    cases = [
        ("phone,first_name\n+4915100000001,Anna\n", 422, "invalid_csv_header"),  # no store_name column
        ("name,first_name,store_name\nx,Anna,Bonn\n", 422, "invalid_csv_header"),  # no phone column
        (b"phone,first_name,store_name\n+4915100000001,\xff\xfe,Bonn\n", 422, "invalid_encoding"),
        ("", 422, "invalid_csv"),
    ]
    for body, status, code in cases:
        r = await _upload(api, campaign["id"], body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    r = await api["client"].post(f"/v1/campaigns/{campaign['id']}/recipients", json={"phone": "+49"},
                                 headers=api["auth"]["acme"])
    assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_media_type")
    assert await campaign_messages(api["db"], campaign["id"]) == {}
    got = (await api["client"].get(f"/v1/campaigns/{campaign['id']}", headers=api["auth"]["acme"])).json()
    assert got["recipients"]["rows"] == 0


async def test_bad_definitions_are_4xx(api: dict[str, Any]) -> None:
    client, auth = api["client"], api["auth"]["acme"]
    for template, problem in [("Hi {{first_name", "never closed"), ("Hi {{first name}}", "name"), ("{{}}", "empty")]:
        r = await client.post("/v1/campaigns", json={"name": "x", "from": "Acme", "template": template}, headers=auth)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_template"), template
        assert problem in r.json()["error"]["message"]
    for body in [{"name": "x", "from": "Acme"}, {"name": "x", "from": "not a sender!", "template": "hi"},
                 {"name": "x", "from": "Acme", "template": "hi", "channel": "fax"},
                 {"name": "x", "from": "Acme", "template": "hi", "priority": "urgent"},
                 {"name": "x", "from": "Acme", "template": "hi", "send_at": "2026-01-01T00:00:00"}]:
        r = await client.post("/v1/campaigns", json=body, headers=auth)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error"), body


async def test_status_actions_follow_the_campaign_state_machine(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    campaign = await _create(api)
    cid = campaign["id"]

    async def act(action: str) -> httpx.Response:
        return await client.post(f"/v1/campaigns/{cid}/{action}", headers=auth)

    r = await act("pause")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "invalid_campaign_transition")
    assert (await db["lanes"].find_one({"_id": f"c:{cid}"}))["state"] == "draft"
    assert (await act("start")).json()["status"] == "running"
    assert (await db["lanes"].find_one({"_id": f"c:{cid}"}))["state"] == "active"
    assert (await act("pause")).json()["status"] == "paused"
    assert (await db["lanes"].find_one({"_id": f"c:{cid}"}))["state"] == "paused"
    assert (await act("resume")).json()["status"] == "running"
    assert (await _upload(api, cid, "phone,first_name,store_name\n+4915100000001,A,B\n")).json()["accepted"] == 1
    assert (await act("cancel")).json()["status"] == "canceling"
    r = await _upload(api, cid, "phone,first_name,store_name\n+4915100000002,A,B\n")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "campaign_closed")
    assert (await act("resume")).status_code == 409

    sweeper = CampaignSweeper(CampaignStore(db), utcnow)
    await sweeper.sweep()  # the router has not read the lane yet: the message still waits there
    assert (await client.get(f"/v1/campaigns/{cid}", headers=auth)).json()["status"] == "canceling"
    router = Router(EventStore(db), RouteStore(db), utcnow)
    assert await router.step() == 1  # the lane's consumer cancels what it reads
    await sweeper.sweep()
    assert (await client.get(f"/v1/campaigns/{cid}", headers=auth)).json()["status"] == "canceled"
    [message] = (await campaign_messages(db, cid)).values()
    events = (await client.get(f"/v1/messages/{message['message_id']}/events", headers=auth)).json()["events"]
    assert [e["type"] for e in events] == ["accepted", "canceled"]
    assert events[1]["data"] == {"reason": f"campaign {cid} canceled", "attempted": False}
    assert (await db["lanes"].find_one({"_id": f"c:{cid}"}))["state"] == "canceled"


async def test_a_campaign_scheduled_two_seconds_ahead_is_released_when_due(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    send_at = utcnow() + timedelta(seconds=2)
    campaign = await _create(api, send_at=send_at.isoformat())
    started = (await client.post(f"/v1/campaigns/{campaign['id']}/start", headers=auth)).json()
    assert started["status"] == "scheduled"
    assert (await db["lanes"].find_one({"_id": f"c:{campaign['id']}"}))["state"] == "scheduled"
    sweeper = CampaignSweeper(CampaignStore(db), utcnow)
    assert await sweeper.release() == []  # not yet

    async def released() -> bool:
        await sweeper.release()
        got = (await client.get(f"/v1/campaigns/{campaign['id']}", headers=auth)).json()
        return got["status"] == "running"

    await wait_for(released, timeout_s=10, interval_s=0.1)
    assert utcnow() >= send_at
    assert (await db["lanes"].find_one({"_id": f"c:{campaign['id']}"}))["state"] == "active"


async def test_tenants_see_only_their_campaigns(api: dict[str, Any]) -> None:
    client, auth = api["client"], api["auth"]
    mine = await _create(api, tenant="acme")
    theirs = await _create(api, tenant="other", name="Other sale")
    for method, path in [("GET", ""), ("POST", "/start"), ("POST", "/cancel"), ("GET", "/problems")]:
        r = await client.request(method, f"/v1/campaigns/{theirs['id']}{path}", headers=auth["acme"])
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), path
    r = await _upload(api, theirs["id"], "phone,first_name,store_name\n+4915100000001,A,B\n", tenant="acme")
    assert r.status_code == 404
    listed = (await client.get("/v1/campaigns", headers=auth["acme"])).json()["campaigns"]
    assert mine["id"] in {c["id"] for c in listed} and theirs["id"] not in {c["id"] for c in listed}
    assert (await client.get(f"/v1/campaigns/{theirs['id']}", headers=auth["other"])).status_code == 200
    r = await client.get("/v1/campaigns", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401



async def test_list_filters_by_status_and_refuses_an_unknown_one(api: dict[str, Any]) -> None:
    client, auth = api["client"], api["auth"]["acme"]
    draft = await _create(api, name="draft one")
    running = await _create(api, name="running one")
    await client.post(f"/v1/campaigns/{running['id']}/start", headers=auth)
    listed = (await client.get("/v1/campaigns?status=running", headers=auth)).json()["campaigns"]
    assert running["id"] in {c["id"] for c in listed} and draft["id"] not in {c["id"] for c in listed}
    r = await client.get("/v1/campaigns?status=bogus", headers=auth)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "validation_error")


async def _connector_commit(db: AsyncDatabase, lane: str, decide: dict[str, str], now: datetime) -> None:
    """What the connector commits for the entries of `send:r1~<lane>`: `sent` (into `await:r1`) or a
    temporary failure (`retry` with a timer back to the router's topic, due in 10 s), per message id,
    with its checkpoint moved past them."""
    store = EventStore(db)
    topic = f"send:r1~{lane}"
    count = await store.log.counters([topic])
    entries = await store.log.read(topic, 0, count[topic])
    writes = []
    for entry in entries:
        state = state_of_routed(entry)
        if decide[entry["message_id"]] == "sent":
            doc = event_doc(state, EventType.SENT, now, {"route_id": "r1", "smsc_message_ids": ["x"], "attempt": 1,
                                                         "parts": 1, "price_per_part": 1, "currency": "EUR",
                                                         "expires_at": now + timedelta(hours=1)})
            writes.append(Write(state.message_id, [doc], [await_topic("r1")]))
        else:
            doc = event_doc(state, EventType.RETRY, now, {"route_id": "r1", "attempt": 1, "error_code": 8,
                                                          "error_name": "ESME_RSYSERR",
                                                          "next_at": now + timedelta(seconds=10)})
            writes.append(Write(state.message_id, [doc], timer=timer_doc(
                message_id=state.message_id, tenant_id=state.tenant_id, topic=f"route~{lane}", seq=doc["seq"],
                due_at=now + timedelta(seconds=10), reason="retry", lane=lane, campaign_id=state.campaign_id)))
    await store.log.commit(writes, moves={checkpoint_id("connector", topic): (0, len(entries))})


async def test_cancel_and_completion_wait_until_the_lane_is_idle(api: dict[str, Any]) -> None:
    client, auth, db = api["client"], api["auth"]["acme"], api["db"]
    now = utcnow()
    routes = RouteStore(db)
    await routes.upsert(Route(id="r1", port=1), actor="test", now=now)
    await routes.set_status("r1", RouteStatus.UP, now)
    csv = "phone,first_name,store_name\n+4915100000001,A,B\n+4915100000002,C,D\n"
    sweeper = CampaignSweeper(CampaignStore(db), utcnow)
    router = Router(EventStore(db), routes, utcnow)

    async def route() -> int:
        await router.reader.book.refresh(force=True)  # lanes just started or canceled: no cache lag
        return await router.step()

    async def status(cid: str) -> str:
        await sweeper.sweep()
        return (await client.get(f"/v1/campaigns/{cid}", headers=auth)).json()["status"]  # type: ignore[no-any-return]

    # Completion: running, and every message of the lane handed on.
    done = await _create(api)
    assert (await _upload(api, done["id"], csv)).json()["accepted"] == 2
    await client.post(f"/v1/campaigns/{done['id']}/start", headers=auth)
    assert await status(done["id"]) == "running"
    assert await route() == 2
    assert await status(done["id"]) == "running"  # the connector has not read its topic yet
    ids = {m["message_id"] for m in (await campaign_messages(db, done["id"])).values()}
    await _connector_commit(db, f"c:{done['id']}", dict.fromkeys(ids, "sent"), utcnow())
    assert await status(done["id"]) == "completed"

    # Cancel: a message waiting on a retry timer keeps the campaign canceling until the router has
    # canceled it after the timer's release.
    cid = (await _create(api))["id"]
    assert (await _upload(api, cid, csv)).json()["accepted"] == 2
    await client.post(f"/v1/campaigns/{cid}/start", headers=auth)
    assert await route() == 2
    sent_id, retried_id = sorted(m["message_id"] for m in (await campaign_messages(db, cid)).values())
    await _connector_commit(db, f"c:{cid}", {sent_id: "sent", retried_id: "retry"}, utcnow())
    assert (await client.post(f"/v1/campaigns/{cid}/cancel", headers=auth)).json()["status"] == "canceling"
    assert await status(cid) == "canceling"  # a timer of the lane is left
    clock = utcnow() + timedelta(seconds=11)
    assert await TimerReleaser(Timers(db), LaneBook(db), lambda: clock).run_due() == 1
    assert await status(cid) == "canceling"  # released into the router's topic, not read yet
    assert await route() == 1
    assert await status(cid) == "canceled"
    assert [e.type.value for e in await EventStore(db).load_events(retried_id)] == [
        "accepted", "routed", "retry", "released", "canceled"]
    assert [e.type.value for e in await EventStore(db).load_events(sent_id)] == ["accepted", "routed", "sent"]
