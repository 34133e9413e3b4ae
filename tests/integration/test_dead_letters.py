"""Dead letters against a real MongoDB-wire server: the router dead-letters, operators list and requeue
(store, admin API, CLI), and requeueing only appends events."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.events import Event, EventType, utcnow
from core.domain.message import MessageState, evolve, next_event
from core.domain.routing import Route, RouteStatus
from core.store.deadletters import list_dead_letters, requeue
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from core.store.timers import Timers, timer_doc
from core.store.topics import Write
from core.workers.router import Router
from core.workers.timers import TimerReleaser
from tests.support.api import app_client, assert_error
from tests.support.factories import accepted

MAX_ATTEMPTS = 3
ADMIN_KEY = "adm_test_0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(loop_scope="session")
async def store(mongo_db: AsyncDatabase) -> EventStore:
    s = EventStore(mongo_db)
    await s.ensure_indexes()
    return s


async def accept(store: EventStore, tenant_id: str, n: int, now: datetime) -> list[str]:
    items = [accepted(tenant_id, now, to=f"+49151{i:07d}") for i in range(n)]
    await store.accept([w for _, w in items])
    return [e.message_id for e, _ in items]


def _cycle(state: MessageState, attempt: int, now: datetime) -> tuple[list[Event], MessageState]:
    """routed -> retry (the SMSC refused it temporarily), as the router and connector would write it."""
    routed = next_event(state, EventType.ROUTED, now, {"route_id": "r1", "price_per_part": 1, "currency": "EUR",
                                                       "strategy": "failover"}, route_id="r1")
    state = evolve(state, routed)
    retry = next_event(state, EventType.RETRY, now, {"route_id": "r1", "attempt": attempt, "error_code": 8,
                                                     "error_name": "ESME_RSYSERR", "next_at": now,
                                                     "exclude_route": True})
    return [routed, retry], evolve(state, retry)


async def exhaust_attempts(store: EventStore, ids: list[str], now: datetime) -> None:
    """Commit MAX_ATTEMPTS failed attempts per message, as the router and connector would (the last
    retry waits on a timer back to the router's topic), then release that timer."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        states = await store.states(ids)
        writes = []
        for mid in ids:
            events, after = _cycle(states[mid], attempt, now)
            timer = timer_doc(message_id=mid, tenant_id=after.tenant_id, topic="route", seq=after.version,
                              due_at=now, reason="retry") if attempt == MAX_ATTEMPTS else None
            writes.append(Write(mid, [e.to_doc() for e in events], timer=timer))
        result = await store.log.commit(writes)
        assert sorted(result.committed) == sorted(ids) and not result.conflicts
    releaser = TimerReleaser(Timers(store.db), LaneBook(store.db), utcnow)
    assert await releaser.run_due() == len(ids)


async def run_router(store: EventStore, db: AsyncDatabase) -> int:
    return await Router(store, RouteStore(db), utcnow, batch_size=100, max_attempts=MAX_ATTEMPTS).step()


async def dead_letter(store: EventStore, db: AsyncDatabase, tenant_id: str, n: int) -> list[str]:
    """Accept `n` messages and let the router dead-letter them once their attempts are spent."""
    now = utcnow()
    ids = await accept(store, tenant_id, n, now)
    await exhaust_attempts(store, ids, now)
    await run_router(store, db)
    states = await store.states(ids)
    assert {s.state for s in states.values()} == {"dead_lettered"}
    return ids


async def event_docs(db: AsyncDatabase, message_id: str) -> list[dict[str, Any]]:
    return [d async for d in db["events"].find({"message_id": message_id}).sort("seq", 1)]


# ---- store ------------------------------------------------------------------------------------------

async def test_router_dead_letters_and_the_store_lists_them(store: EventStore, mongo_db: AsyncDatabase) -> None:
    acme = await dead_letter(store, mongo_db, "acme", 3)
    other = await dead_letter(store, mongo_db, "other", 1)
    live = await accept(store, "acme", 1, utcnow())  # accepted, not dead: never listed

    items = await list_dead_letters(mongo_db, None, 10, None)
    assert [i["id"] for i in items] == sorted(acme + other)
    first = next(i for i in items if i["id"] == acme[0])
    assert first["tenant_id"] == "acme" and first["to"] == "+491510000000"
    assert (first["state"], first["attempts"], first["reason"]) == ("dead_lettered", MAX_ATTEMPTS,
                                                                    f"{MAX_ATTEMPTS} attempts failed")
    last = (await store.load_events(acme[0]))[-1]
    assert last.type == EventType.DEAD_LETTERED and first["at"] == last.at and first["at"].tzinfo is not None

    assert [i["id"] for i in await list_dead_letters(mongo_db, "acme", 10, None)] == sorted(acme)
    assert [i["id"] for i in await list_dead_letters(mongo_db, "nobody", 10, None)] == []
    page1 = await list_dead_letters(mongo_db, None, 2, None)
    page2 = await list_dead_letters(mongo_db, None, 2, page1[-1]["id"])
    page3 = await list_dead_letters(mongo_db, None, 2, page2[-1]["id"])
    assert [i["id"] for i in page1 + page2] == sorted(acme + other) and page3 == []
    assert live[0] not in {i["id"] for i in items}


async def test_requeue_appends_events_and_sends_messages_back_to_the_router(
        store: EventStore, mongo_db: AsyncDatabase) -> None:
    ids = await dead_letter(store, mongo_db, "acme", 3)
    live = await accept(store, "acme", 1, utcnow())
    before = {mid: await event_docs(mongo_db, mid) for mid in ids}
    now = utcnow()

    result = await requeue(store, [ids[0], ids[1], "no-such-id", live[0], ids[0]], "test:ops", "SMSC fixed", now)

    assert (result.requeued, result.not_found, result.not_dead, result.conflicts) == (
        [ids[0], ids[1]], ["no-such-id"], [live[0]], [])
    assert result.states == {live[0]: "accepted"} and not result.ok
    for mid in ids[:2]:
        docs = await event_docs(mongo_db, mid)
        assert docs[:-1] == before[mid]  # the log kept every earlier event as it was
        assert [d["type"] for d in docs[-2:]] == ["dead_lettered", "requeued"]
        assert docs[-1]["seq"] == len(docs) and docs[-1]["at"] == now
        assert docs[-1]["data"] == {"reason": "SMSC fixed", "actor": "test:ops", "previous_state": "dead_lettered"}
        assert docs[-1]["topic"] == "route"  # handed to the router's topic of its lane
        state = await store.state(mid)
        assert state is not None
        assert (state.state, state.attempts, state.excluded_routes, state.version) == ("retry", 0, (), len(docs))
    assert await event_docs(mongo_db, ids[2]) == before[ids[2]]
    assert [i["id"] for i in await list_dead_letters(mongo_db, None, 10, None)] == [ids[2]]

    # The router takes them again: with a route up they are routed, not dead-lettered again.
    routes = RouteStore(mongo_db)
    await routes.upsert(Route(id="r1", port=1), actor="test", now=now)
    await routes.set_status("r1", RouteStatus.UP, now)
    assert await run_router(store, mongo_db) == 3  # the two requeued and the live one
    for mid in ids[:2]:
        last = (await event_docs(mongo_db, mid))[-1]
        assert (last["type"], last["topic"]) == ("routed", "send:r1")
    assert (await store.state(ids[2]) or MessageState("", "", "", 0)).state == "dead_lettered"


async def test_failed_messages_are_requeued_only_when_asked_for(store: EventStore, mongo_db: AsyncDatabase) -> None:
    ids = await accept(store, "acme", 2, utcnow())
    await run_router(store, mongo_db)  # no route at all: failed
    assert {s.state for s in (await store.states(ids)).values()} == {"failed"}
    assert await list_dead_letters(mongo_db, None, 10, None) == []
    listed = await list_dead_letters(mongo_db, None, 10, None, state="failed")
    assert [i["id"] for i in listed] == sorted(ids) and listed[0]["reason"].startswith("no route")

    refused = await requeue(store, ids, "test", "retry", utcnow())
    assert refused.not_dead == ids and refused.requeued == []
    result = await requeue(store, ids, "test", "route added", utcnow(), state="failed")
    assert result.requeued == ids and result.ok
    assert (await event_docs(mongo_db, ids[0]))[-1]["data"]["previous_state"] == "failed"
    states = await store.states(ids)
    assert {(s.state, s.attempts, s.version) for s in states.values()} == {("retry", 0, 3)}
    assert await list_dead_letters(mongo_db, None, 10, None, state="failed") == []  # no longer failed
    with pytest.raises(ValueError):
        await requeue(store, ids, "test", "x", utcnow(), state="delivered")


async def test_requeue_reports_a_message_that_moved_on_and_appends_nothing_for_it(
        store: EventStore, mongo_db: AsyncDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = await dead_letter(store, mongo_db, "acme", 2)
    stale = await store.states(ids)
    # Another operator requeues the first one between our read and our commit.
    assert (await requeue(store, [ids[0]], "someone-else", "first", utcnow())).requeued == [ids[0]]

    async def stale_folds(_: object) -> dict[str, MessageState]:
        return stale

    monkeypatch.setattr(store, "states", stale_folds)
    result = await requeue(store, ids, "test", "second", utcnow())

    assert (result.requeued, result.conflicts) == ([ids[1]], [ids[0]])
    types = [d["type"] for d in await event_docs(mongo_db, ids[0])]
    assert types.count("requeued") == 1 and types[-1] == "requeued"
    monkeypatch.undo()
    assert (await store.state(ids[0]) or MessageState("", "", "", 0)).attempts == 0
    # Nothing of the loser reached a topic: the router's topic holds one entry per requeue committed.
    assert await mongo_db["events"].count_documents({"type": "requeued", "topic": "route"}) == 2


# ---- admin API -------------------------------------------------------------------------------------

async def _client(settings: Settings, db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, db=db)
    async with app_client(app) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def client(mongo_db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(Settings(mongo_url="mongodb://unused.invalid", admin_key=ADMIN_KEY), mongo_db):
        yield c


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def test_admin_api_lists_and_requeues(client: httpx.AsyncClient, store: EventStore,
                                            mongo_db: AsyncDatabase) -> None:
    ids = await dead_letter(store, mongo_db, "acme", 3)
    other = await dead_letter(store, mongo_db, "other", 1)

    r = await client.get("/v1/admin/dead-letters", headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["id"] for d in body["dead_letters"]] == sorted(ids + other) and body["next_after"] is None
    item = next(d for d in body["dead_letters"] if d["id"] == ids[0])
    assert item == {"id": ids[0], "tenant_id": "acme", "to": "+491510000000", "state": "dead_lettered",
                    "attempts": MAX_ATTEMPTS, "route_id": "r1", "reason": f"{MAX_ATTEMPTS} attempts failed",
                    "at": item["at"]}
    assert datetime.fromisoformat(item["at"]).utcoffset() is not None

    r = await client.get("/v1/admin/dead-letters", params={"tenant_id": "acme", "limit": 2}, headers=ADMIN)
    page = r.json()
    assert [d["id"] for d in page["dead_letters"]] == sorted(ids)[:2] and page["next_after"] == sorted(ids)[1]
    r = await client.get("/v1/admin/dead-letters", params={"tenant_id": "acme", "limit": 2,
                                                           "after": page["next_after"]}, headers=ADMIN)
    assert [d["id"] for d in r.json()["dead_letters"]] == sorted(ids)[2:]

    r = await client.post("/v1/admin/dead-letters/requeue", headers=ADMIN,
                          json={"message_ids": [ids[0], "nope"], "reason": "SMSC is back"})
    assert r.status_code == 200, r.text
    assert r.json() == {"requeued": [ids[0]], "not_found": ["nope"], "not_dead": [], "conflicts": [], "states": {}}
    docs = await event_docs(mongo_db, ids[0])
    assert [d["type"] for d in docs[-2:]] == ["dead_lettered", "requeued"]
    assert docs[-1]["data"] == {"reason": "SMSC is back", "actor": "admin-api", "previous_state": "dead_lettered"}
    assert docs[-1]["topic"] == "route"
    state = await store.state(ids[0])
    assert state is not None and (state.state, state.attempts) == ("retry", 0)

    r = await client.post("/v1/admin/dead-letters/requeue", headers=ADMIN,
                          json={"message_ids": [ids[0]], "reason": "again"})
    assert r.json()["not_dead"] == [ids[0]] and r.json()["states"] == {ids[0]: "retry"}


async def test_admin_api_refuses_tenant_keys_and_bad_requests(client: httpx.AsyncClient,
                                                              mongo_db: AsyncDatabase) -> None:
    tenant_key = await TenantStore(mongo_db).create("acme", "Acme", utcnow())
    assert (await client.get("/v1/messages/x", headers={"Authorization": f"Bearer {tenant_key}"})).status_code == 404
    for headers in ({}, {"Authorization": f"Bearer {tenant_key}"}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Basic {ADMIN_KEY}"}):
        r = await client.get("/v1/admin/dead-letters", headers=headers)
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = await client.post("/v1/admin/dead-letters/requeue", headers=headers,
                              json={"message_ids": ["x"], "reason": "r"})
        assert_error(r, 401, "unauthorized")
    assert await mongo_db["events"].count_documents({"type": "requeued"}) == 0

    assert_error(await client.get("/v1/admin/dead-letters", params={"limit": 0}, headers=ADMIN),
                 422, "validation_error")
    assert_error(await client.get("/v1/admin/dead-letters", params={"state": "delivered"}, headers=ADMIN),
                 422, "validation_error")
    for body in ({"message_ids": [], "reason": "r"}, {"message_ids": ["x"]}, {"message_ids": ["x"], "reason": ""},
                 {"message_ids": ["x"], "reason": "r", "extra": 1}, {"message_ids": ["x"] * 1001, "reason": "r"}):
        assert_error(await client.post("/v1/admin/dead-letters/requeue", headers=ADMIN, json=body),
                     422, "validation_error")
    r = await client.post("/v1/admin/dead-letters/requeue", headers={**ADMIN, "Content-Type": "application/json"},
                          content=b"{not json")
    assert_error(r, 400, "invalid_json")


async def test_admin_api_is_disabled_without_an_admin_key(mongo_db: AsyncDatabase) -> None:
    async for client in _client(Settings(mongo_url="mongodb://unused.invalid", admin_key=""), mongo_db):
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
            assert_error(await client.get("/v1/admin/dead-letters", headers=headers), 403, "admin_disabled")
            assert_error(await client.post("/v1/admin/dead-letters/requeue", headers=headers,
                                           json={"message_ids": ["x"], "reason": "r"}), 403, "admin_disabled")


# ---- CLI -------------------------------------------------------------------------------------------

async def cli(mongo_url: str, db: AsyncDatabase, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": db.name,
           "MSGCORE_DATA_DIR": str(tmp_path), "MSGCORE_LOG_LEVEL": "WARNING"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ops.cli", *args, cwd=REPO, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_lists_shows_and_requeues(store: EventStore, mongo_db: AsyncDatabase, mongo_url: str,
                                            tmp_path: Path) -> None:
    ids = await dead_letter(store, mongo_db, "acme", 2)
    other = await dead_letter(store, mongo_db, "other", 1)

    code, out, err = await cli(mongo_url, mongo_db, tmp_path, "dead-letters", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(ids + other)
    by_id = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert by_id[ids[0]][1:5] == ["acme", "+491510000000", "dead_lettered", f"attempts={MAX_ATTEMPTS}"]
    assert by_id[other[0]][1] == "other"
    assert all(line.endswith(f"{MAX_ATTEMPTS} attempts failed") for line in lines)
    code, out, _ = await cli(mongo_url, mongo_db, tmp_path, "dead-letters", "list", "--tenant", "other")
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == other

    code, out, err = await cli(mongo_url, mongo_db, tmp_path, "dead-letters", "show", ids[0])
    assert code == 0, err
    history = out.splitlines()[1:]
    # The last retry waits on a timer (exhaust_attempts); its release hands the message to the router.
    assert [h.split()[2] for h in history] == (["accepted"] + ["routed", "retry"] * MAX_ATTEMPTS
                                               + ["released", "dead_lettered"])
    assert "route=r1" in history[1] and '"reason": "3 attempts failed"' in history[-1]
    code, _, err = await cli(mongo_url, mongo_db, tmp_path, "dead-letters", "show", "no-such-id")
    assert code == 1 and "no-such-id" in err

    code, out, err = await cli(mongo_url, mongo_db, tmp_path, "dead-letters", "requeue", ids[0], "no-such-id",
                               "--reason", "SMSC is back")
    assert code == 1
    assert f"requeued {ids[0]}" in out and "unknown message id(s): no-such-id" in err
    docs = await event_docs(mongo_db, ids[0])
    assert docs[-1]["type"] == "requeued" and docs[-1]["data"]["reason"] == "SMSC is back"
    assert docs[-1]["data"]["actor"].startswith("cli")

    code, out, err = await cli(mongo_url, mongo_db, tmp_path, "dead-letters", "requeue", "--all", "--tenant", "acme")
    assert code == 0, err
    assert out.splitlines()[0] == f"requeued {ids[1]}"
    code, out, _ = await cli(mongo_url, mongo_db, tmp_path, "dead-letters", "list")
    assert code == 0 and [line.split("\t")[0] for line in out.splitlines()] == other

    code, _, err = await cli(mongo_url, mongo_db, tmp_path, "dead-letters", "requeue")
    assert code == 2 and "--all" in err
