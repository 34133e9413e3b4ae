"""Tenant administration against a real MongoDB-wire server: the admin API (/v1/admin/tenants), the
store underneath (old documents included) and the `msgcore tenants` CLI. Suspension, key rotation and
revocation apply at once in the API process that made them (no waiting for the tenant cache)."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import utcnow
from core.store.tenants import KeyNotFound, TenantStore, hash_key
from tests.support.api import app_client, assert_error

ADMIN_KEY = "adm_tenants_0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
REPO = Path(__file__).resolve().parents[2]
MSG = {"to": "+4915112345678", "from": "Acme", "text": "hello"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest_asyncio.fixture(loop_scope="session")
async def client(mongo_db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(mongo_url="mongodb://unused.invalid", admin_key=ADMIN_KEY), db=mongo_db)
    async with app_client(app) as c:
        yield c


async def create(client: httpx.AsyncClient, tenant_id: str, **plan: Any) -> dict[str, Any]:
    r = await client.post("/v1/admin/tenants", headers=ADMIN, json={"id": tenant_id, "name": tenant_id.title(), **plan})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def submit(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/v1/messages", json=MSG, headers=bearer(key))


# ---- create, read, change ---------------------------------------------------------------------------

async def test_create_list_get_and_patch(client: httpx.AsyncClient, mongo_db: AsyncDatabase) -> None:
    body = await create(client, "acme", priority=20, submit_tps=50)
    tenant, key = body["tenant"], body["api_key"]
    assert key["key"].startswith("mk_") and key["prefix"] == key["key"][:7] and key["id"].startswith("key_")
    assert len(key["id"]) == 12
    assert (tenant["id"], tenant["name"], tenant["status"], tenant["priority"]) == ("acme", "Acme", "active", 20)
    assert (tenant["submit_tps"], tenant["submit_burst"], tenant["effective_burst"]) == (50.0, None, 1000)
    assert [k["id"] for k in tenant["api_keys"]] == [key["id"]] and tenant["api_keys"][0]["active"]
    assert (await submit(client, key["key"])).status_code == 202

    doc = await mongo_db["tenants"].find_one({"_id": "acme"})
    assert doc is not None
    assert {k: doc[k] for k in ("status", "priority", "submit_tps", "submit_burst", "spent_minor")} == {
        "status": "active", "priority": 20, "submit_tps": 50.0, "submit_burst": None, "spent_minor": 0}
    assert doc["api_keys"][0]["hash"] == hash_key(key["key"]) and doc["api_keys"][0]["id"] == key["id"]

    assert_error(await client.post("/v1/admin/tenants", headers=ADMIN, json={"id": "acme", "name": "Again"}),
                 409, "tenant_exists")
    await create(client, "beta")
    r = await client.get("/v1/admin/tenants", headers=ADMIN)
    assert r.status_code == 200 and [t["id"] for t in r.json()["tenants"]] == ["acme", "beta"]
    assert r.json()["tenants"][1]["priority"] == 10 and r.json()["tenants"][1]["submit_tps"] is None
    r = await client.get("/v1/admin/tenants/acme", headers=ADMIN)
    assert r.status_code == 200 and r.json()["priority"] == 20
    assert key["key"] not in r.text and hash_key(key["key"]) not in r.text and '"hash"' not in r.text
    assert_error(await client.get("/v1/admin/tenants/nope", headers=ADMIN), 404, "tenant_not_found")

    r = await client.patch("/v1/admin/tenants/acme", headers=ADMIN,
                           json={"priority": 30, "submit_burst": 200, "name": "Acme Ltd"})
    assert r.status_code == 200, r.text
    assert (r.json()["priority"], r.json()["submit_burst"], r.json()["effective_burst"], r.json()["name"]) == (
        30, 200, 200, "Acme Ltd")
    assert r.json()["submit_tps"] == 50.0  # fields left out are kept
    r = await client.patch("/v1/admin/tenants/acme", headers=ADMIN, json={"submit_tps": None})
    assert r.status_code == 200 and r.json()["submit_tps"] is None and r.json()["effective_burst"] is None
    assert r.json()["submit_burst"] == 200
    r = await client.patch("/v1/admin/tenants/acme", headers=ADMIN, json={})
    assert r.status_code == 200 and r.json()["priority"] == 30
    assert_error(await client.patch("/v1/admin/tenants/nope", headers=ADMIN, json={"priority": 5}),
                 404, "tenant_not_found")


async def test_bad_input_is_422_with_the_field(client: httpx.AsyncClient) -> None:
    for body, field in (({"id": "Acme Corp", "name": "x"}, "body.id"), ({"id": "", "name": "x"}, "body.id"),
                        ({"id": "ok", "name": ""}, "body.name"), ({"id": "ok"}, "body.name"),
                        ({"id": "ok", "name": "x", "priority": 0}, "body.priority"),
                        ({"id": "ok", "name": "x", "priority": 101}, "body.priority"),
                        ({"id": "ok", "name": "x", "priority": True}, "body.priority"),
                        ({"id": "ok", "name": "x", "submit_tps": 0}, "body.submit_tps"),
                        ({"id": "ok", "name": "x", "submit_tps": "fast"}, "body.submit_tps"),
                        ({"id": "ok", "name": "x", "submit_burst": 1.5}, "body.submit_burst"),
                        ({"id": "ok", "name": "x", "plan": "gold"}, "body.plan")):
        error = assert_error(await client.post("/v1/admin/tenants", headers=ADMIN, json=body), 422, "validation_error")
        assert field in [d["field"] for d in error["details"]], (body, error)
    assert_error(await client.post("/v1/admin/tenants", headers={**ADMIN, "Content-Type": "application/json"},
                                   content="{nope"), 400, "invalid_json")
    assert_error(await client.get("/v1/admin/tenants/ok", headers=ADMIN), 404, "tenant_not_found")

    await create(client, "acme")
    for body, field in (({"priority": None}, "body.priority"), ({"name": None}, "body.name"),
                        ({"submit_tps": -1}, "body.submit_tps"), ({"status": "active"}, "body.status")):
        error = assert_error(await client.patch("/v1/admin/tenants/acme", headers=ADMIN, json=body),
                             422, "validation_error")
        assert field in [d["field"] for d in error["details"]], (body, error)
    for body in ({}, {"reason": ""}, {"reason": "   "}, {"reason": "x", "until": "never"}):
        assert_error(await client.post("/v1/admin/tenants/acme/suspend", headers=ADMIN, json=body),
                     422, "validation_error")
    assert_error(await client.post("/v1/admin/tenants/acme/keys", headers=ADMIN, json={"revoke_existing": "maybe"}),
                 422, "validation_error")
    assert_error(await client.get("/v1/admin/tenants/Bad%20Id", headers=ADMIN), 422, "validation_error")
    assert (await client.get("/v1/admin/tenants/acme", headers=ADMIN)).json()["status"] == "active"


async def test_admin_key_is_required(client: httpx.AsyncClient, mongo_db: AsyncDatabase) -> None:
    key = (await create(client, "acme"))["api_key"]["key"]
    calls = [("GET", "/v1/admin/tenants", None), ("POST", "/v1/admin/tenants", {"id": "x", "name": "X"}),
             ("GET", "/v1/admin/tenants/acme", None), ("PATCH", "/v1/admin/tenants/acme", {"priority": 99}),
             ("POST", "/v1/admin/tenants/acme/suspend", {"reason": "x"}),
             ("POST", "/v1/admin/tenants/acme/resume", None),
             ("GET", "/v1/admin/tenants/acme/keys", None), ("POST", "/v1/admin/tenants/acme/keys", None),
             ("DELETE", "/v1/admin/tenants/acme/keys/whatever", None), ("GET", "/v1/admin/tenants/acme/changes", None)]
    for method, path, body in calls:
        for headers in ({}, bearer(key), bearer("wrong")):
            r = await client.request(method, path, json=body, headers=headers)
            assert_error(r, 401, "unauthorized")
    doc = await TenantStore(mongo_db).get("acme")
    assert doc is not None and doc["priority"] == 10 and doc["status"] == "active" and len(doc["api_keys"]) == 1
    assert await TenantStore(mongo_db).get("x") is None

    app = create_app(Settings(mongo_url="mongodb://unused.invalid", admin_key=""), db=mongo_db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        assert_error(await c.get("/v1/admin/tenants", headers=ADMIN), 403, "admin_disabled")


# ---- suspension -------------------------------------------------------------------------------------

async def test_a_suspended_tenant_is_refused_everywhere_until_resumed(client: httpx.AsyncClient,
                                                                        mongo_db: AsyncDatabase) -> None:
    key = (await create(client, "acme"))["api_key"]["key"]
    other = (await create(client, "other"))["api_key"]["key"]
    r = await submit(client, key)
    assert r.status_code == 202
    mid = r.json()["id"]
    events = await mongo_db["events"].count_documents({"tenant_id": "acme"})

    r = await client.post("/v1/admin/tenants/acme/suspend", headers=ADMIN, json={"reason": "unpaid invoice 7"})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["suspend_reason"]) == ("suspended", "unpaid invoice 7")
    suspended_at = r.json()["suspended_at"]
    assert suspended_at is not None

    for r in (await submit(client, key),
              await client.post("/v1/messages", json={"messages": [MSG, MSG]}, headers=bearer(key)),
              await client.get(f"/v1/messages/{mid}", headers=bearer(key)),
              await client.get(f"/v1/messages/{mid}/events", headers=bearer(key)),
              await client.get("/v1/inbound", headers=bearer(key))):
        error = assert_error(r, 403, "tenant_suspended")
        assert error["details"] == {"tenant_id": "acme"} and "unpaid" not in r.text
    assert await mongo_db["events"].count_documents({"tenant_id": "acme"}) == events
    assert (await submit(client, other)).status_code == 202  # only acme is suspended

    r = await client.post("/v1/admin/tenants/acme/suspend", headers=ADMIN, json={"reason": "again"})
    assert r.json()["suspended_at"] == suspended_at and r.json()["suspend_reason"] == "unpaid invoice 7"
    doc = await mongo_db["tenants"].find_one({"_id": "acme"})
    assert doc is not None and doc["status"] == "suspended" and doc["suspend_reason"] == "unpaid invoice 7"

    r = await client.post("/v1/admin/tenants/acme/resume", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "active" and r.json()["suspended_at"] is None
    assert (await submit(client, key)).status_code == 202
    assert (await client.get(f"/v1/messages/{mid}", headers=bearer(key))).status_code == 200
    doc = await mongo_db["tenants"].find_one({"_id": "acme"})
    assert doc is not None and "suspended_at" not in doc and "suspend_reason" not in doc
    r = await client.post("/v1/admin/tenants/acme/resume", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "active"

    assert_error(await client.post("/v1/admin/tenants/nope/suspend", headers=ADMIN, json={"reason": "x"}),
                 404, "tenant_not_found")
    assert_error(await client.post("/v1/admin/tenants/nope/resume", headers=ADMIN), 404, "tenant_not_found")


# ---- keys -------------------------------------------------------------------------------------------

async def test_key_rotation_and_revocation(client: httpx.AsyncClient) -> None:
    first = (await create(client, "acme"))["api_key"]
    assert (await submit(client, first["key"])).status_code == 202  # now cached in the app

    r = await client.post("/v1/admin/tenants/acme/keys", headers=ADMIN)
    assert r.status_code == 201, r.text
    second = r.json()["api_key"]
    assert second["key"] != first["key"] and second["id"] != first["id"]
    assert [(k["id"], k["active"]) for k in r.json()["keys"]] == [(first["id"], True), (second["id"], True)]
    assert (await submit(client, second["key"])).status_code == 202
    assert (await submit(client, first["key"])).status_code == 202  # the old key works until revoked

    r = await client.get("/v1/admin/tenants/acme/keys", headers=ADMIN)
    assert r.status_code == 200 and r.json()["tenant_id"] == "acme"
    assert [set(k) for k in r.json()["keys"]] == [{"id", "prefix", "created_at", "revoked_at", "active"}] * 2
    assert first["key"] not in r.text and second["key"] not in r.text

    r = await client.delete(f"/v1/admin/tenants/acme/keys/{first['id']}", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == first["id"] and not r.json()["active"] and r.json()["revoked_at"] is not None
    error = assert_error(await submit(client, first["key"]), 401, "unauthorized")  # no wait for the cache TTL
    assert "invalid API key" in error["message"]
    assert (await submit(client, second["key"])).status_code == 202
    again = await client.delete(f"/v1/admin/tenants/acme/keys/{first['id']}", headers=ADMIN)
    assert again.status_code == 200 and again.json() == r.json()  # idempotent: first revocation time kept

    assert_error(await client.delete("/v1/admin/tenants/acme/keys/key_nothere", headers=ADMIN), 404, "key_not_found")
    assert_error(await client.delete(f"/v1/admin/tenants/nope/keys/{first['id']}", headers=ADMIN),
                 404, "tenant_not_found")
    assert_error(await client.post("/v1/admin/tenants/nope/keys", headers=ADMIN), 404, "tenant_not_found")
    assert_error(await client.get("/v1/admin/tenants/nope/keys", headers=ADMIN), 404, "tenant_not_found")

    r = await client.post("/v1/admin/tenants/acme/keys", headers=ADMIN, json={"revoke_existing": True})
    assert r.status_code == 201, r.text
    third = r.json()["api_key"]
    assert [k["active"] for k in r.json()["keys"]] == [False, False, True]
    assert_error(await submit(client, second["key"]), 401, "unauthorized")
    assert (await submit(client, third["key"])).status_code == 202


async def test_changes_are_audited(client: httpx.AsyncClient) -> None:
    key_id = (await create(client, "acme", submit_tps=5))["api_key"]["id"]
    await client.patch("/v1/admin/tenants/acme", headers=ADMIN, json={"priority": 40, "submit_tps": 5})
    await client.patch("/v1/admin/tenants/acme", headers=ADMIN, json={"priority": 40})  # no change: not recorded
    await client.post("/v1/admin/tenants/acme/suspend", headers=ADMIN, json={"reason": "fraud check"})
    await client.post("/v1/admin/tenants/acme/resume", headers=ADMIN)
    new_id = (await client.post("/v1/admin/tenants/acme/keys", headers=ADMIN)).json()["api_key"]["id"]
    await client.delete(f"/v1/admin/tenants/acme/keys/{key_id}", headers=ADMIN)
    await client.delete(f"/v1/admin/tenants/acme/keys/{key_id}", headers=ADMIN)  # already revoked: not recorded

    r = await client.get("/v1/admin/tenants/acme/changes", headers=ADMIN)
    assert r.status_code == 200, r.text
    changes = r.json()["changes"]
    assert [c["change"]["action"] for c in changes] == ["created", "updated", "suspended", "resumed", "key_created",
                                                        "key_revoked"]
    assert {c["actor"] for c in changes} == {"admin-api"}
    assert changes[0]["change"] == {"action": "created", "name": "Acme", "priority": 10, "submit_tps": 5.0,
                                    "submit_burst": None, "key_id": key_id}
    assert changes[1]["change"] == {"action": "updated", "before": {"priority": 10}, "after": {"priority": 40}}
    assert changes[2]["change"] == {"action": "suspended", "reason": "fraud check"}
    assert changes[4]["change"]["key_id"] == new_id and changes[4]["change"]["revoked"] == []
    assert changes[5]["change"] == {"action": "key_revoked", "key_id": key_id}
    assert "hash" not in r.text
    r = await client.get("/v1/admin/tenants/acme/changes?limit=2", headers=ADMIN)
    assert [c["change"]["action"] for c in r.json()["changes"]] == ["key_created", "key_revoked"]
    assert_error(await client.get("/v1/admin/tenants/nope/changes", headers=ADMIN), 404, "tenant_not_found")


# ---- the store with documents written before key ids and plans existed ---------------------------------

async def test_old_documents_keep_working(mongo_db: AsyncDatabase, client: httpx.AsyncClient) -> None:
    key = "mk_legacy-key-0123456789abcdefghij"
    now = utcnow()
    await mongo_db["tenants"].insert_one({
        "_id": "old", "name": "Old", "status": "active", "created_at": now, "spent_minor": 12,
        "api_keys": [{"hash": hash_key(key), "prefix": key[:7], "created_at": now, "revoked_at": None}]})
    store = TenantStore(mongo_db)
    tenant = await store.authenticate(key)
    assert tenant is not None
    assert (tenant.id, tenant.priority, tenant.submit_tps, tenant.burst) == ("old", 10, None, None)
    doc = await store.get("old")
    assert doc is not None and (doc["priority"], doc["submit_tps"], doc["submit_burst"]) == (10, None, None)
    assert doc["api_keys"] == [{"id": "mk_lega", "prefix": "mk_lega", "created_at": now, "revoked_at": None}]
    assert (await submit(client, key)).status_code == 202

    r = await client.get("/v1/admin/tenants/old/keys", headers=ADMIN)
    assert [k["id"] for k in r.json()["keys"]] == ["mk_lega"]
    added = await store.add_key("old", utcnow())  # the existing API keeps its shape
    assert added is not None and await store.authenticate(added) is not None
    assert await store.add_key("nope", utcnow()) is None
    stored = await mongo_db["tenants"].find_one({"_id": "old"})
    assert stored is not None and stored["api_keys"][0]["id"] == "mk_lega"  # the id is now stored

    r = await client.delete("/v1/admin/tenants/old/keys/mk_lega", headers=ADMIN)
    assert r.status_code == 200 and not r.json()["active"]
    assert_error(await submit(client, key), 401, "unauthorized")
    assert await store.authenticate(key) is None
    try:
        await store.revoke_key("old", "mk_nope", utcnow())
    except KeyNotFound as e:
        assert e.key_id == "mk_nope"
    else:
        raise AssertionError("revoking an unknown key must raise KeyNotFound")
    assert (await store.get("old") or {}).get("spent_minor") == 12  # untouched by key changes


# ---- CLI ---------------------------------------------------------------------------------------------

async def cli(mongo_url: str, db: AsyncDatabase, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": db.name,
           "MSGCORE_DATA_DIR": str(tmp_path), "MSGCORE_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ops.cli", "tenants", *args, cwd=REPO, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_creates_limits_suspends_and_rotates(mongo_db: AsyncDatabase, mongo_url: str, tmp_path: Path) -> None:
    run = lambda *args: cli(mongo_url, mongo_db, tmp_path, *args)  # noqa: E731
    store = TenantStore(mongo_db)
    code, out, err = await run("create", "Acme Corp", "--submit-tps", "20")
    assert code == 0, err
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert lines["tenant"] == "acme-corp" and lines["api key"].startswith("mk_") and lines["key id"].startswith("key_")
    first = lines["api key"]
    assert await store.authenticate(first) is not None
    code, _, err = await run("create", "Again", "--id", "acme-corp")
    assert code == 2 and "already exists" in err
    code, _, err = await run("create", "Bad", "--id", "Bad Id")
    assert code == 2 and "id" in err
    code, _, err = await run("create", "Bad", "--submit-tps", "fast")
    assert code == 2 and "--submit-tps" in err

    code, out, err = await run("limits", "acme-corp", "--priority", "25", "--submit-burst", "300")
    assert code == 0, err
    assert "priority: 10 -> 25" in out and "submit_burst: None -> 300" in out
    assert "submit_tps=20\tsubmit_burst=300" in out
    code, out, _ = await run("limits", "acme-corp", "--submit-tps", "unlimited", "--submit-burst", "default")
    assert code == 0 and "submit_tps=unlimited" in out
    code, out, _ = await run("limits", "acme-corp", "--priority", "25")
    assert code == 0 and "nothing changed" in out
    code, _, err = await run("limits", "acme-corp", "--priority", "0")
    assert code == 2 and "priority" in err
    code, _, err = await run("limits", "nope", "--priority", "5")
    assert code == 1 and "no tenant nope" in err
    code, out, _ = await run("list")
    assert code == 0 and "acme-corp\tAcme Corp\tactive\tspent_minor=0\tpriority=25\tsubmit_tps=unlimited" in out

    code, out, err = await run("suspend", "acme-corp", "--reason", "unpaid")
    assert code == 0 and "suspended" in out, err
    assert (await store.get("acme-corp") or {})["status"] == "suspended"
    code, _, err = await run("suspend", "acme-corp")
    assert code == 2 and "--reason" in err
    code, out, _ = await run("resume", "acme-corp")
    assert code == 0 and "active" in out
    code, _, err = await run("resume", "nope")
    assert code == 1 and "no tenant nope" in err

    code, out, err = await run("rotate-key", "acme-corp")
    assert code == 0, err
    second = next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("api key: "))
    assert await store.authenticate(second) is not None and await store.authenticate(first) is not None
    code, out, _ = await run("keys", "acme-corp")
    assert code == 0 and len(out.splitlines()) == 2 and out.count("\tactive") == 2 and first not in out
    first_id = out.splitlines()[0].split("\t")[0]
    code, out, err = await run("revoke-key", "acme-corp", first_id)
    assert code == 0 and "revoked" in out, err
    assert await store.authenticate(first) is None
    code, _, err = await run("revoke-key", "acme-corp", "key_nothere")
    assert code == 1 and "no API key key_nothere" in err
    code, out, err = await run("rotate-key", "acme-corp", "--revoke-existing")
    assert code == 0 and "every other key" in out, err
    assert await store.authenticate(second) is None

    code, out, _ = await run("history", "acme-corp")
    actions = [line.split("\t")[2] for line in out.splitlines()]
    assert actions == ["created", "updated", "updated", "suspended", "resumed", "key_created", "key_revoked",
                       "key_created"]
    assert all(line.split("\t")[1].startswith("cli") for line in out.splitlines())
