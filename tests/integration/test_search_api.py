"""GET /v1/messages (search) against real servers: reporting rows in PostgreSQL, tenants in MongoDB."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.store.tenants import TenantStore
from projections.projector import apply_events
from projections.schema import migrate
from tests.support.api import app_client

BASE = datetime(2026, 5, 4, 10, 0, tzinfo=UTC)


def message_events(mid: str, tenant: str, i: int, final: str, campaign: str | None = None) -> list[dict[str, Any]]:
    t = BASE + timedelta(minutes=i)
    route = f"r{i % 2}"
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("accepted", {"to": f"+4915100000{i % 3}", "sender": "Acme", "text": "hi", "encoding": "gsm7", "parts": 1,
                      "priority": 10, "validity_s": 3600, "send_at": None, "campaign_id": campaign,
                      "client_ref": None}),
        ("routed", {"route_id": route, "price_per_part": 5, "currency": "EUR", "strategy": "smart"}),
        ("sent", {"route_id": route, "smsc_message_ids": [f"s-{mid}"], "attempt": 1, "parts": 1}),
    ]
    if final == "delivered":
        kinds += [("delivered", {"route_id": route, "smsc_message_id": f"s-{mid}", "stat": "DELIVRD", "err": "000"}),
                  ("billed", {"route_id": route, "parts": 1, "price_per_part": 5, "amount": 5, "currency": "EUR"})]
    return [{"message_id": mid, "seq": seq, "type": kind, "at": t + timedelta(seconds=seq), "tenant_id": tenant,
             "route_id": None if kind == "accepted" else route, "channel": "sms", "v": 1, "data": data}
            for seq, (kind, data) in enumerate(kinds, start=1)]


@pytest_asyncio.fixture(loop_scope="session")
async def setup(mongo_db: AsyncDatabase, pg_url: str, pg_schema: str) -> AsyncIterator[dict[str, Any]]:
    tenants = TenantStore(mongo_db)
    keys = {t: await tenants.create(t, t.title(), utcnow()) for t in ("acme", "other")}
    await migrate(pg_url, pg_schema)
    docs: list[dict[str, Any]] = []
    for i in range(7):  # acme: m00..m06; even ones delivered, m00-m02 in campaign c1
        docs += message_events(f"m{i:02d}", "acme", i, "delivered" if i % 2 == 0 else "sent",
                               campaign="c1" if i < 3 else None)
    for i in range(3):
        docs += message_events(f"o{i:02d}", "other", i, "delivered")
    assert await apply_events(pg_url, pg_schema, docs) == len(docs)
    settings = Settings(mongo_url="mongodb://unused.invalid", pg_url=pg_url, reporting_schema=pg_schema)
    app = create_app(settings, db=mongo_db)
    async with app_client(app) as client:
        yield {"client": client, "auth": {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}}


async def search(setup: dict[str, Any], tenant: str = "acme", **params: Any) -> dict[str, Any]:
    r = await setup["client"].get("/v1/messages", params=params, headers=setup["auth"][tenant])
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def ids(page: dict[str, Any]) -> list[str]:
    return [m["id"] for m in page["messages"]]


async def test_search_newest_first_with_fields(setup: dict[str, Any]) -> None:
    page = await search(setup)
    assert ids(page) == [f"m{i:02d}" for i in range(6, -1, -1)]
    assert page["next"] is None
    m0 = page["messages"][-1]
    assert m0 == {"id": "m00", "status": "delivered", "to": "+49151000000", "route_id": "r0", "parts": 1,
                  "accepted_at": "2026-05-04T10:00:01Z", "delivered_at": "2026-05-04T10:00:04Z", "billed": True,
                  "amount_minor": 5}
    m1 = page["messages"][-2]
    assert (m1["status"], m1["billed"], m1["amount_minor"], m1["delivered_at"]) == ("sent", False, None, None)


async def test_search_filters(setup: dict[str, Any]) -> None:
    assert ids(await search(setup, state="sent")) == ["m05", "m03", "m01"]
    assert ids(await search(setup, state="delivered", campaign_id="c1")) == ["m02", "m00"]
    assert ids(await search(setup, to="+49151000001")) == ["m04", "m01"]
    assert ids(await search(setup, since="2026-05-04T10:02:00Z", until="2026-05-04T12:05:00+02:00")) == [
        "m04", "m03", "m02"]
    assert ids(await search(setup, state="failed")) == []


async def test_keyset_pagination(setup: dict[str, Any]) -> None:
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if after:
            params["after"] = after
        page = await search(setup, **params)
        seen += ids(page)
        pages += 1
        after = page["next"]
        if after is None:
            break
    assert seen == [f"m{i:02d}" for i in range(6, -1, -1)]
    assert pages == 3
    # A cursor combines with filters.
    first = await search(setup, state="delivered", limit=2)
    rest = await search(setup, state="delivered", limit=2, after=first["next"])
    assert ids(first) + ids(rest) == ["m06", "m04", "m02", "m00"]


async def test_tenant_isolation(setup: dict[str, Any]) -> None:
    assert ids(await search(setup, tenant="other")) == ["o02", "o01", "o00"]
    assert ids(await search(setup, tenant="other", to="+49151000001")) == ["o01"]
    # A cursor from one tenant's page does not open another tenant's rows.
    acme = await search(setup, limit=1)
    assert all(i.startswith("o") for i in ids(await search(setup, tenant="other", after=acme["next"])))


async def test_bad_parameters_are_validation_errors(setup: dict[str, Any]) -> None:
    client, auth = setup["client"], setup["auth"]["acme"]
    for params, field in (({"limit": 0}, "query.limit"), ({"limit": 501}, "query.limit"),
                          ({"state": "teleported"}, "query.state"), ({"to": "12345"}, "query.to"),
                          ({"since": "2026-05-04T10:00:00"}, "query.since"),
                          ({"since": "2026-05-04T10:00:00Z", "until": "2026-05-04T09:00:00Z"}, "query.until"),
                          ({"after": "not-a-cursor"}, "query.after")):
        r = await client.get("/v1/messages", params=params, headers=auth)
        assert r.status_code == 422, (params, r.text)
        err = r.json()["error"]
        assert err["code"] == "validation_error" and err["details"][0]["field"] == field, (params, err)
    r = await client.get("/v1/messages")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def test_without_postgres_search_is_unavailable(mongo_db: AsyncDatabase) -> None:
    key = await TenantStore(mongo_db).create("solo", "Solo", utcnow())
    app = create_app(Settings(mongo_url="mongodb://unused.invalid"), db=mongo_db)
    async with app_client(app) as client:
        r = await client.get("/v1/messages", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "reporting_unavailable"
