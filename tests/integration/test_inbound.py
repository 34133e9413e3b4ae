"""MO (2-way) messages: a deliver_sm that is not a receipt becomes an `inbound` stream of the tenant
owning the destination number, linked to the message that tenant last sent to the handset; the
numbers are assigned through the admin API and the tenant lists its MO with `GET /v1/inbound`.

The simulator cannot originate an MO, so these tests run the real connector against `FakeSmsc`, a
minimal SMPP server built here on smpplib's PDU classes (no simulator internals): it binds any
client, answers submit_sm (or, on demand, with generic_nack), and sends deliver_sm we compose, MO
or receipts, recording each deliver_sm_resp. MongoDB is real.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure
from smpplib import smpp

from api.app import create_app
from core.config import Settings
from core.domain.encoding import encode_text
from core.domain.events import utcnow
from core.domain.routing import BindType, Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from smsc.connector import Connector
from smsc.pdu import ESM_CLASS_RECEIPT, MESSAGE_STATES, SequenceCounter, as_str, build_receipt_text
from tests.support.api import app_client
from tests.support.factories import accepted
from tests.support.waiting import wait_for

ADMIN_KEY = "admin-secret-for-tests"
HANDSET = "+4915112345678"


# ---- a minimal SMSC -----------------------------------------------------------------------------

@dataclass(eq=False)
class FakeConn:
    writer: asyncio.StreamWriter
    mode: str = ""  # "bind_transceiver" | "bind_transmitter" | "bind_receiver"

    @property
    def can_receive(self) -> bool:
        return self.mode in ("bind_transceiver", "bind_receiver")


@dataclass
class FakeSmsc:
    """Binds anyone; submit_sm -> submit_sm_resp with ids f1, f2, ... (or generic_nack while
    `nack_submits` > 0, or nothing while `hold_submits`); `send_deliver` writes a deliver_sm to a
    receiving bind, `send_raw` any bytes; `acks` maps each deliver_sm sequence to the status of its
    deliver_sm_resp."""

    nack_submits: int = 0
    hold_submits: bool = False  # leave submit_sm unanswered
    submits: list[dict[str, Any]] = field(default_factory=list)
    acks: dict[int, int] = field(default_factory=dict)
    conns: list[FakeConn] = field(default_factory=list)
    port: int = 0
    _seq: SequenceCounter = field(default_factory=SequenceCounter)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for c in self.conns:
            c.writer.close()
        await self._server.wait_closed()

    def receivers(self) -> list[FakeConn]:
        return [c for c in self.conns if c.can_receive and not c.writer.is_closing()]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FakeConn(writer)
        self.conns.append(conn)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(16)
                (length,) = struct.unpack(">L", head[:4])
                pdu = smpp.parse_pdu(head + await reader.readexactly(length - 16), client=self._seq,
                                     allow_unknown_opt_params=True)
                if not self._dispatch(conn, pdu):
                    break
        self.conns.remove(conn)
        writer.close()

    def _dispatch(self, conn: FakeConn, pdu: Any) -> bool:
        name = pdu.command
        if name.startswith("bind_") and not name.endswith("_resp"):
            conn.mode = name
            self._respond(conn, f"{name}_resp", pdu.sequence, system_id="fake")
        elif name == "submit_sm":
            self.submits.append({"source_ton": pdu.source_addr_ton, "source_npi": pdu.source_addr_npi,
                                 "dest_ton": pdu.dest_addr_ton, "dest_npi": pdu.dest_addr_npi,
                                 "destination": as_str(pdu.destination_addr), "bind": conn.mode})
            if self.hold_submits:
                pass
            elif self.nack_submits > 0:
                self.nack_submits -= 1
                self._respond(conn, "generic_nack", pdu.sequence, status=0x08)
            else:
                self._respond(conn, "submit_sm_resp", pdu.sequence, message_id=f"f{next(self._ids)}")
        elif name == "deliver_sm_resp":
            self.acks[pdu.sequence] = pdu.status
        elif name == "enquire_link":
            self._respond(conn, "enquire_link_resp", pdu.sequence)
        elif name == "unbind":
            self._respond(conn, "unbind_resp", pdu.sequence)
            return False
        return True

    def _respond(self, conn: FakeConn, name: str, seq: int, status: int = 0, **fields: Any) -> None:
        resp = smpp.make_pdu(name, client=self._seq, status=status, **fields)
        resp.sequence = seq
        conn.writer.write(resp.generate())

    def send_deliver(self, *, source: str, destination: str, short_message: bytes, data_coding: int = 0,
                     esm_class: int = 0, **tlvs: Any) -> int:
        """Write one deliver_sm to the first receiving bind; returns its sequence number."""
        conn = self.receivers()[0]
        pdu = smpp.make_pdu("deliver_sm", client=self._seq, service_type="", source_addr_ton=1, source_addr_npi=1,
                            source_addr=source, dest_addr_ton=1, dest_addr_npi=1, destination_addr=destination,
                            esm_class=esm_class, data_coding=data_coding, short_message=short_message, **tlvs)
        conn.writer.write(pdu.generate())
        return int(pdu.sequence)

    def send_raw(self, data: bytes) -> None:
        for conn in self.conns:
            conn.writer.write(data)

    def send_mo(self, source: str, destination: str, text: str) -> int:
        """An MO of one part: GSM-7 (unpacked septets, data_coding 0) when it fits, else UCS-2 (8)."""
        encoded = encode_text(text, allow_long=False)
        return self.send_deliver(source=source, destination=destination, short_message=encoded.parts[0],
                                 data_coding=encoded.data_coding)

    def send_receipt(self, smsc_id: str, stat: str, err: str = "000") -> int:
        now = utcnow()
        text = build_receipt_text(smsc_id, now, now, stat=stat, err=err)
        return self.send_deliver(source="4915100000000", destination="msgcore", short_message=text.encode(),
                                 esm_class=ESM_CLASS_RECEIPT, receipted_message_id=smsc_id,
                                 message_state=MESSAGE_STATES[stat])


@pytest.fixture
async def fake_smsc() -> AsyncIterator[FakeSmsc]:
    smsc = FakeSmsc()
    await smsc.start()
    yield smsc
    await smsc.stop()


@contextlib.asynccontextmanager
async def running(connector: Connector) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await task


def acked(smsc: FakeSmsc, seqs: list[int]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all(s in smsc.acks for s in seqs)
    return check


def bound(smsc: FakeSmsc) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(smsc.receivers())
    return check


async def make_connector(mongo_db: AsyncDatabase, port: int, **route: Any) -> Connector:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    r = Route(id="fake", port=port, **route)
    await routes.upsert(r, actor="test", now=utcnow())
    await routes.set_status(r.id, RouteStatus.UP, utcnow())
    return Connector(store, routes, r, utcnow, owner="test-connector")


# ---- API fixtures -------------------------------------------------------------------------------

@pytest_asyncio.fixture(loop_scope="session")
async def api(mongo_db: AsyncDatabase) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(mongo_url="mongodb://unused.invalid", admin_key=ADMIN_KEY)
    app = create_app(settings, db=mongo_db)
    async with app_client(app) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def keys(mongo_db: AsyncDatabase) -> dict[str, str]:
    tenants = TenantStore(mongo_db)
    now = utcnow()
    return {"acme": await tenants.create("acme", "Acme", now), "globex": await tenants.create("globex", "Globex", now)}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


ADMIN = bearer(ADMIN_KEY)


# ---- tests ----------------------------------------------------------------------------------------

async def test_numbers_admin_assigns_lists_and_unassigns(api: httpx.AsyncClient, keys: dict[str, str]) -> None:
    r = await api.put("/v1/admin/numbers/+4930111111", json={"tenant_id": "acme"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["tenant_id"] == "acme" and r.json()["previous_tenant_id"] is None
    assert (await api.put("/v1/admin/numbers/%2B4930222222", json={"tenant_id": "globex"},
                          headers=ADMIN)).status_code == 200
    assert (await api.put("/v1/admin/numbers/12345", json={"tenant_id": "acme"}, headers=ADMIN)).status_code == 200
    moved = await api.put("/v1/admin/numbers/12345", json={"tenant_id": "globex"}, headers=ADMIN)
    assert moved.json()["previous_tenant_id"] == "acme"

    page = (await api.get("/v1/admin/numbers", headers=ADMIN)).json()
    assert [(n["number"], n["tenant_id"]) for n in page["numbers"]] == [
        ("+4930111111", "acme"), ("+4930222222", "globex"), ("12345", "globex")]
    first = (await api.get("/v1/admin/numbers?limit=2", headers=ADMIN)).json()
    assert len(first["numbers"]) == 2 and first["next_after"] == "+4930222222"
    rest = (await api.get("/v1/admin/numbers", params={"limit": 2, "after": first["next_after"]},
                          headers=ADMIN)).json()
    assert [n["number"] for n in rest["numbers"]] == ["12345"] and rest["next_after"] is None
    only = (await api.get("/v1/admin/numbers?tenant_id=globex", headers=ADMIN)).json()
    assert {n["number"] for n in only["numbers"]} == {"+4930222222", "12345"}

    assert (await api.delete("/v1/admin/numbers/12345", headers=ADMIN)).status_code == 204
    assert (await api.delete("/v1/admin/numbers/12345", headers=ADMIN)).json()["error"]["code"] == "not_found"
    unknown = await api.put("/v1/admin/numbers/+4930333333", json={"tenant_id": "nobody"}, headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    bad = await api.put("/v1/admin/numbers/not-a-number", json={"tenant_id": "acme"}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
    assert (await api.get("/v1/admin/numbers", headers=bearer(keys["acme"]))).status_code == 401


async def test_mo_goes_to_the_tenant_owning_the_number_with_reply_to(
        mongo_db: AsyncDatabase, api: httpx.AsyncClient, keys: dict[str, str], fake_smsc: FakeSmsc) -> None:
    for number, tenant in (("+4930111111", "acme"), ("+4930222222", "globex")):
        r = await api.put(f"/v1/admin/numbers/{number}", json={"tenant_id": tenant}, headers=ADMIN)
        assert r.status_code == 200
    store = EventStore(mongo_db)
    base = utcnow()
    older = accepted("acme", base - timedelta(minutes=5), to=HANDSET, text="older")
    newest = accepted("acme", base - timedelta(minutes=1), to=HANDSET, text="newest")
    other_handset = accepted("acme", base, to="+4915199999999", text="someone else")
    globex_sent = accepted("globex", base, to=HANDSET, text="globex's, newer than acme's")
    await store.accept([w for _, w in (older, newest, other_handset, globex_sent)])

    connector = await make_connector(mongo_db, fake_smsc.port, bind_type=BindType.TRANSMITTER_RECEIVER)
    async with running(connector):
        await wait_for(bound(fake_smsc), timeout_s=20)
        seqs = [fake_smsc.send_mo(HANDSET.lstrip("+"), "4930111111", "YES please {ok}"),
                fake_smsc.send_mo(HANDSET.lstrip("+"), "4930222222", "نعم شكرا 😀"),
                fake_smsc.send_mo("4917700000000", "4930111111", "hello from a stranger"),
                fake_smsc.send_mo(HANDSET.lstrip("+"), "4930999999", "to nobody's number")]
        await wait_for(acked(fake_smsc, seqs), timeout_s=20)
    assert all(fake_smsc.acks[s] == 0 for s in seqs)
    assert connector.stats["mo"] == 3 and connector.stats["mo_unassigned"] == 1

    inbound = [d async for d in mongo_db["events"].find({"type": "inbound"}).sort("message_id")]
    by_text = {d["data"]["text"]: d for d in inbound}
    yes = by_text["YES please {ok}"]
    assert yes["tenant_id"] == "acme" and yes["seq"] == 1 and yes["route_id"] == "fake"
    assert yes["data"]["from"] == HANDSET and yes["data"]["to"] == "+4930111111"
    assert yes["data"]["reply_to"] == newest[0].message_id  # the newest acme sent to that handset
    arabic = by_text["نعم شكرا 😀"]
    assert arabic["tenant_id"] == "globex" and arabic["data"]["reply_to"] == globex_sent[0].message_id
    stranger = by_text["hello from a stranger"]
    assert stranger["tenant_id"] == "acme" and "reply_to" not in stranger["data"]
    state = await store.state(yes["message_id"])
    assert state is not None and state.state == "inbound"
    assert "topic" not in yes  # an MO hands no work to any stage

    orphans = [d async for d in mongo_db["orphan_receipts"].find({"kind": "mo_unassigned"})]
    assert len(orphans) == 1 and orphans[0]["destination"] == "4930999999"
    assert orphans[0]["text"] == "to nobody's number"

    # The tenant's API: its own MO only, oldest first, keyset pages.
    acme = (await api.get("/v1/inbound", headers=bearer(keys["acme"]))).json()
    assert [i["text"] for i in acme["inbound"]] == ["YES please {ok}", "hello from a stranger"]
    assert acme["inbound"][0]["from"] == HANDSET and acme["inbound"][0]["reply_to"] == newest[0].message_id
    page1 = (await api.get("/v1/inbound?limit=1", headers=bearer(keys["acme"]))).json()
    assert len(page1["inbound"]) == 1 and page1["next_after"] == page1["inbound"][0]["id"]
    page2 = (await api.get(f"/v1/inbound?limit=1&after={page1['next_after']}", headers=bearer(keys["acme"]))).json()
    assert [i["text"] for i in page2["inbound"]] == ["hello from a stranger"]
    globex = (await api.get("/v1/inbound", headers=bearer(keys["globex"]))).json()
    assert [i["text"] for i in globex["inbound"]] == ["نعم شكرا 😀"]
    later = (await api.get("/v1/inbound", params={"since": (utcnow() + timedelta(minutes=1)).isoformat()},
                           headers=bearer(keys["acme"]))).json()
    assert later["inbound"] == []
    status = await api.get(f"/v1/messages/{yes['message_id']}", headers=bearer(keys["acme"]))
    assert status.status_code == 200 and status.json()["status"] == "inbound"
    assert (await api.get(f"/v1/messages/{yes['message_id']}", headers=bearer(keys["globex"]))).status_code == 404
    assert (await api.get("/v1/inbound")).status_code == 401


async def test_mo_is_acknowledged_only_after_it_is_committed(mongo_db: AsyncDatabase, fake_smsc: FakeSmsc) -> None:
    """While the store refuses writes, the MO stays unacknowledged; once it accepts, the MO is
    committed once and then acknowledged."""
    await mongo_db["numbers"].insert_one({"_id": "+4930111111", "tenant_id": "acme", "assigned_at": utcnow(),
                                          "actor": "test"})
    connector = await make_connector(mongo_db, fake_smsc.port)
    real_record = connector.inbound.record
    failures = {"left": 3}
    acks_seen_while_failing: list[dict[int, int]] = []

    async def flaky_record(pdus: Any, now: Any) -> Any:
        if failures["left"] > 0:
            failures["left"] -= 1
            acks_seen_while_failing.append(dict(fake_smsc.acks))
            raise ConnectionFailure("store away (test)")
        return await real_record(pdus, now)

    connector.inbound.record = flaky_record  # type: ignore[method-assign]
    async with running(connector):
        await wait_for(bound(fake_smsc), timeout_s=20)
        seq = fake_smsc.send_mo("4915112345678", "4930111111", "STOP")
        await wait_for(acked(fake_smsc, [seq]), timeout_s=30)
    assert failures["left"] == 0 and len(acks_seen_while_failing) == 3
    assert all(seq not in seen for seen in acks_seen_while_failing)
    assert await mongo_db["events"].count_documents({"type": "inbound"}) == 1

