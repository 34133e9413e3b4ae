"""The campaigns API against a real MongoDB: create, upload CSV (validation report), start/pause/
resume/cancel, scheduling, tenant isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.store.campaigns import CampaignStore
from core.store.tenants import TenantStore
from core.workers.campaigns import CampaignSweeper
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

    heads = {h["msg"]["to"]: h async for h in api["db"]["streams"].find({"campaign_id": campaign["id"]})}
    assert set(heads) == {"+4915100000001", "+4915100000002", "+4915100000005"}
    assert heads["+4915100000001"]["msg"]["text"] == "Hi Anna! Stop by Köln, Hbf today."
    assert heads["+4915100000002"]["msg"]["encoding"] == "ucs2"
    assert heads["+4915100000005"]["msg"]["text"] == "Hi Zoë 😀! Stop by Main\nStreet today."
    assert {h["queue"] for h in heads.values()} == {f"route~c:{campaign['id']}"}
    assert all(h["tenant_id"] == "acme" and h["priority"] == 0 for h in heads.values())

    got = (await api["client"].get(f"/v1/campaigns/{campaign['id']}", headers=api["auth"]["acme"])).json()
    assert got["recipients"] == {"rows": 7, "accepted": 3, "duplicates": 1, "invalid": 3,
                                 "parts": sum(h["msg"]["parts"] for h in heads.values())}
    assert got["encodings"] == {"gsm7": 1, "ucs2": 2}
    assert got["problems_by_code"] == {"invalid_phone": 1, "missing_tag": 1, "duplicate": 1, "field_count": 1}
    page = (await api["client"].get(f"/v1/campaigns/{campaign['id']}/problems?limit=2",
                                    headers=api["auth"]["acme"])).json()
    assert [p["row"] for p in page["problems"]] == [4, 5] and page["next_after_row"] == 5

    # The same file again: nothing new, every row reported.
    again = (await _upload(api, campaign["id"], CSV)).json()
    assert (again["accepted"], again["duplicates"], again["invalid"]) == (0, 4, 3)
    assert await api["db"]["streams"].count_documents({"campaign_id": campaign["id"]}) == 3


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
    assert await api["db"]["streams"].count_documents({"campaign_id": campaign["id"]}) == 0
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
    await sweeper.sweep()
    assert (await client.get(f"/v1/campaigns/{cid}", headers=auth)).json()["status"] == "canceled"
    head = await db["streams"].find_one({"campaign_id": cid})
    assert (head["state"], head["queue"]) == ("canceled", None)
    events = (await client.get(f"/v1/messages/{head['_id']}/events", headers=auth)).json()["events"]
    assert [e["type"] for e in events] == ["accepted", "canceled"]


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
