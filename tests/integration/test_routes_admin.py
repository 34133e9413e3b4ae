"""Route administration against a real MongoDB-wire server: the admin API (/v1/admin/routes) and the
`msgcore routes` CLI. Every change is validated, recorded (who, when, what) and never shows a password."""

from __future__ import annotations

import asyncio
import getpass
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
from core.domain.routing import Route, RouteStatus
from core.store.routes import RouteStore
from tests.support.api import app_client, assert_error

ADMIN_KEY = "adm_routes_0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
REPO = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(loop_scope="session")
async def client(mongo_db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(mongo_url="mongodb://unused.invalid", admin_key=ADMIN_KEY), db=mongo_db)
    async with app_client(app) as c:
        yield c


NEW = {"id": "carrier-a", "host": "127.0.0.1", "port": 2776, "system_id": "acme", "password": "s3cret!",
       "priority": 1, "weight": 3, "prefixes": ["49", "4915"], "tps": 50, "binds": 2,
       "bind_type": "transmitter_receiver", "window": 10, "price_per_part": 4, "strategy": "smart",
       "system_type": "VMA", "source_ton": 5, "source_npi": 0}


async def test_api_creates_reads_updates_and_records_every_change(client: httpx.AsyncClient,
                                                                  mongo_db: AsyncDatabase) -> None:
    r = await client.post("/v1/admin/routes", headers=ADMIN, json=NEW)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "down"  # no connector reports it yet
    assert body["route"]["password"] == "***" and body["route"]["prefixes"] == ["49", "4915"]
    assert body["route"]["bind_type"] == "transmitter_receiver" and body["route"]["source_ton"] == 5
    stored = await RouteStore(mongo_db).get("carrier-a")
    assert stored is not None and stored.password == "s3cret!" and stored.weight == 3

    assert_error(await client.post("/v1/admin/routes", headers=ADMIN, json=NEW), 409, "route_exists")

    await RouteStore(mongo_db).set_status("carrier-a", RouteStatus.BUSY, utcnow())
    r = await client.get("/v1/admin/routes", headers=ADMIN)
    assert r.status_code == 200
    [listed] = r.json()["routes"]
    assert listed["status"] == "busy" and listed["route"]["password"] == "***"
    assert "s3cret" not in r.text
    r = await client.get("/v1/admin/routes/carrier-a", headers=ADMIN)
    assert r.json()["route"]["port"] == 2776 and r.json()["status"] == "busy"

    r = await client.patch("/v1/admin/routes/carrier-a", headers=ADMIN, json={"port": 2777, "tps": 20})
    assert r.status_code == 200, r.text
    assert r.json()["route"]["port"] == 2777 and r.json()["route"]["weight"] == 3  # others kept
    stored = await RouteStore(mongo_db).get("carrier-a")
    assert stored is not None and stored.password == "s3cret!"  # never echoed, never lost

    # PUT replaces the definition; the password left out (or masked) is kept.
    put = {**NEW, "port": 2778, "password": "***", "prefixes": [""]}
    r = await client.put("/v1/admin/routes/carrier-a", headers=ADMIN, json=put)
    assert r.status_code == 200, r.text
    stored = await RouteStore(mongo_db).get("carrier-a")
    assert stored is not None and stored.port == 2778 and stored.prefixes == ("",) and stored.password == "s3cret!"
    r = await client.patch("/v1/admin/routes/carrier-a", headers=ADMIN, json={"password": "n3w"})
    assert r.status_code == 200 and (await RouteStore(mongo_db).get("carrier-a")).password == "n3w"  # type: ignore[union-attr]

    r = await client.post("/v1/admin/routes/carrier-a/disable", headers=ADMIN)
    assert r.status_code == 200 and r.json()["route"]["enabled"] is False
    assert [x.id for x in await RouteStore(mongo_db).list(include_disabled=False)] == []
    r = await client.post("/v1/admin/routes/carrier-a/enable", headers=ADMIN)
    assert r.status_code == 200 and r.json()["route"]["enabled"] is True

    r = await client.get("/v1/admin/routes/carrier-a/history", headers=ADMIN)
    assert r.status_code == 200
    changes = r.json()["changes"]
    assert [c["actor"] for c in changes] == ["admin-api"] * 6
    assert [c["changed"] for c in changes[1:]] == [["port", "tps"], ["port", "prefixes", "tps"], ["password"],
                                                  ["enabled"], ["enabled"]]
    assert "id" in changes[0]["changed"] and changes[0]["route"]["port"] == 2776
    assert all(c["route"]["password"] == "***" for c in changes) and "s3cret" not in r.text and "n3w" not in r.text
    assert all(c["at"].endswith(("Z", "+00:00")) for c in changes)
    assert await mongo_db["route_changes"].count_documents({"route_id": "carrier-a"}) == 6


async def test_api_refuses_bad_routes_unknown_ids_and_wrong_keys(client: httpx.AsyncClient,
                                                                 mongo_db: AsyncDatabase) -> None:
    for bad in ({**NEW, "port": 70000}, {**NEW, "strategy": "random"}, {**NEW, "id": "Bad Id"},
                {**NEW, "no_such_field": 1}, {**NEW, "binds": 0}, {**NEW, "bind_type": "sideways"},
                {**NEW, "source_ton": 9}):
        assert_error(await client.post("/v1/admin/routes", headers=ADMIN, json=bad), 422, "validation_error")
    assert await RouteStore(mongo_db).list() == []

    assert (await client.post("/v1/admin/routes", headers=ADMIN, json=NEW)).status_code == 201
    err = assert_error(await client.patch("/v1/admin/routes/carrier-a", headers=ADMIN, json={"window": 0}),
                       422, "validation_error")
    assert err["details"][0]["field"] == "window" and "window" in err["message"]
    assert_error(await client.patch("/v1/admin/routes/carrier-a", headers=ADMIN, json={"colour": "red"}),
                 422, "validation_error")
    assert_error(await client.patch("/v1/admin/routes/carrier-a", headers=ADMIN, json={"id": "other"}),
                 422, "validation_error")
    assert_error(await client.put("/v1/admin/routes/carrier-a", headers=ADMIN, json=[1, 2]), 422, "validation_error")
    stored = await RouteStore(mongo_db).get("carrier-a")
    assert stored is not None and stored.window == 10  # nothing half-applied
    assert await mongo_db["route_changes"].count_documents({}) == 1  # refused changes are not recorded

    for method, path in (("GET", "/v1/admin/routes/nope"), ("PATCH", "/v1/admin/routes/nope"),
                         ("PUT", "/v1/admin/routes/nope"), ("POST", "/v1/admin/routes/nope/disable"),
                         ("POST", "/v1/admin/routes/nope/enable"), ("GET", "/v1/admin/routes/nope/history")):
        kwargs: dict[str, Any] = {"json": {"port": 1}} if method in ("PATCH", "PUT") else {}
        assert_error(await client.request(method, path, headers=ADMIN, **kwargs), 404, "not_found")

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert_error(await client.get("/v1/admin/routes", headers=headers), 401, "unauthorized")
        assert_error(await client.post("/v1/admin/routes", headers=headers, json=NEW), 401, "unauthorized")
        assert_error(await client.post("/v1/admin/routes/carrier-a/disable", headers=headers), 401, "unauthorized")
    assert (await RouteStore(mongo_db).get("carrier-a")).enabled  # type: ignore[union-attr]


# ---- CLI ---------------------------------------------------------------------------------------------

async def cli(mongo_url: str, db: AsyncDatabase, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": db.name,
           "MSGCORE_DATA_DIR": str(tmp_path), "MSGCORE_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ops.cli", *args, cwd=REPO, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_adds_updates_disables_shows_and_lists_history(mongo_db: AsyncDatabase, mongo_url: str,
                                                                 tmp_path: Path) -> None:
    run = lambda *args: cli(mongo_url, mongo_db, tmp_path, "routes", *args)  # noqa: E731
    code, out, err = await run("add", "carrier-b", "--host", "127.0.0.1", "--port", "2790", "--system-id", "acme",
                               "--password", "pw-123", "--priority", "2", "--weight", "5", "--prefix", "49",
                               "--prefix", "", "--tps", "30", "--binds", "2", "--window", "8",
                               "--price-per-part", "6", "--strategy", "load_balance", "--bind-type",
                               "transmitter_receiver", "--system-type", "VMA", "--source-ton", "5",
                               "--source-npi", "0")
    assert code == 0, err
    assert "carrier-b added (enabled)" in out
    route = await RouteStore(mongo_db).get("carrier-b")
    assert route == Route(id="carrier-b", port=2790, system_id="acme", password="pw-123", priority=2, weight=5,
                          prefixes=("49", ""), tps=30, binds=2, window=8, price_per_part=6,
                          strategy="load_balance", bind_type="transmitter_receiver", system_type="VMA",
                          source_ton=5, source_npi=0)  # type: ignore[arg-type]

    code, _, err = await run("add", "carrier-b", "--port", "2791")
    assert code == 1 and "route carrier-b exists" in err and "routes update carrier-b" in err
    code, _, err = await run("add", "carrier-c", "--port", "99999")
    assert code == 2 and "invalid route carrier-c" in err and "port" in err
    code, _, err = await run("add", "carrier-c", "--strategy", "random")
    assert code == 2 and "strategy" in err
    code, _, err = await run("add", "Carrier C")
    assert code == 2 and "id" in err
    assert await RouteStore(mongo_db).get("carrier-c") is None

    code, out, err = await run("update", "carrier-b", "--port", "2791", "--tps", "10", "--password", "pw-456")
    assert code == 0, err
    assert "port: 2790 -> 2791" in out and "tps: 30 -> 10" in out and "password: *** -> ***" in out
    assert "pw-" not in out
    code, out, _ = await run("update", "carrier-b", "--port", "2791")
    assert code == 0 and "nothing changed" in out
    code, _, err = await run("update", "carrier-b", "--window", "0")
    assert code == 2 and "window" in err
    code, _, err = await run("update", "carrier-b")
    assert code == 2 and "nothing to change" in err
    code, _, err = await run("update", "nope", "--port", "1")
    assert code == 1 and "no route nope" in err

    code, out, _ = await run("disable", "carrier-b")
    assert code == 0 and "carrier-b disabled" in out
    code, out, _ = await run("disable", "carrier-b")
    assert code == 0 and "already disabled" in out
    assert not (await RouteStore(mongo_db).get("carrier-b")).enabled  # type: ignore[union-attr]
    code, out, _ = await run("list")
    assert code == 0 and "carrier-b\t127.0.0.1:2791" in out and "disabled" in out
    code, out, _ = await run("enable", "carrier-b")
    assert code == 0 and "carrier-b enabled" in out
    code, _, err = await run("enable", "nope")
    assert code == 1 and "no route nope" in err

    code, out, _ = await run("show", "carrier-b")
    assert code == 0
    fields = dict(line.split("\t", 1) for line in out.splitlines())
    assert fields["port"] == "2791" and fields["password"] == "***" and fields["prefixes"] == '49,""'
    assert fields["enabled"] == "True" and fields["status"] == "down" and fields["source_ton"] == "5"
    assert "pw-" not in out
    code, _, err = await run("show", "nope")
    assert code == 1 and "no route nope" in err

    code, out, _ = await run("history", "carrier-b")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 4, out  # add, update, disable, enable (the no-op update and disable are not changes)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = ""
    actor = f"cli:{user}" if user else "cli"
    assert all(line.split("\t")[1] == actor for line in lines)
    assert "created" in lines[0] and "port: 2790 -> 2791" in lines[1] and "enabled: True -> False" in lines[2]
    assert "pw-" not in out
    code, _, err = await run("history", "nope")
    assert code == 1 and "no route nope" in err
