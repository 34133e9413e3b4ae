"""max_binds across server processes: two real EsmeServer instances on two ports sharing one store,
and a real `msgcore smpp-server` process killed with SIGKILL, whose binds free after their lease."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from smpplib import exceptions

from core.domain.events import utcnow
from core.store.esme_binds import BindLeases
from core.store.eventstore import EventStore
from core.store.smpp_accounts import SmppAccountStore
from smsc.esme_server.server import EsmeServer, EsmeServerConfig
from tests.integration.esme_client import Esme
from tests.support.waiting import wait_for

RBINDFAIL = 0x0D


async def _account(db: AsyncDatabase, max_binds: int = 2) -> str:
    await EventStore(db).ensure_indexes()
    await db["tenants"].insert_one({"_id": "acme", "name": "Acme", "status": "active", "spent_minor": 0})
    _, password = await SmppAccountStore(db).create("acme1", "acme", utcnow(), max_binds=max_binds)
    return password


async def _server(db: AsyncDatabase, lease_s: float = 15.0) -> EsmeServer:
    server = EsmeServer(db, EsmeServerConfig(port=0, bind_lease_s=lease_s), utcnow)
    await server.start()
    return server


@pytest.fixture
async def two(mongo_db: AsyncDatabase) -> AsyncIterator[tuple[EsmeServer, EsmeServer, str]]:
    password = await _account(mongo_db)
    a, b = await _server(mongo_db), await _server(mongo_db)
    yield a, b, password
    await a.stop()
    await b.stop()


async def _bind(port: int, password: str) -> tuple[int, Esme]:
    """(status, the ESME: bound when the status is 0, closed otherwise)."""
    esme = Esme(port, "acme1", password)
    try:
        await asyncio.to_thread(esme.bind, "transceiver")
    except exceptions.PDUError as e:
        esme.close()
        return int(e.args[1]), esme
    return 0, esme


async def test_max_binds_counts_the_binds_of_every_process(two: tuple[EsmeServer, EsmeServer, str]) -> None:
    a, b, password = two
    (s1, e1), (s2, e2) = await _bind(a.port, password), await _bind(b.port, password)
    try:
        assert (s1, s2) == (0, 0)
        # Each process holds one bind: alone, neither would refuse a second one.
        assert (await _bind(a.port, password))[0] == RBINDFAIL
        assert (await _bind(b.port, password))[0] == RBINDFAIL
        assert await BindLeases(a.db).live("acme1", utcnow()) == 2
    finally:
        e1.close()
    # An unbind frees its slot at once, for the other process too.
    await wait_for(lambda: _live_is(a, 1), timeout_s=10, interval_s=0.02)
    s3, e3 = await _bind(b.port, password)
    try:
        assert s3 == 0
    finally:
        e2.close()
        e3.close()


async def _live_is(server: EsmeServer, n: int) -> bool:
    return await BindLeases(server.db).live("acme1", utcnow()) == n


async def test_two_processes_racing_for_the_last_slot_admit_one(two: tuple[EsmeServer, EsmeServer, str]) -> None:
    a, b, password = two
    s1, e1 = await _bind(a.port, password)
    assert s1 == 0
    results = await asyncio.gather(*(_bind(port, password) for port in (a.port, b.port, a.port, b.port)))
    try:
        assert sorted(s for s, _ in results) == [0, RBINDFAIL, RBINDFAIL, RBINDFAIL]
        assert await BindLeases(a.db).live("acme1", utcnow()) == 2
    finally:
        e1.close()
        for _, e in results:
            e.close()


async def test_a_stopped_server_frees_its_binds(two: tuple[EsmeServer, EsmeServer, str]) -> None:
    a, b, password = two
    (_, e1), (_, e2) = await _bind(a.port, password), await _bind(a.port, password)
    try:
        assert (await _bind(b.port, password))[0] == RBINDFAIL
        await a.stop()
        s3, e3 = await _bind(b.port, password)
        assert s3 == 0
        e3.close()
    finally:
        e1.close()
        e2.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def test_the_binds_of_a_killed_process_free_after_their_lease(mongo_db: AsyncDatabase, mongo_url: str,
                                                                    tmp_path: Path) -> None:
    password = await _account(mongo_db)
    port = _free_port()
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": mongo_db.name,
           "MSGCORE_DATA_DIR": str(tmp_path)}
    with (tmp_path / "smpp-server.log").open("ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "smpp-server", "--port", str(port),
                                 "--bind-lease", "2"], env=env, stdout=out, stderr=subprocess.STDOUT)
    survivor = await _server(mongo_db, lease_s=2.0)
    esmes: list[Esme] = []
    try:
        await wait_for(lambda: _listening(port), timeout_s=60, interval_s=0.1)
        for _ in range(2):
            status, esme = await _bind(port, password)
            esmes.append(esme)
            assert status == 0
        assert (await _bind(survivor.port, password))[0] == RBINDFAIL
        proc.send_signal(signal.SIGKILL)  # no unbind, no release: its leases just stop being renewed
        await asyncio.to_thread(proc.wait)
        await wait_for(lambda: _binds_on(survivor.port, password, esmes), timeout_s=30, interval_s=0.3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for e in esmes:
            e.close()
        await survivor.stop()


async def _binds_on(port: int, password: str, keep: list[Esme]) -> bool:
    status, esme = await _bind(port, password)
    keep.append(esme)
    return status == 0
