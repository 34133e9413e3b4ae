"""SMPP over TLS: a self-signed certificate made here with the openssl CLI, the server serving TLS on
a second port while plain TCP keeps working, and an ESME (smpplib) wrapping its socket with ssl."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase
from smpplib import exceptions

from core.domain.events import utcnow
from core.store.eventstore import EventStore
from core.store.smpp_accounts import SmppAccountStore
from smsc.esme_server.server import EsmeServer, EsmeServerConfig, tls_context
from tests.integration.esme_client import Esme
from tests.integration.test_esme_server import resp_of


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


@pytest.fixture
async def tls_server(mongo_db: AsyncDatabase, tmp_path: Path) -> AsyncIterator[tuple[EsmeServer, str, ssl.SSLContext]]:
    cert, key = _self_signed(tmp_path)
    await EventStore(mongo_db).ensure_indexes()
    await mongo_db["tenants"].insert_one({"_id": "acme", "name": "Acme", "status": "active", "spent_minor": 0})
    _, password = await SmppAccountStore(mongo_db).create("acme1", "acme", utcnow(), max_binds=4)
    server = EsmeServer(mongo_db, EsmeServerConfig(port=0, tls=tls_context(str(cert), str(key)), tls_port=0), utcnow)
    await server.start()
    client = ssl.create_default_context(cafile=str(cert))  # trusts exactly this certificate
    client.check_hostname = False  # smpplib wraps without a server_hostname; the chain is still verified
    yield server, password, client
    await server.stop()


async def _submit(esme: Esme) -> Any:
    seq = await asyncio.to_thread(esme.submit, "4915112345678", b"over tls")
    return await resp_of(esme, seq)


async def test_submit_over_tls_and_over_plain_tcp(tls_server: tuple[EsmeServer, str, ssl.SSLContext]) -> None:
    server, password, client = tls_server
    assert server.tls_port is not None and server.tls_port != server.port
    secure = Esme(server.tls_port, "acme1", password, tls=client)
    plain = Esme(server.port, "acme1", password)
    try:
        await asyncio.to_thread(secure.bind, "transceiver")
        await asyncio.to_thread(plain.bind, "transmitter")
        assert isinstance(secure.client._socket, ssl.SSLSocket)
        r1, r2 = await _submit(secure), await _submit(plain)
        assert r1.status == 0 and r2.status == 0 and r1.message_id != r2.message_id
        assert {s.mode for s in server.binds["acme1"]} == {"trx", "tx"}
    finally:
        secure.close()
        plain.close()


async def test_plain_smpp_on_the_tls_port_is_dropped_and_tls_goes_on(
        tls_server: tuple[EsmeServer, str, ssl.SSLContext]) -> None:
    server, password, client = tls_server
    assert server.tls_port is not None
    wrong = Esme(server.tls_port, "acme1", password)  # no TLS: the handshake fails, the bind never answers
    with pytest.raises((exceptions.ConnectionError, OSError)):
        await asyncio.to_thread(wrong.bind, "transceiver")
    wrong.close()
    secure = Esme(server.tls_port, "acme1", password, tls=client)
    try:
        await asyncio.to_thread(secure.bind, "transceiver")
        assert (await _submit(secure)).status == 0
    finally:
        secure.close()
