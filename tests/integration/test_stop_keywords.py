"""Stop and start keywords in MO: STOP over real SMPP (the real connector bound to the SMPP server of
tests/integration/test_inbound.py) puts the handset on the tenant's list, a later message to it is
`rejected` (`opted_out`) and never reaches the SMSC nor the bill; START takes it off and the next
message is sent and delivered. STOP vs STOPALL per sender, tenant keywords and languages, and the
confirmation reply, through the same InboundRecorder the connector runs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from api.app import create_app
from core.config import Settings
from core.domain.consent import parse_settings
from core.domain.encoding import encode_text
from core.domain.events import utcnow
from core.domain.routing import BindType
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.store.suppressions import SuppressionStore
from core.store.tenants import TenantStore
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from smsc.inbound import InboundRecorder
from smsc.session import DeliverSm
from tests.integration.test_inbound import FakeSmsc, acked, bound, make_connector, running
from tests.support.api import app_client
from tests.support.waiting import wait_for

HANDSET = "+4915112345678"
NUMBER, OTHER_NUMBER = "+4930111111", "+4930222222"
_seq = itertools.count(1)


@pytest_asyncio.fixture(loop_scope="session")
async def fake_smsc() -> AsyncIterator[FakeSmsc]:
    smsc = FakeSmsc()
    await smsc.start()
    yield smsc
    await smsc.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def acme(mongo_db: AsyncDatabase) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    key = await TenantStore(mongo_db).create("acme", "Acme", utcnow())
    now = utcnow()
    await mongo_db["numbers"].insert_many([{"_id": n, "tenant_id": "acme", "assigned_at": now, "actor": "test"}
                                           for n in (NUMBER, OTHER_NUMBER)])
    app = create_app(Settings(mongo_url="mongodb://unused.invalid"), db=mongo_db)
    async with app_client(app) as client:
        yield client, {"Authorization": f"Bearer {key}"}


@contextlib.asynccontextmanager
async def router(db: AsyncDatabase) -> AsyncIterator[None]:
    """The router, for messages the api did not route at acceptance (its route table is cached)."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_until_stopped("router", Router(EventStore(db), RouteStore(db), utcnow).step,
                                                 stop, 0.02))
    try:
        yield
    finally:
        stop.set()
        await task


async def submit(client: httpx.AsyncClient, auth: dict[str, str], sender: str, text: str) -> dict[str, Any]:
    r = await client.post("/v1/messages", json={"to": HANDSET, "from": sender, "text": text}, headers=auth)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def types_of(db: AsyncDatabase, message_id: str) -> Callable[[], Awaitable[list[str]]]:
    async def get() -> list[str]:
        return [e["type"] async for e in db["events"].find({"message_id": message_id}).sort("seq")]
    return get


async def test_stop_rejects_start_sends_again_over_real_smpp_mo(
        mongo_db: AsyncDatabase, acme: tuple[httpx.AsyncClient, dict[str, str]], fake_smsc: FakeSmsc) -> None:
    client, auth = acme
    connector = await make_connector(mongo_db, fake_smsc.port, bind_type=BindType.TRANSMITTER_RECEIVER)
    async with running(connector), router(mongo_db):
        await wait_for(bound(fake_smsc), timeout_s=20)
        await wait_for(acked(fake_smsc, [fake_smsc.send_mo(HANDSET.lstrip("+"), NUMBER.lstrip("+"), " Stop ")]),
                       timeout_s=20)
        inbound = await mongo_db["events"].find_one({"type": "inbound"})
        assert inbound is not None and inbound["data"]["text"] == " Stop " and inbound["data"]["consent"] == "stop"
        out = await mongo_db["events"].find_one({"type": "opted_out"})
        assert out is not None and out["data"]["scope"] == NUMBER and out["data"]["address"] == HANDSET
        assert out["data"]["source"] == "keyword" and out["data"]["actor"] == f"mo:{inbound['message_id']}"

        blocked = await submit(client, auth, NUMBER, "blocked")
        assert (blocked["status"], blocked["reason"]) == ("rejected", "opted_out")
        other = await submit(client, auth, OTHER_NUMBER, "another sender of the tenant")
        assert other["status"] == "accepted"  # STOP is for the number it was sent to
        await wait_for(lambda: _has(types_of(mongo_db, other["id"]), "sent"), timeout_s=20)
        assert await types_of(mongo_db, blocked["id"])() == ["accepted", "rejected"]

        await wait_for(acked(fake_smsc, [fake_smsc.send_mo(HANDSET.lstrip("+"), NUMBER.lstrip("+"), "START")]),
                       timeout_s=20)
        again = await submit(client, auth, NUMBER, "welcome back")
        assert again["status"] == "accepted"
        await wait_for(lambda: _has(types_of(mongo_db, again["id"]), "sent"), timeout_s=20)
        sent = await mongo_db["events"].find_one({"message_id": again["id"], "type": "sent"})
        assert sent is not None
        receipt = fake_smsc.send_receipt(sent["data"]["smsc_message_ids"][0], "DELIVRD")
        await wait_for(acked(fake_smsc, [receipt]), timeout_s=20)
        await wait_for(lambda: _has(types_of(mongo_db, again["id"]), "billed"), timeout_s=20)
    assert await types_of(mongo_db, again["id"])() == ["accepted", "routed", "sent", "delivered", "billed"]
    # Two submits reached the SMSC (the other sender's and the one after START), never the blocked one.
    assert len(fake_smsc.submits) == 2
    assert await mongo_db["events"].count_documents({"message_id": blocked["id"], "type": "billed"}) == 0
    entry = [(e["type"], e["seq"]) async for e in mongo_db["events"].find(
        {"message_id": f"sup:acme:sms:{HANDSET}:{NUMBER}"}).sort("seq")]
    assert entry == [("opted_out", 1), ("opted_in", 2)]


async def _has(get: Callable[[], Awaitable[list[str]]], kind: str) -> bool:
    return kind in await get()


def mo(text: str, to: str = NUMBER, source: str = HANDSET) -> DeliverSm:
    """An MO deliver_sm as the connector receives it (GSM-7, or UCS-2 when the text needs it)."""
    encoded = encode_text(text, allow_long=False)
    return DeliverSm(sequence=next(_seq), source=source.lstrip("+"), destination=to.lstrip("+"), esm_class=0,
                     data_coding=encoded.data_coding, short_message=encoded.parts[0], receipted_message_id=None,
                     message_state=None, receipt=None)


async def test_stop_is_per_sender_and_stopall_for_every_sender(
        mongo_db: AsyncDatabase, acme: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    client, auth = acme
    recorder = InboundRecorder(EventStore(mongo_db), "fake")
    await recorder.record([mo("STOP", NUMBER)], utcnow())
    assert (await submit(client, auth, NUMBER, "a"))["status"] == "rejected"
    assert (await submit(client, auth, OTHER_NUMBER, "b"))["status"] == "accepted"
    assert (await submit(client, auth, "AcmeShop", "c"))["status"] == "accepted"

    await recorder.record([mo("stopall", OTHER_NUMBER)], utcnow())
    assert (await submit(client, auth, OTHER_NUMBER, "d"))["status"] == "rejected"
    assert (await submit(client, auth, "AcmeShop", "e"))["status"] == "rejected"  # every sender
    scopes = await SuppressionStore(mongo_db).active_scopes("acme", "sms", HANDSET)
    assert sorted(scopes) == ["*", NUMBER]

    # START to the other number lifts "*" (and that number's entry, which it has none of) but not
    # the STOP sent to the first number.
    await recorder.record([mo("unstop", OTHER_NUMBER)], utcnow())
    assert (await submit(client, auth, "AcmeShop", "f"))["status"] == "accepted"
    assert (await submit(client, auth, NUMBER, "g"))["status"] == "rejected"
    # A repeated STOP changes nothing and writes no event; the MO itself is recorded as always.
    before = await mongo_db["events"].count_documents({"type": "opted_out"})
    result = await recorder.record([mo("STOP", NUMBER), mo("hello STOP", NUMBER)], utcnow())
    assert len(result.committed) == 2
    assert await mongo_db["events"].count_documents({"type": "opted_out"}) == before
    hello = await mongo_db["events"].find_one({"type": "inbound", "data.text": "hello STOP"})
    assert hello is not None and "consent" not in hello["data"]


async def test_tenant_keywords_languages_and_the_confirmation_reply(
        mongo_db: AsyncDatabase, acme: tuple[httpx.AsyncClient, dict[str, str]]) -> None:
    client, auth = acme
    store = SuppressionStore(mongo_db)
    recorder = InboundRecorder(EventStore(mongo_db), "fake")
    await recorder.record([mo("Stopp")], utcnow())  # German is not on yet: an ordinary MO
    assert await store.active_scopes("acme", "sms", HANDSET) == []

    settings = parse_settings({"languages": ["de"], "keywords": {"Tschüss": "stop_all"}, "confirm": True,
                               "confirm_texts": {"stop_all": "Abgemeldet. START zum Anmelden."}})
    await store.put_settings("acme", settings, "test", utcnow())
    await recorder.record([mo("STOPP"), mo("tschüss", OTHER_NUMBER, "+4915199999999")], utcnow())
    assert await store.active_scopes("acme", "sms", HANDSET) == [NUMBER]
    assert await store.active_scopes("acme", "sms", "+4915199999999") == ["*"]
    replies = {d["data"]["to"]: d async for d in mongo_db["events"].find({"type": "accepted"})}
    assert set(replies) == {HANDSET, "+4915199999999"}
    assert replies[HANDSET]["data"]["sender"] == NUMBER and "START" in replies[HANDSET]["data"]["text"]
    assert replies["+4915199999999"]["data"]["text"] == "Abgemeldet. START zum Anmelden."
    assert replies[HANDSET]["topic"] == "route"  # a transactional message like any other: the router takes it
    assert (await submit(client, auth, NUMBER, "x"))["status"] == "rejected"

    # No second confirmation when nothing changed.
    await recorder.record([mo("stop")], utcnow())
    assert await mongo_db["events"].count_documents({"type": "accepted", "data.to": HANDSET}) == 2  # reply + "x"
