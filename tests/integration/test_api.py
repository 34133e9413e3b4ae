"""The REST API against a real MongoDB-wire server: submission, status, audit trail, errors, idempotency."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.store.tenants import TenantStore
from tests.support.api import app_client, assert_error

ACCEPTED_DATA_KEYS = {"to", "sender", "text", "encoding", "parts", "priority", "validity_s", "send_at",
                      "campaign_id", "client_ref"}


def msg(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"to": "+4915112345678", "from": "Acme", "text": "Your code is 1234"}
    body.update(overrides)
    return body


@pytest.fixture
def settings() -> Settings:
    return Settings(mongo_url="mongodb://unused.invalid", max_parts=10, default_validity_s=86400)


async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(app) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def client(settings: Settings, mongo_db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(create_app(settings, db=mongo_db)):
        yield c


@pytest_asyncio.fixture(loop_scope="session")
async def keys(mongo_db: AsyncDatabase) -> dict[str, str]:
    tenants = TenantStore(mongo_db)
    now = utcnow()
    return {"acme": await tenants.create("acme", "Acme", now), "other": await tenants.create("other", "Other", now)}


@pytest.fixture
def auth(keys: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {keys['acme']}"}


async def counts(db: AsyncDatabase) -> tuple[int, int]:
    """(events, messages handed on): every accepted message is in the router's topic or on a timer."""
    handed = await db["events"].count_documents({"topic": {"$exists": True}}) + await db["timers"].count_documents({})
    return await db["events"].count_documents({}), handed


# ---- accept -----------------------------------------------------------------------------------------

async def test_single_message_is_accepted_into_the_route_topic(client: httpx.AsyncClient, auth: dict[str, str],
                                                               mongo_db: AsyncDatabase) -> None:
    r = await client.post("/v1/messages", json=msg(client_ref="order-17"), headers=auth)

    assert r.status_code == 202, r.text
    body = r.json()
    assert body == {"id": body["id"], "status": "accepted", "to": "+4915112345678", "parts": 1,
                    "client_ref": "order-17"}
    assert len(body["id"]) == 26
    event = await mongo_db["events"].find_one({"message_id": body["id"]})
    assert event is not None
    assert (event["seq"], event["type"], event["tenant_id"]) == (1, "accepted", "acme")
    assert event["at"].tzinfo is not None
    assert set(event["data"]) == ACCEPTED_DATA_KEYS
    assert event["data"] == {"to": "+4915112345678", "sender": "Acme", "text": "Your code is 1234",
                             "encoding": "gsm7", "parts": 1, "priority": 10, "validity_s": 86400,
                             "send_at": None, "campaign_id": None, "client_ref": "order-17"}
    assert (event["topic"], event["pos"]) == ("route", 0)
    assert await mongo_db["topics"].find_one({"_id": "route"}) == {"_id": "route", "pos": 1}
    assert await counts(mongo_db) == (1, 1)


async def test_batch_is_accepted_in_request_order(client: httpx.AsyncClient, auth: dict[str, str],
                                                  mongo_db: AsyncDatabase) -> None:
    send_at = "2031-05-01T12:00:00+02:00"
    batch = [
        msg(to="+4915100000001", client_ref="a"),
        msg(to="+4915100000002", text="Grüße aus Köln 😀", priority="marketing", validity=600),
        msg(to="+4915100000003", text="x" * 161, send_at=send_at, **{"from": "+491700000"}),
    ]
    r = await client.post("/v1/messages", json={"messages": batch}, headers=auth)

    assert r.status_code == 202, r.text
    out = r.json()["messages"]
    assert [m["to"] for m in out] == ["+4915100000001", "+4915100000002", "+4915100000003"]
    assert [m["parts"] for m in out] == [1, 1, 2]
    assert [m["client_ref"] for m in out] == ["a", None, None]
    assert len({m["id"] for m in out}) == 3
    assert await counts(mongo_db) == (3, 3)
    ev = {e["message_id"]: e async for e in mongo_db["events"].find()}
    unicode_msg, scheduled = ev[out[1]["id"]]["data"], ev[out[2]["id"]]["data"]
    assert (unicode_msg["encoding"], unicode_msg["priority"], unicode_msg["validity_s"]) == ("ucs2", 0, 600)
    assert scheduled["send_at"] == datetime(2031, 5, 1, 10, 0, tzinfo=UTC)
    assert scheduled["sender"] == "+491700000"
    # Transactional into the shared lane, marketing into the tenant's lane, the scheduled one waits.
    assert ev[out[0]["id"]]["topic"] == "route" and ev[out[1]["id"]]["topic"] == "route~t:acme"
    assert "topic" not in ev[out[2]["id"]]
    timer = await mongo_db["timers"].find_one({"_id": out[2]["id"]})
    assert timer is not None and timer["due_at"] == datetime(2031, 5, 1, 10, 0, tzinfo=UTC)
    assert (timer["topic"], timer["seq"], timer["reason"]) == ("route", 1, "send_at")


# ---- read -------------------------------------------------------------------------------------------

async def test_status_and_audit_trail_read_back(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    r = await client.post("/v1/messages", json=msg(text="€ " * 100), headers=auth)
    mid = r.json()["id"]

    status = await client.get(f"/v1/messages/{mid}", headers=auth)
    assert status.status_code == 200, status.text
    s = status.json()
    assert (s["id"], s["status"], s["to"], s["from"], s["parts"], s["encoding"]) == (
        mid, "accepted", "+4915112345678", "Acme", 2, "gsm7")
    assert s["billed"] is False and s["price"] is None and s["attempts"] == 0 and s["route_id"] is None
    assert s["created_at"] is not None and set(s["timestamps"]) == {"accepted"}
    assert datetime.fromisoformat(s["created_at"]).utcoffset() == timedelta(0)

    events = await client.get(f"/v1/messages/{mid}/events", headers=auth)
    assert events.status_code == 200, events.text
    trail = events.json()
    assert trail["id"] == mid
    assert [(e["seq"], e["type"]) for e in trail["events"]] == [(1, "accepted")]
    assert trail["events"][0]["data"]["parts"] == 2


async def test_other_tenants_message_is_not_found(client: httpx.AsyncClient, keys: dict[str, str]) -> None:
    r = await client.post("/v1/messages", json=msg(), headers={"Authorization": f"Bearer {keys['acme']}"})
    mid = r.json()["id"]
    other = {"Authorization": f"Bearer {keys['other']}"}

    for path in (f"/v1/messages/{mid}", f"/v1/messages/{mid}/events"):
        assert_error(await client.get(path, headers=other), 404, "not_found")
    for path in ("/v1/messages/01NOSUCHMESSAGE00000000000", "/v1/messages/nope/events", "/v1/messages/" + "x" * 500):
        assert_error(await client.get(path, headers=other), 404, "not_found")


# ---- bad requests: right code, nothing written ------------------------------------------------------

FULLWIDTH_NUMBER = "+" + "".join(chr(0xFF10 + int(d)) for d in "4915112345678")

BAD_BODIES: list[tuple[str, Any, int, str, str | None]] = [
    # (case, body (str = raw), status, code, field path expected in details)
    ("malformed json", '{"to": "+4915112345678", ', 400, "invalid_json", None),
    ("empty body", "", 400, "invalid_json", None),
    ("nan", '{"to": NaN}', 400, "invalid_json", None),
    ("not utf-8", b'{"text": "\xff"}', 400, "invalid_json", None),
    ("not an object", [msg()], 422, "validation_error", "body"),
    ("unknown field", msg(colour="red"), 422, "validation_error", "body.colour"),
    ("invalid number", msg(to="4915112345678"), 422, "validation_error", "body.to"),
    ("too short number", msg(to="+49123"), 422, "validation_error", "body.to"),
    ("full-width digits", msg(to=FULLWIDTH_NUMBER), 422, "validation_error", "body.to"),
    ("number as int", msg(to=4915112345678), 422, "validation_error", "body.to"),
    ("missing to", {"from": "Acme", "text": "hi"}, 422, "validation_error", "body.to"),
    ("sender too long", msg(**{"from": "ABCDEFGHIJKL"}), 422, "validation_error", "body.from"),
    ("empty text", msg(text=""), 422, "validation_error", "body.text"),
    ("blank text", msg(text="  \n "), 422, "validation_error", "body.text"),
    ("lone surrogate", '{"to": "+4915112345678", "from": "Acme", "text": "a\\ud800"}', 422, "validation_error",
     "body.text"),
    ("too many parts", msg(text="x" * (153 * 10 + 1)), 422, "too_many_parts", "body.text"),
    ("too many ucs2 parts", msg(text="ж" * (67 * 10 + 1)), 422, "too_many_parts", "body.text"),
    ("huge text", msg(text="x" * 300_000), 422, "too_many_parts", "body.text"),
    ("naive send_at", msg(send_at="2030-01-01T10:00:00"), 422, "validation_error", "body.send_at"),
    ("send_at out of range", msg(send_at="0001-01-01T00:00:00+05:00"), 422, "validation_error", "body.send_at"),
    ("validity too short", msg(validity=59), 422, "validation_error", "body.validity"),
    ("validity too long", msg(validity=7 * 86400 + 1), 422, "validation_error", "body.validity"),
    ("client_ref too long", msg(client_ref="r" * 65), 422, "validation_error", "body.client_ref"),
    ("bad priority", msg(priority="urgent"), 422, "validation_error", "body.priority"),
    ("empty batch", {"messages": []}, 422, "validation_error", "body.messages"),
    ("bad item in batch", {"messages": [msg(), msg(to="+0")]}, 422, "validation_error", "body.messages.1.to"),
    ("too many parts in batch", {"messages": [msg(), msg(text="y" * 2000)]}, 422, "too_many_parts",
     "body.messages.1.text"),
    ("batch of 1001", {"messages": [msg()] * 1001}, 422, "batch_too_large", None),
    ("batch with extra key", {"messages": [msg()], "x": 1}, 422, "validation_error", "body.x"),
]


@pytest.mark.parametrize(("case", "body", "status", "code", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_bad_request_is_refused_and_writes_nothing(client: httpx.AsyncClient, auth: dict[str, str],
                                                         mongo_db: AsyncDatabase, caplog: pytest.LogCaptureFixture,
                                                         case: str, body: Any, status: int, code: str,
                                                         field: str | None) -> None:
    content = body if isinstance(body, str | bytes) else json.dumps(body)
    r = await client.post("/v1/messages", content=content,
                          headers={**auth, "Content-Type": "application/json", "Idempotency-Key": case})

    error = assert_error(r, status, code)
    if field is not None:
        fields = [d["field"] for d in error["details"]] if isinstance(error["details"], list) \
            else [error["details"]["field"]]
        assert field in fields, error
    assert await counts(mongo_db) == (0, 0)
    assert await mongo_db["idempotency"].count_documents({}) == 0
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]  # never the catch-all


async def test_header_and_media_type_errors(client: httpx.AsyncClient, auth: dict[str, str],
                                            mongo_db: AsyncDatabase) -> None:
    r = await client.post("/v1/messages", json=msg(), headers={**auth, "Idempotency-Key": "k" * 129})
    error = assert_error(r, 422, "validation_error")
    assert error["details"][0]["loc"] == ["header", "Idempotency-Key"]
    r = await client.post("/v1/messages", content=json.dumps(msg()), headers={**auth, "Content-Type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    assert await counts(mongo_db) == (0, 0)


async def test_routing_errors_use_the_error_shape(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    assert_error(await client.get("/v1/nothing", headers=auth), 404, "not_found")
    r = await client.delete("/v1/messages", headers=auth)
    assert_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["allow"]


async def test_payload_too_large(settings: Settings, mongo_db: AsyncDatabase, auth: dict[str, str]) -> None:
    async for client in _client(create_app(settings, db=mongo_db, max_body_bytes=1000)):
        r = await client.post("/v1/messages", json={"messages": [msg()] * 50}, headers=auth)
        assert_error(r, 413, "payload_too_large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit applies while reading
            for _ in range(50):
                yield b" " * 100

        r = await client.post("/v1/messages", content=chunks(), headers=auth)
        assert_error(r, 413, "payload_too_large")
    assert await counts(mongo_db) == (0, 0)


# ---- auth -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer mk_wrong", "Basic YWNtZTpzZWNyZXQ=", "Bearer", "Bearer  "])
async def test_missing_or_wrong_key_is_unauthorized(client: httpx.AsyncClient, keys: dict[str, str],
                                                    mongo_db: AsyncDatabase, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for r in (await client.post("/v1/messages", json=msg(), headers=headers),
              await client.post("/v1/messages", content="{bad json", headers=headers),
              await client.get("/v1/messages/whatever", headers=headers)):
        assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert await counts(mongo_db) == (0, 0)


async def test_successful_key_lookups_are_cached(client: httpx.AsyncClient, auth: dict[str, str],
                                                 mongo_db: AsyncDatabase) -> None:
    assert (await client.post("/v1/messages", json=msg(), headers=auth)).status_code == 202
    await mongo_db["tenants"].delete_many({})  # the cached tenant keeps working for the TTL
    assert (await client.post("/v1/messages", json=msg(), headers=auth)).status_code == 202


# ---- idempotency ------------------------------------------------------------------------------------

async def test_sequential_replay_returns_same_ids(client: httpx.AsyncClient, auth: dict[str, str],
                                                  mongo_db: AsyncDatabase) -> None:
    headers = {**auth, "Idempotency-Key": "order-42 retry"}
    body = {"messages": [msg(client_ref="1"), msg(client_ref="2")]}
    first = await client.post("/v1/messages", json=body, headers=headers)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    # Same JSON with keys in another order and other whitespace is the same request.
    reordered = json.dumps({"messages": [dict(reversed(list(m.items()))) for m in body["messages"]]}, indent=2)
    second = await client.post("/v1/messages", content=reordered,
                               headers={**headers, "Content-Type": "application/json"})

    assert second.status_code == 202, second.text
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert await counts(mongo_db) == (2, 2)


async def test_concurrent_identical_posts_create_one_message_set(client: httpx.AsyncClient, auth: dict[str, str],
                                                                 mongo_db: AsyncDatabase) -> None:
    headers = {**auth, "Idempotency-Key": "burst-1"}
    body = {"messages": [msg(to=f"+49151000000{i:02d}") for i in range(5)]}
    responses = await asyncio.gather(*(client.post("/v1/messages", json=body, headers=headers) for _ in range(10)))

    assert [r.status_code for r in responses] == [202] * 10, [r.text for r in responses]
    assert len({json.dumps(r.json(), sort_keys=True) for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 9
    assert await counts(mongo_db) == (5, 5)
    ids = {m["id"] for m in responses[0].json()["messages"]}
    assert {d["message_id"] async for d in mongo_db["events"].find({"seq": 1}, {"message_id": 1})} == ids


async def test_same_key_with_other_body_is_refused(client: httpx.AsyncClient, keys: dict[str, str],
                                                   mongo_db: AsyncDatabase) -> None:
    acme = {"Authorization": f"Bearer {keys['acme']}", "Idempotency-Key": "k1"}
    assert (await client.post("/v1/messages", json=msg(), headers=acme)).status_code == 202

    r = await client.post("/v1/messages", json=msg(text="something else"), headers=acme)
    assert_error(r, 422, "idempotency_key_reused")
    assert await counts(mongo_db) == (1, 1)

    # Keys are scoped per tenant: another tenant may use the same one.
    other = {"Authorization": f"Bearer {keys['other']}", "Idempotency-Key": "k1"}
    r = await client.post("/v1/messages", json=msg(text="something else"), headers=other)
    assert r.status_code == 202 and "idempotent-replayed" not in r.headers
    assert await counts(mongo_db) == (2, 2)


# ---- health and docs --------------------------------------------------------------------------------

async def test_healthz_needs_no_key(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}  # liveness: no store round trip


async def test_openapi_documents_the_routes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {"/v1/messages", "/v1/messages/{message_id}", "/v1/messages/{message_id}/events", "/healthz"} <= set(
        spec["paths"])
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert (await client.get("/docs")).status_code == 200


# ---- failures that are not the client's -------------------------------------------------------------

async def test_unexpected_error_is_internal_error_in_the_error_shape(settings: Settings, mongo_db: AsyncDatabase,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(settings, db=mongo_db)

    async def boom() -> None:
        raise RuntimeError("bug")

    app.add_api_route("/boom", boom)
    async for client in _client(app):
        assert_error(await client.get("/boom"), 500, "internal_error")
    assert any(rec.levelno == logging.ERROR and rec.exc_info for rec in caplog.records)


async def test_unreachable_mongodb_is_unavailable(settings: Settings) -> None:
    mongo: AsyncMongoClient = AsyncMongoClient("mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200",
                                               tz_aware=True)
    try:
        app = create_app(settings, db=mongo["x"])  # no lifespan: its index creation would fail the same way
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/healthz")).status_code == 200  # alive, though not ready
            assert (await client.get("/readyz")).status_code == 503
            r = await client.post("/v1/messages", json=msg(), headers={"Authorization": "Bearer mk_any"})
            assert_error(r, 503, "unavailable")
            assert r.headers["retry-after"] == "1"
    finally:
        await mongo.close()
