"""The route's `mo_alphabet` decides how an MO with data_coding 0 is read (real MongoDB).

Drives `InboundRecorder` directly with composed deliver_sm (the connector and SMPP are covered by
tests/integration/test_inbound.py): a Latin-1 route reads Latin-1, a GSM route reports what GSM-7
cannot hold instead of mapping it silently, and a change of the route applies to the next batch.
"""

from __future__ import annotations

import itertools
import logging

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.encoding import REPLACEMENT, MoAlphabet
from core.domain.events import utcnow
from core.domain.routing import Route
from core.store.eventstore import EventStore
from core.store.numbers import NumberStore
from core.store.routes import RouteStore
from smsc.inbound import InboundRecorder
from smsc.session import DeliverSm

NUMBER = "+4930111111"
_seq = itertools.count(1)


def mo(short_message: bytes, data_coding: int = 0) -> DeliverSm:
    return DeliverSm(sequence=next(_seq), source="4915112345678", destination=NUMBER.lstrip("+"), esm_class=0,
                     data_coding=data_coding, short_message=short_message, receipted_message_id=None,
                     message_state=None, receipt=None)  # fmt: skip


async def recorded(db: AsyncDatabase, recorder: InboundRecorder, pdu: DeliverSm) -> dict:  # type: ignore[type-arg]
    result = await recorder.record([pdu], utcnow())
    assert len(result.committed) == 1
    doc = await db["events"].find_one({"message_id": result.committed[0], "seq": 1})
    assert doc is not None and doc["type"] == "inbound"
    return doc["data"]


async def test_the_route_alphabet_decides_and_bad_bytes_are_kept(
    mongo_db: AsyncDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    routes = RouteStore(mongo_db)
    await routes.upsert(Route(id="latin"), actor="test", now=utcnow())
    await NumberStore(mongo_db).assign(NUMBER, "acme", "test", utcnow())
    recorder = InboundRecorder(EventStore(mongo_db), "latin")
    gruss = "Grüße".encode("latin-1")

    with caplog.at_level(logging.WARNING, logger="smsc.inbound"):
        data = await recorded(mongo_db, recorder, mo(gruss))  # the route says gsm (the default)
    assert data["text"] == f"Gr{REPLACEMENT}{REPLACEMENT}e" and data["undecodable"] == gruss.hex()
    assert any("route=latin" in r.getMessage() and "undecodable" in r.getMessage() for r in caplog.records)

    await routes.upsert(Route(id="latin", mo_alphabet=MoAlphabet.LATIN1), actor="test", now=utcnow())
    data = await recorded(mongo_db, recorder, mo(gruss))  # no restart: read per batch
    assert data["text"] == "Grüße" and "undecodable" not in data
    data = await recorded(mongo_db, recorder, mo("Grüße 👋".encode("utf-16-be"), data_coding=8))
    assert data["text"] == "Grüße 👋" and "undecodable" not in data

    fixed = InboundRecorder(EventStore(mongo_db), "latin", mo_alphabet=MoAlphabet.GSM)
    data = await recorded(mongo_db, fixed, mo(b"Hello \x00"))  # septet 0 is @
    assert data["text"] == "Hello @" and "undecodable" not in data
