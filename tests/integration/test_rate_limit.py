"""Per-tenant submission rate limits at the API (POST /v1/messages), against a real MongoDB-wire
server: over the limit a request gets 429 `rate_limited` with Retry-After and nothing is written;
a batch that can never fit the burst gets 422; other tenants are unaffected; a limit changed through
the admin API applies at once. The limiter's clock is replaced, so no test sleeps."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from tests.support.api import app_client, assert_error

ADMIN_KEY = "adm_ratelimit_0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MSG = {"to": "+4915112345678", "from": "Acme", "text": "hello"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture(loop_scope="session")
async def client(mongo_db: AsyncDatabase, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(mongo_url="mongodb://unused.invalid", admin_key=ADMIN_KEY), db=mongo_db)
    app.state.limiter.clock = clock
    async with app_client(app) as c:
        yield c


async def tenant(client: httpx.AsyncClient, tenant_id: str, **plan: Any) -> dict[str, str]:
    r = await client.post("/v1/admin/tenants", headers=ADMIN, json={"id": tenant_id, "name": tenant_id, **plan})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']['key']}"}


async def send(client: httpx.AsyncClient, auth: dict[str, str], count: int = 1,
               headers: dict[str, str] | None = None) -> httpx.Response:
    body: Any = MSG if count == 1 else {"messages": [MSG] * count}
    return await client.post("/v1/messages", json=body, headers={**auth, **(headers or {})})


async def events_of(db: AsyncDatabase, tenant_id: str) -> int:
    return await db["events"].count_documents({"tenant_id": tenant_id})


async def test_over_the_limit_is_429_with_retry_after_and_writes_nothing(
        client: httpx.AsyncClient, clock: Clock, mongo_db: AsyncDatabase) -> None:
    acme = await tenant(client, "acme", submit_tps=2, submit_burst=5)
    other = await tenant(client, "other", submit_tps=2, submit_burst=5)
    assert (await send(client, acme, 3)).status_code == 202
    assert (await send(client, acme, 2)).status_code == 202
    assert await events_of(mongo_db, "acme") == 5

    r = await send(client, acme)
    error = assert_error(r, 429, "rate_limited")
    assert r.headers["retry-after"] == "1"
    assert error["details"] == {"limit_tps": 2.0, "burst": 5, "retry_after_s": 0.5}
    r = await send(client, acme, 4, headers={"Idempotency-Key": "k1"})
    error = assert_error(r, 429, "rate_limited")
    assert r.headers["retry-after"] == "2" and error["details"]["retry_after_s"] == 2.0  # 4 need 2 s of drain
    assert await events_of(mongo_db, "acme") == 5  # nothing written for refused requests
    assert await mongo_db["idempotency"].count_documents({}) == 0
    assert (await send(client, other, 5)).status_code == 202  # another tenant has its own bucket

    clock.now += 0.5
    assert (await send(client, acme)).status_code == 202
    assert_error(await send(client, acme), 429, "rate_limited")  # the refusals above were not charged
    clock.now += 2
    assert (await send(client, acme, 4, headers={"Idempotency-Key": "k1"})).status_code == 202
    assert await events_of(mongo_db, "acme") == 10


async def test_retry_after_is_whole_seconds_rounded_up(client: httpx.AsyncClient, clock: Clock) -> None:
    slow = await tenant(client, "slow", submit_tps=0.4, submit_burst=1)
    assert (await send(client, slow)).status_code == 202
    clock.now += 0.1
    r = await send(client, slow)
    assert_error(r, 429, "rate_limited")
    assert r.headers["retry-after"] == "3" and r.json()["error"]["details"]["retry_after_s"] == 2.4
    fast = await tenant(client, "fast", submit_tps=1000, submit_burst=2)
    assert (await send(client, fast, 2)).status_code == 202
    r = await send(client, fast)
    assert_error(r, 429, "rate_limited")
    assert r.headers["retry-after"] == "1"  # never 0, though 1 ms would do


async def test_a_batch_over_the_burst_is_422(client: httpx.AsyncClient, mongo_db: AsyncDatabase) -> None:
    acme = await tenant(client, "acme", submit_tps=100, submit_burst=3)
    error = assert_error(await send(client, acme, 4), 422, "batch_exceeds_rate_limit")
    assert error["details"] == {"burst": 3, "count": 4, "limit_tps": 100.0} and "3" in error["message"]
    assert await events_of(mongo_db, "acme") == 0
    assert (await send(client, acme, 3)).status_code == 202  # the 422 charged nothing
    # Validation comes first: an invalid batch is a validation_error, whatever its size.
    r = await client.post("/v1/messages", json={"messages": [{**MSG, "to": "nope"}] * 4}, headers=acme)
    assert_error(r, 422, "validation_error")


async def test_unlimited_tenants_and_the_default_burst(client: httpx.AsyncClient) -> None:
    free = await tenant(client, "free")
    for _ in range(3):
        assert (await send(client, free, 50)).status_code == 202
    r = await client.post("/v1/admin/tenants", headers=ADMIN, json={"id": "plan", "name": "Plan", "submit_tps": 5})
    assert r.json()["tenant"]["effective_burst"] == 1000  # a full batch fits the default burst


async def test_a_limit_changed_through_the_admin_api_applies_at_once(client: httpx.AsyncClient,
                                                                      mongo_db: AsyncDatabase) -> None:
    acme = await tenant(client, "acme", submit_tps=1, submit_burst=2)
    assert (await send(client, acme, 2)).status_code == 202
    assert_error(await send(client, acme), 429, "rate_limited")

    r = await client.patch("/v1/admin/tenants/acme", headers=ADMIN, json={"submit_tps": 1000, "submit_burst": None})
    assert r.status_code == 200 and r.json()["effective_burst"] == 1000
    assert (await send(client, acme, 20)).status_code == 202  # no wait for the tenant cache

    r = await client.patch("/v1/admin/tenants/acme", headers=ADMIN, json={"submit_tps": 1, "submit_burst": 10})
    assert r.status_code == 200
    assert_error(await send(client, acme, 11), 422, "batch_exceeds_rate_limit")
    assert_error(await send(client, acme), 429, "rate_limited")  # 22 charged, 10 the most it may hold
    r = await client.patch("/v1/admin/tenants/acme", headers=ADMIN, json={"submit_tps": None})
    assert r.status_code == 200
    assert (await send(client, acme, 30)).status_code == 202
    assert await events_of(mongo_db, "acme") == 52  # all at one instant of the limiter's clock
