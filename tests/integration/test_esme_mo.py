"""MO to ESMEs: an MO from an upstream SMSC for a tenant's number reaches the tenant's SMPP account
with `receive_mo` as a plain deliver_sm, exactly once, and waits in the account's topic while no
receiver is bound. The upstream SMSC is tests/integration/test_inbound.py's FakeSmsc (the simulator
cannot originate MO) driven through the real connector; the ESME is smpplib over real TCP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from typer.testing import CliRunner, Result

from api.app import create_app
from core.config import Settings
from core.domain.encoding import encode_text
from core.domain.events import utcnow
from core.domain.routing import BindType
from core.store.eventstore import EventStore
from core.store.numbers import NumberStore
from core.store.smpp_accounts import SmppAccountStore
from ops.cli import app
from tests.integration.esme_client import Esme
from tests.integration.test_esme_server import Running, bound, start_server
from tests.integration.test_inbound import FakeSmsc, make_connector
from tests.support.api import app_client
from tests.support.waiting import wait_for

HANDSET = "4915112345678"
NUMBER = "4930111111"
TOPIC = "dlr:acme1"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeSmsc]:
    smsc = FakeSmsc()
    await smsc.start()
    yield smsc
    await smsc.stop()


@pytest.fixture
async def mo_stack(mongo_db: AsyncDatabase, upstream: FakeSmsc) -> AsyncIterator[Running]:
    """The SMPP server (account acme1 with receive_mo), +4930111111 owned by acme, and the connector
    of the upstream SMSC, bound and running."""
    r = await start_server(mongo_db, max_binds=4, window=50, receive_mo=True)
    await NumberStore(mongo_db).assign(f"+{NUMBER}", "acme", "test", utcnow())
    connector = await make_connector(mongo_db, upstream.port, bind_type=BindType.TRANSMITTER_RECEIVER)
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))

    async def upstream_bound() -> bool:
        return bool(upstream.receivers())
    await wait_for(upstream_bound, timeout_s=20)
    yield r
    stop.set()
    await task
    await r.server.stop()


def mo_received(esme: Esme) -> list[object]:
    with esme.lock:
        return [p for p in esme.delivered if p.esm_class & 0x3C == 0]  # message type bits 0: an MO


async def topic_holds(db: AsyncDatabase, n: int) -> None:
    async def written() -> bool:
        return (await EventStore(db).log.counters([TOPIC]))[TOPIC] == n
    await wait_for(written, timeout_s=20)


async def checkpoint_at(db: AsyncDatabase, n: int) -> None:
    async def moved() -> bool:
        doc = await db["checkpoints"].find_one({"_id": f"esme|{TOPIC}"})
        return doc is not None and doc["pos"] == n
    await wait_for(moved, timeout_s=20)


async def test_a_receiver_gets_each_mo_exactly_once(mo_stack: Running, upstream: FakeSmsc) -> None:
    esme = await bound(mo_stack, "receiver")
    long_text = "مرحبا " * 40  # 240 characters of UCS-2: 480 octets, too long for short_message
    try:
        upstream.send_mo(HANDSET, NUMBER, "YES {ok} €")
        upstream.send_deliver(source=HANDSET, destination=NUMBER, short_message=b"", data_coding=8,
                              message_payload=long_text.encode("utf-16-be"))

        async def both() -> bool:
            return len(mo_received(esme)) >= 2
        await wait_for(both, timeout_s=30)
        await checkpoint_at(mo_stack.db, 2)
        await asyncio.sleep(0.5)  # nothing more may come
        got = mo_received(esme)
    finally:
        esme.close()
    assert len(got) == 2
    short = next(p for p in got if p.data_coding == 0)  # type: ignore[attr-defined]
    assert short.short_message == encode_text("YES {ok} €").parts[0]  # type: ignore[attr-defined]
    assert short.source_addr.decode() == HANDSET and short.source_addr_ton == 1  # type: ignore[attr-defined]
    assert short.destination_addr.decode() == NUMBER and short.esm_class == 0  # type: ignore[attr-defined]
    long = next(p for p in got if p.data_coding == 8)  # type: ignore[attr-defined]
    assert not long.short_message and long.message_payload.decode("utf-16-be") == long_text  # type: ignore[attr-defined]
    inbound = [d async for d in mo_stack.db["events"].find({"type": "inbound"})]
    assert len(inbound) == 2 and {d["topic"] for d in inbound} == {TOPIC}
    assert all(d["notify"] == TOPIC for d in inbound)
    assert mo_stack.server.senders["acme1"].stats["mo_sent"] == 2


async def test_an_mo_waits_while_the_esme_is_away(mo_stack: Running, upstream: FakeSmsc) -> None:
    first = await bound(mo_stack, "receiver")
    first.close()

    async def unbound() -> bool:
        return not mo_stack.server.receivers("acme1")
    await wait_for(unbound, timeout_s=10)
    upstream.send_mo(HANDSET, NUMBER, "are you there?")
    await topic_holds(mo_stack.db, 1)
    await asyncio.sleep(0.3)
    assert mo_received(first) == []
    again = await bound(mo_stack, "transceiver")
    try:
        async def arrived() -> bool:
            return len(mo_received(again)) == 1
        await wait_for(arrived, timeout_s=30)
        await checkpoint_at(mo_stack.db, 1)
        await asyncio.sleep(0.3)
        [mo] = mo_received(again)
    finally:
        again.close()
    assert mo.short_message == encode_text("are you there?").parts[0]  # type: ignore[attr-defined]


async def test_an_unanswered_mo_is_sent_again_and_not_done(mo_stack: Running, upstream: FakeSmsc) -> None:
    silent = await bound(mo_stack, "receiver", answer=False)
    try:
        upstream.send_mo(HANDSET, NUMBER, "STOP")

        async def twice() -> bool:
            return len(mo_received(silent)) >= 2
        await wait_for(twice, timeout_s=30)  # receipt_timeout_s is 0.5 in start_server
    finally:
        silent.close()
    doc = await mo_stack.db["checkpoints"].find_one({"_id": f"esme|{TOPIC}"})
    assert doc is None or doc["pos"] == 0
    assert mo_stack.server.senders["acme1"].stats["mo_redelivered"] >= 1


async def test_mo_goes_to_the_oldest_account_with_receive_mo(mongo_db: AsyncDatabase) -> None:
    await mongo_db["tenants"].insert_many([{"_id": "acme", "name": "Acme", "status": "active"},
                                           {"_id": "globex", "name": "Globex", "status": "active"}])
    accounts = SmppAccountStore(mongo_db)
    await accounts.ensure_indexes()
    app = create_app(Settings(mongo_url="mongodb://unused.invalid", admin_key="adm_mo-test"), db=mongo_db)
    admin = {"Authorization": "Bearer adm_mo-test"}
    async with app_client(app) as client:
        for system_id, tenant, receive in (("plain", "acme", False), ("zeta", "acme", True),
                                           ("alpha", "acme", True), ("gx", "globex", False)):
            r = await client.post("/v1/admin/smpp-accounts", headers=admin, json={
                "system_id": system_id, "tenant_id": tenant, "receive_mo": receive})
            assert r.status_code == 201, r.text
            assert r.json()["account"]["receive_mo"] is receive
            await asyncio.sleep(0.01)  # distinct created_at: "zeta" is older than "alpha"
        assert await accounts.mo_topics(["acme", "globex", "nobody"]) == {"acme": "dlr:zeta"}
        r = await client.patch("/v1/admin/smpp-accounts/zeta", headers=admin, json={"receive_mo": False})
        assert r.status_code == 200 and r.json()["receive_mo"] is False
        r = await client.patch("/v1/admin/smpp-accounts/gx", headers=admin, json={"receive_mo": True})
        assert r.status_code == 200 and r.json()["receive_mo"] is True
        assert await accounts.mo_topics(["acme", "globex"]) == {"acme": "dlr:alpha", "globex": "dlr:gx"}
        bad = await client.patch("/v1/admin/smpp-accounts/gx", headers=admin, json={"receive_mo": "yes"})
        assert bad.status_code == 422
        missing = await client.patch("/v1/admin/smpp-accounts/nobody", headers=admin, json={"receive_mo": True})
        assert missing.status_code == 404


async def test_an_mo_of_a_tenant_without_receive_mo_takes_no_position(mo_stack: Running,
                                                                      upstream: FakeSmsc) -> None:
    await SmppAccountStore(mo_stack.db).update("acme1", {"receive_mo": False}, utcnow())
    seq = upstream.send_mo(HANDSET, NUMBER, "kept in the log only")

    async def acked() -> bool:
        return seq in upstream.acks
    await wait_for(acked, timeout_s=20)
    [doc] = [d async for d in mo_stack.db["events"].find({"type": "inbound"})]
    assert "topic" not in doc and "notify" not in doc
    assert (await EventStore(mo_stack.db).log.counters([TOPIC]))[TOPIC] == 0


async def test_cli_creates_and_updates_receive_mo(mongo_db: AsyncDatabase, mongo_url: str, pg_url: str,
                                                  tmp_path: Path) -> None:
    await mongo_db["tenants"].insert_one({"_id": "acme", "name": "Acme", "status": "active"})
    env = {"MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": mongo_db.name, "MSGCORE_PG_URL": pg_url,
           "MSGCORE_DATA_DIR": str(tmp_path), "MSGCORE_LOG_LEVEL": "WARNING"}

    def cli(*args: str) -> Result:
        return CliRunner().invoke(app, ["smpp-accounts", *args], env=env, catch_exceptions=False)

    created = await asyncio.to_thread(cli, "create", "acme1", "--tenant", "acme", "--receive-mo")
    assert created.exit_code == 0, created.output
    assert "receive_mo=yes" in created.output
    assert await SmppAccountStore(mongo_db).mo_topics(["acme"]) == {"acme": "dlr:acme1"}
    updated = await asyncio.to_thread(cli, "update", "acme1", "--no-receive-mo")
    assert updated.exit_code == 0 and "receive_mo=no" in updated.output
    assert await SmppAccountStore(mongo_db).mo_topics(["acme"]) == {}
    nothing = await asyncio.to_thread(cli, "update", "acme1")
    assert nothing.exit_code == 2
