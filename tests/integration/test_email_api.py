"""E-mail through `POST /v1/messages` against a real MongoDB-wire server: acceptance, mixed batches,
status and audit trail, and refusals with stable codes that write nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.store.tenants import TenantStore
from tests.support.api import app_client, assert_error

ADMIN_KEY = "mka_email_test"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def mail(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"channel": "email", "to": "bob@example.org", "from": "shop@acme.example",
                            "subject": "Your order", "text": "Thanks for your order"}
    body.update(overrides)
    return body


@pytest_asyncio.fixture(loop_scope="session")
async def client(mongo_db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(mongo_url="mongodb://unused.invalid", email_max_body_bytes=2000, admin_key=ADMIN_KEY)
    async with app_client(create_app(settings, db=mongo_db)) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="session")
async def auth(mongo_db: AsyncDatabase) -> dict[str, str]:
    key = await TenantStore(mongo_db).create("acme", "Acme", utcnow())
    return {"Authorization": f"Bearer {key}"}


async def test_an_email_is_accepted_with_its_fields_in_the_accepted_event(
        client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    body = mail(html="<p>Thanks</p>", from_name="Café Acme", reply_to="help@acme.example", client_ref="o-1",
                to="Bob@Example.ORG")
    r = await client.post("/v1/messages", json=body, headers={**auth, "Idempotency-Key": "mail-1"})
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["status"] == "accepted" and out["to"] == "Bob@Example.ORG" and out["parts"] == 1  # as sent
    assert out["client_ref"] == "o-1"
    again = await client.post("/v1/messages", json=body, headers={**auth, "Idempotency-Key": "mail-1"})
    assert again.json()["id"] == out["id"] and again.headers["Idempotent-Replayed"] == "true"

    events = (await client.get(f"/v1/messages/{out['id']}/events", headers=auth)).json()["events"]
    assert [e["type"] for e in events] == ["accepted"]
    data = events[0]["data"]
    assert data["subject"] == "Your order" and data["html"] == "<p>Thanks</p>" and data["from_name"] == "Café Acme"
    assert data["reply_to"] == "help@acme.example" and data["sender"] == "shop@acme.example"
    assert data["encoding"] == "utf-8" and data["text"] == "Thanks for your order"
    status = (await client.get(f"/v1/messages/{out['id']}", headers=auth)).json()
    assert status["status"] == "accepted" and status["to"] == "Bob@example.org"  # stored normalised


async def test_a_batch_mixes_channels(client: httpx.AsyncClient, auth: dict[str, str],
                                      mongo_db: AsyncDatabase) -> None:
    batch = [{"to": "+4915112345678", "from": "Acme", "text": "code 1234"},
             mail(subject="only html", text=None, html="<b>hi</b>"),
             {"channel": "sms", "to": "+4915112345679", "from": "Acme", "text": "code 5678"}]
    r = await client.post("/v1/messages", json={"messages": batch}, headers=auth)
    assert r.status_code == 202, r.text
    ids = [m["id"] for m in r.json()["messages"]]
    channels = {d["message_id"]: d["channel"] async for d in mongo_db["events"].find({"message_id": {"$in": ids}})}
    assert [channels[i] for i in ids] == ["sms", "email", "sms"]


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    (mail(to="bob@example.org\r\nBcc: all@example.org"), 422, "header_injection", "body.to"),
    (mail(subject="Hi\nBcc: all@example.org"), 422, "header_injection", "body.subject"),
    (mail(from_name="Acme\r\nX-Evil: 1"), 422, "header_injection", "body.from_name"),
    (mail(to="not an address"), 422, "invalid_email", "body.to"),
    (mail(**{"from": "shop@"}), 422, "invalid_email", "body.from"),
    (mail(reply_to="help"), 422, "invalid_email", "body.reply_to"),
    (mail(subject="s" * 999), 422, "subject_too_long", "body.subject"),
    (mail(text="t" * 1500, html="h" * 501), 422, "body_too_large", "body.text"),
    (mail(text=None), 422, "validation_error", None),
    (mail(channel="fax"), 422, "validation_error", None),
    ({"messages": [mail(), mail(to="nobody")]}, 422, "invalid_email", "body.messages.1.to"),
])
async def test_bad_emails_are_refused_with_a_stable_code_and_nothing_written(
        client: httpx.AsyncClient, auth: dict[str, str], mongo_db: AsyncDatabase, body: dict[str, Any], status: int,
        code: str, field: str | None) -> None:
    before = await mongo_db["events"].count_documents({})
    r = await client.post("/v1/messages", json=body, headers=auth)
    error = assert_error(r, status, code)
    if field is not None:
        assert error["details"]["field"] == field
    assert await mongo_db["events"].count_documents({}) == before


async def test_email_routes_through_the_admin_api(client: httpx.AsyncClient, mongo_db: AsyncDatabase) -> None:
    smtp = {"id": "mail-out", "kind": "smtp", "host": "127.0.0.1", "port": 2525, "tls": "starttls",
            "username": "u", "password": "p", "pool": 3, "price_per_part": 2, "priority": 2,
            "breaker": {"max_failures": 3, "cool_down_s": 10}}
    r = await client.post("/v1/admin/routes", headers=ADMIN, json=smtp)
    assert r.status_code == 201, r.text
    route = r.json()["route"]
    assert route["kind"] == "smtp" and route["tls"] == "starttls" and route["pool"] == 3
    assert route["password"] == "***" and route["breaker"]["max_failures"] == 3
    sendgrid = {"id": "sg", "kind": "http", "provider": "sendgrid", "base_url": "http://127.0.0.1:9", "api_key": "k1"}
    r = await client.post("/v1/admin/routes", headers=ADMIN, json=sendgrid)
    assert r.status_code == 201, r.text
    assert r.json()["route"]["api_key"] == "***"
    r = await client.patch("/v1/admin/routes/sg", headers=ADMIN, json={"api_key": "***", "pool": 5})
    assert r.status_code == 200 and r.json()["route"]["pool"] == 5
    assert (await mongo_db["routes"].find_one({"_id": "sg"}))["api_key"] == "k1"  # the echoed mask kept it
    assert_error(await client.post("/v1/admin/routes", headers=ADMIN, json={"id": "bad", "kind": "http"}),
                 422, "validation_error")
    assert_error(await client.post("/v1/admin/routes", headers=ADMIN, json={**smtp, "id": "bad2", "tls": "ssl"}),
                 422, "validation_error")
