"""/v1/webhooks against the real MongoDB-wire server: registrations (create, list, get, update,
rotate, delete), their 4xx answers (SSRF guard included), deliveries by message and replay."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.store.tenants import TenantStore
from core.store.webhook_queue import NewJob, WebhookQueue
from tests.support.api import app_client, assert_error

Keys = dict[str, dict[str, str]]


@pytest.fixture
async def keys(mongo_db: AsyncDatabase) -> Keys:
    tenants = TenantStore(mongo_db)
    await tenants.ensure_indexes()
    return {t: {"Authorization": f"Bearer {await tenants.create(t, t.title(), utcnow())}"} for t in ("acme", "globex")}


@pytest.fixture
async def client(mongo_db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(mongo_url="unused", webhooks_allow_loopback=True)
    async with app_client(create_app(settings, db=mongo_db)) as c:
        yield c


async def test_register_list_update_rotate_delete(client: httpx.AsyncClient, keys: Keys) -> None:
    acme = keys["acme"]
    r = await client.post("/v1/webhooks", headers=acme, json={"url": "http://127.0.0.1:9/h", "events": ["delivered"]})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["id"].startswith("wh_") and created["secret"].startswith("whsec_")
    assert created["events"] == ["delivered"] and created["enabled"] is True
    hook = created["id"]

    listed = (await client.get("/v1/webhooks", headers=acme)).json()["webhooks"]
    assert [h["id"] for h in listed] == [hook] and "secret" not in listed[0]
    assert (await client.get("/v1/webhooks", headers=keys["globex"])).json()["webhooks"] == []

    r = await client.patch(f"/v1/webhooks/{hook}", headers=acme, json={"events": ["*"], "enabled": False})
    assert r.status_code == 200 and r.json()["events"] == ["*"] and r.json()["enabled"] is False
    r = await client.post(f"/v1/webhooks/{hook}/rotate-secret", headers=acme)
    assert r.status_code == 200 and r.json()["secret"] not in (created["secret"], None)
    assert (await client.get(f"/v1/webhooks/{hook}", headers=acme)).json()["url"] == "http://127.0.0.1:9/h"

    assert_error(await client.get(f"/v1/webhooks/{hook}", headers=keys["globex"]), 404, "not_found")
    assert_error(await client.delete(f"/v1/webhooks/{hook}", headers=keys["globex"]), 404, "not_found")
    assert (await client.delete(f"/v1/webhooks/{hook}", headers=acme)).status_code == 204
    assert_error(await client.delete(f"/v1/webhooks/{hook}", headers=acme), 404, "not_found")


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "http://10.0.0.7/h",
                                 "http://192.168.1.1/h", "http://[fe80::1]/h", "http://0.0.0.0:8080/h",
                                 "http://[::ffff:10.0.0.1]/h"])
async def test_private_link_local_and_metadata_targets_are_refused(client: httpx.AsyncClient, keys: Keys,
                                                                   url: str) -> None:
    r = await client.post("/v1/webhooks", headers=keys["acme"], json={"url": url, "events": ["*"]})
    assert_error(r, 422, "webhook_url_forbidden")


async def test_loopback_is_refused_unless_allowed(mongo_db: AsyncDatabase, keys: Keys) -> None:
    async with app_client(create_app(Settings(mongo_url="unused"), db=mongo_db)) as strict:
        r = await strict.post("/v1/webhooks", headers=keys["acme"],
                              json={"url": "http://localhost:8/h", "events": ["*"]})
        assert_error(r, 422, "webhook_url_forbidden")


async def test_invalid_registrations_are_4xx(client: httpx.AsyncClient, keys: Keys) -> None:
    acme = keys["acme"]
    for body, code in [({"url": "ftp://127.0.0.1/x", "events": ["*"]}, "webhook_url_invalid"),
                       ({"url": "http://user:pw@127.0.0.1/x", "events": ["*"]}, "webhook_url_invalid"),
                       ({"url": "http://no-such-host.invalid/x", "events": ["*"]}, "webhook_url_invalid"),
                       ({"url": "http://127.0.0.1/x", "events": ["bogus"]}, "validation_error"),
                       ({"url": "http://127.0.0.1/x", "events": ["*", "sent"]}, "validation_error"),
                       ({"url": "http://127.0.0.1/x", "events": []}, "validation_error"),
                       ({"url": "http://127.0.0.1/x", "events": ["*"], "extra": 1}, "validation_error")]:
        assert_error(await client.post("/v1/webhooks", headers=acme, json=body), 422, code)
    assert_error(await client.post("/v1/webhooks", json={"url": "http://127.0.0.1/x", "events": ["*"]}),
                 401, "unauthorized")
    assert_error(await client.post("/v1/webhooks", headers={**acme, "Content-Type": "application/json"},
                                   content=b"{nope"), 400, "invalid_json")
    assert_error(await client.patch("/v1/webhooks/wh_missing", headers=acme, json={"enabled": False}), 404, "not_found")
    r = await client.post("/v1/webhooks", headers=acme, json={"url": "http://127.0.0.1/x", "events": ["*"]})
    hook = r.json()["id"]
    assert_error(await client.patch(f"/v1/webhooks/{hook}", headers=acme, json={"url": "http://10.1.1.1/"}),
                 422, "webhook_url_forbidden")
    for _ in range(9):
        await client.post("/v1/webhooks", headers=acme, json={"url": "http://127.0.0.1/x", "events": ["*"]})
    assert_error(await client.post("/v1/webhooks", headers=acme, json={"url": "http://127.0.0.1/y", "events": ["*"]}),
                 422, "too_many_webhooks")
    assert_error(await client.post(f"/v1/webhooks/{hook}/replay?since=not-a-time", headers=acme),
                 422, "validation_error")
    future = (utcnow() + timedelta(hours=1)).isoformat()
    assert_error(await client.post(f"/v1/webhooks/{hook}/replay", params={"since": future}, headers=acme),
                 422, "validation_error")
    assert_error(await client.get("/v1/webhooks/deliveries", headers=acme), 422, "validation_error")


async def test_deliveries_by_message_and_replay(client: httpx.AsyncClient, keys: Keys, mongo_db: AsyncDatabase) -> None:
    acme = keys["acme"]
    hook = (await client.post("/v1/webhooks", headers=acme,
                              json={"url": "http://127.0.0.1:9/h", "events": ["*"]})).json()["id"]
    queue = WebhookQueue(mongo_db)
    before = utcnow() - timedelta(seconds=1)
    events = [{"id": f"M{i}:1", "message_id": f"M{i}", "seq": 1, "type": "accepted", "at": "x", "data": {}}
              for i in range(3)]
    await queue.enqueue([NewJob(hook, "acme", events[:2]), NewJob(hook, "acme", events[2:])], utcnow())
    await queue.deliveries.insert_one({
        "webhook_id": hook, "tenant_id": "acme", "topic": f"hook:{hook}", "range": [0, 2], "epoch": 1, "at": utcnow(),
        "message_ids": ["M0", "M1"], "attempts": [
            {"event_id": "M0:1", "message_id": "M0", "seq": 1, "type": "accepted", "attempt": 1, "status": 503,
             "latency_ms": 3.5, "at": utcnow(), "outcome": "failed", "error": None},
            {"event_id": "M1:1", "message_id": "M1", "seq": 1, "type": "accepted", "attempt": 1, "status": 200,
             "latency_ms": 1.0, "at": utcnow(), "outcome": "delivered", "error": None}]})

    r = await client.get("/v1/webhooks/deliveries", params={"message_id": "M0"}, headers=acme)
    assert r.status_code == 200
    attempts = r.json()["attempts"]
    assert [(a["webhook_id"], a["status"], a["outcome"], a["latency_ms"]) for a in attempts] == [
        (hook, 503, "failed", 3.5)]
    r = await client.get("/v1/webhooks/deliveries", params={"message_id": "M0"}, headers=keys["globex"])
    assert r.json()["attempts"] == []

    r = await client.post(f"/v1/webhooks/{hook}/replay", params={"since": before.isoformat()}, headers=acme)
    assert r.status_code == 200, r.text
    assert (r.json()["events"], r.json()["jobs"], r.json()["more"]) == (3, 1, False)
    replayed = await queue.jobs.find({"topic": f"hook:{hook}"}).sort("pos", 1).to_list(None)
    assert [j["pos"] for j in replayed] == [0, 1, 2] and replayed[2]["events"] == events
    # A second replay copies the originals again, not the copies.
    r = await client.post(f"/v1/webhooks/{hook}/replay", params={"since": before.isoformat()}, headers=acme)
    assert r.json()["events"] == 3
    assert_error(await client.post(f"/v1/webhooks/{hook}/replay", params={"since": before.isoformat()},
                                   headers=keys["globex"]), 404, "not_found")
