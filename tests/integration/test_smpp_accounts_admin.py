"""/v1/admin/smpp-accounts: create (password once), list, get, disable, enable, rotate-password."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.store.smpp_accounts import SmppAccountStore, password_matches
from tests.support.api import app_client, assert_error

ADMIN = {"Authorization": "Bearer adm_smpp-test"}


@pytest.fixture
async def client(mongo_db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(mongo_url="mongodb://unused.invalid", admin_key="adm_smpp-test"), db=mongo_db)
    async with app_client(app) as c:
        yield c


async def test_account_lifecycle(client: httpx.AsyncClient, mongo_db: AsyncDatabase) -> None:
    await mongo_db["tenants"].insert_one({"_id": "acme", "name": "Acme", "status": "active"})
    body = {"system_id": "acme1", "tenant_id": "acme", "allowed_ips": ["127.0.0.1/32"], "tps": 50.0}
    r = await client.post("/v1/admin/smpp-accounts", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["account"]["enabled"] and created["account"]["max_binds"] == 4 and len(created["password"]) == 8
    assert "password" not in created["account"]
    stored = await SmppAccountStore(mongo_db).credentials("acme1")
    assert stored is not None and password_matches(created["password"], stored[1])
    assert_error(await client.post("/v1/admin/smpp-accounts", json=body, headers=ADMIN), 409, "smpp_account_exists")
    assert_error(await client.post("/v1/admin/smpp-accounts", json={**body, "system_id": "x", "tenant_id": "nope"},
                                   headers=ADMIN), 404, "tenant_not_found")
    assert_error(await client.post("/v1/admin/smpp-accounts", json={**body, "system_id": "y", "allowed_ips": ["z"]},
                                   headers=ADMIN), 422, "validation_error")
    listed = (await client.get("/v1/admin/smpp-accounts?tenant_id=acme", headers=ADMIN)).json()["accounts"]
    assert [a["system_id"] for a in listed] == ["acme1"]
    r = await client.post("/v1/admin/smpp-accounts/acme1/disable", headers=ADMIN)
    assert r.json()["enabled"] is False
    r = await client.post("/v1/admin/smpp-accounts/acme1/enable", headers=ADMIN)
    assert r.json()["enabled"] is True
    rotated = (await client.post("/v1/admin/smpp-accounts/acme1/rotate-password", headers=ADMIN)).json()
    stored = await SmppAccountStore(mongo_db).credentials("acme1")
    assert stored is not None and password_matches(rotated["password"], stored[1])
    assert not password_matches(created["password"], stored[1])
    assert_error(await client.get("/v1/admin/smpp-accounts/nobody", headers=ADMIN), 404, "smpp_account_not_found")
    assert_error(await client.get("/v1/admin/smpp-accounts"), 401, "unauthorized")
