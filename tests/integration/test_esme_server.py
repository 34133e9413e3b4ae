"""The SMPP server for ESMEs over real TCP, with smpplib as the ESME: binds, limits, malformed PDUs,
submit_sm into the log (group commit), long messages, query_sm and cancel_sm."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from smpplib import exceptions

from core.domain.encoding import encode_text, make_udh
from core.domain.events import utcnow
from core.store.eventstore import EventStore
from core.store.smpp_accounts import SmppAccountStore
from smsc.esme_server.server import EsmeServer, EsmeServerConfig
from tests.integration.esme_client import Esme
from tests.support.waiting import wait_for

GSM_TEXT = encode_text("hello @ {x} €").parts[0]  # GSM 03.38 septets, with extension characters


@dataclass
class Running:
    server: EsmeServer
    db: AsyncDatabase
    password: str
    system_id: str = "acme1"

    def esme(self, password: str | None = None, system_id: str | None = None, **kw: object) -> Esme:
        return Esme(self.server.port, system_id or self.system_id, password or self.password, **kw)  # type: ignore[arg-type]


async def start_server(db: AsyncDatabase, **account: object) -> Running:
    await EventStore(db).ensure_indexes()
    await db["tenants"].insert_one({"_id": "acme", "name": "Acme", "status": "active", "spent_minor": 0})
    _, password = await SmppAccountStore(db).create("acme1", "acme", utcnow(), **account)  # type: ignore[arg-type]
    server = EsmeServer(db, EsmeServerConfig(port=0, receipt_timeout_s=0.5, commit_window_s=0.005), utcnow)
    await server.start()
    return Running(server, db, password)


@pytest.fixture
async def running(mongo_db: AsyncDatabase) -> AsyncIterator[Running]:
    r = await start_server(mongo_db, max_binds=2, window=50)
    yield r
    await r.server.stop()


async def bound(r: Running, mode: str = "transceiver", **kw: object) -> Esme:
    esme = r.esme(**kw)
    await asyncio.to_thread(esme.bind, mode)
    return esme


async def resp_of(esme: Esme, seq: int) -> object:
    await wait_for(lambda: _has(esme, seq), timeout_s=30, interval_s=0.01)
    return esme.resps[seq]


async def _has(esme: Esme, seq: int) -> bool:
    return seq in esme.resps


@pytest.mark.parametrize("mode", ["transmitter", "receiver", "transceiver"])
async def test_each_bind_type_binds(running: Running, mode: str) -> None:
    esme = await bound(running, mode)
    try:
        [session] = running.server.binds["acme1"]
        assert session.mode == {"transmitter": "tx", "receiver": "rx", "transceiver": "trx"}[mode]
    finally:
        esme.close()


async def _bind_status(esme: Esme) -> int:
    try:
        await asyncio.to_thread(esme.bind)
    except exceptions.PDUError as e:
        return int(e.args[1])
    finally:
        esme.close()
    return 0


async def test_wrong_credentials_and_too_many_binds_are_refused(running: Running) -> None:
    assert await _bind_status(running.esme(password="wrong")) == 0x0E  # ESME_RINVPASWD
    assert await _bind_status(running.esme(system_id="nobody")) == 0x0F  # ESME_RINVSYSID
    first, second = await bound(running), await bound(running)
    try:
        assert await _bind_status(running.esme()) == 0x0D  # ESME_RBINDFAIL: max_binds is 2
    finally:
        first.close()
        second.close()


async def test_a_disabled_account_or_suspended_tenant_cannot_bind(running: Running) -> None:
    await running.db["tenants"].update_one({"_id": "acme"}, {"$set": {"status": "suspended"}})
    assert await _bind_status(running.esme()) == 0x0D
    await running.db["tenants"].update_one({"_id": "acme"}, {"$set": {"status": "active"}})
    await SmppAccountStore(running.db).set_enabled("acme1", False, utcnow())
    assert await _bind_status(running.esme()) == 0x0D


async def test_a_malformed_pdu_gets_generic_nack_and_the_session_goes_on(running: Running) -> None:
    esme = await bound(running)
    try:
        # A submit_sm whose body stops in the middle of its fields, then an unknown command.
        esme.send_raw(struct.pack(">LLLL", 20, 0x04, 0, 777) + b"\x00\x05\x00a")
        esme.send_raw(struct.pack(">LLLL", 16, 0x0000_0999, 0, 778))
        await wait_for(lambda: _nacks(esme, 2), timeout_s=10, interval_s=0.01)
        assert sorted(p.sequence for p in esme.other if p.command == "generic_nack") == [777, 778]
        seq = esme.submit("4915112345678", b"still here")
        assert (await resp_of(esme, seq)).status == 0  # type: ignore[attr-defined]
    finally:
        esme.close()


async def _nacks(esme: Esme, n: int) -> bool:
    return sum(1 for p in esme.other if p.command == "generic_nack") >= n


async def test_submits_are_accepted_with_group_commit(running: Running) -> None:
    esme = await bound(running)
    try:
        seqs = await asyncio.to_thread(lambda: [esme.submit(f"49151{i:07d}", GSM_TEXT) for i in range(40)])
        resps = [await resp_of(esme, s) for s in seqs]
    finally:
        esme.close()
    ids = [r.message_id.decode() for r in resps]  # type: ignore[attr-defined]
    assert all(r.status == 0 for r in resps) and len(set(ids)) == 40  # type: ignore[attr-defined]
    committer = running.server.committer
    assert committer.accepted == 40 and committer.transactions < 40  # submits shared transactions
    state = await EventStore(running.db).state(ids[0])
    assert state is not None and state.to == "+491510000000" and state.text == "hello @ {x} €"
    assert state.notify == "dlr:acme1" and state.sender == "acme"


async def test_invalid_submits_get_their_smpp_status(running: Running) -> None:
    esme = await bound(running)
    try:
        cases = {
            esme.submit("12", b"x"): 0x0B,  # ESME_RINVDSTADR
            esme.submit("4915112345678", b"\x01\x02", data_coding=4): 0x104,  # ESME_RINVDCS: binary
            esme.submit("4915112345678", b"x", data_coding=0x33): 0x104,
            esme.submit("4915112345678", b"   "): 0x01,  # ESME_RINVMSGLEN
            esme.submit("4915112345678", b"x", source_addr="not a sender!!"): 0x0A,  # ESME_RINVSRCADR
        }
        for seq, status in cases.items():
            assert (await resp_of(esme, seq)).status == status, seq  # type: ignore[attr-defined]
    finally:
        esme.close()


async def test_ucs2_udh_and_sar_long_messages_are_joined(running: Running) -> None:
    esme = await bound(running)
    text = "Привет, мир! " * 12  # UCS-2, 156 characters: three parts
    raw = text.encode("utf-16-be")
    chunks = [raw[i:i + 134] for i in range(0, len(raw), 134)]
    try:
        udh = [esme.submit("4915112345678", make_udh(7, len(chunks), i + 1) + c, data_coding=8, esm_class=0x40)
               for i, c in enumerate(chunks)]
        sar = [esme.submit("4915112345679", c, data_coding=8, sar_msg_ref_num=300, sar_total_segments=len(chunks),
                           sar_segment_seqnum=i + 1) for i, c in enumerate(chunks)]
        udh_ids = {(await resp_of(esme, s)).message_id for s in udh}  # type: ignore[attr-defined]
        sar_ids = {(await resp_of(esme, s)).message_id for s in sar}  # type: ignore[attr-defined]
    finally:
        esme.close()
    assert len(udh_ids) == 1 and len(sar_ids) == 1  # every part answered with its message's id
    for mid, to in ((udh_ids.pop(), "+4915112345678"), (sar_ids.pop(), "+4915112345679")):
        state = await EventStore(running.db).state(mid.decode())
        assert state is not None and state.text == text and state.to == to and state.encoding == "ucs2"
        assert state.parts == 3


async def test_throughput_over_the_account_limit_is_throttled(mongo_db: AsyncDatabase) -> None:
    r = await start_server(mongo_db, tps=2.0)
    esme = await bound(r)
    try:
        seqs = await asyncio.to_thread(lambda: [esme.submit("4915112345678", b"hi") for _ in range(10)])
        statuses = [(await resp_of(esme, s)).status for s in seqs]  # type: ignore[attr-defined]
    finally:
        esme.close()
        await r.server.stop()
    assert statuses.count(0) >= 1 and statuses.count(0x58) >= 1  # ESME_RTHROTTLED
    assert set(statuses) <= {0, 0x58}


async def test_query_sm_and_cancel_sm(running: Running) -> None:
    esme = await bound(running)
    try:
        seq = esme.submit("4915112345678", b"cancel me")
        mid = (await resp_of(esme, seq)).message_id.decode()  # type: ignore[attr-defined]
        esme.send_raw(_cancel_sm(901, mid))  # smpplib has no cancel_sm: raw bytes
        esme.send_raw(_cancel_sm(902, mid))  # already canceled: refused
        esme.client.send_pdu(_query(esme, mid, 903))
        await wait_for(lambda: _others(esme, 3), timeout_s=10, interval_s=0.01)
    finally:
        esme.close()
    by_seq = {p.sequence: p for p in esme.other}
    assert by_seq[901].status == 0 and by_seq[902].status == 0x11  # ESME_RCANCELFAIL
    assert by_seq[903].message_state == 4  # DELETED
    state = await EventStore(running.db).state(mid)
    assert state is not None and state.state == "canceled"


async def _others(esme: Esme, n: int) -> bool:
    return len(esme.other) >= n


def _cancel_sm(seq: int, message_id: str) -> bytes:
    body = b"\x00" + message_id.encode() + b"\x00" + b"\x05\x00acme\x00" + b"\x01\x014915112345678\x00"
    return struct.pack(">LLLL", 16 + len(body), 0x08, 0, seq) + body


def _query(esme: Esme, message_id: str, seq: int) -> object:
    from smpplib import smpp

    pdu = smpp.make_pdu("query_sm", client=esme.client, message_id=message_id, source_addr_ton=5,
                        source_addr_npi=0, source_addr="acme")
    pdu.sequence = seq
    return pdu
