"""SmppSession against the in-process SMSC simulator (no database needed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.domain.encoding import decode_short_message, encode_text, make_udh
from smsc.pdu import ESM_CLASS_UDHI, ESME_RINVPASWD, ESME_ROK, build_receipt_text, parse_receipt
from smsc.session import BindFailed, ConnectFailed, DeliverSm, SessionClosed, SmppSession
from smsc.sim.server import Simulator


async def _eventually(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll until `predicate()` holds; fail the test (not time it) if it never does."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def _journal(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Simulator]:
    simulator = Simulator(port=0, receipt_delay_s=0.05, journal_path=tmp_path / "journal.jsonl")
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


class _Receiver:
    """Collects deliver_sm and acknowledges each after 'persisting' it (appending to a list)."""

    def __init__(self) -> None:
        self.session: SmppSession | None = None
        self.delivered: list[DeliverSm] = []

    def __call__(self, deliver: DeliverSm) -> None:
        self.delivered.append(deliver)
        assert self.session is not None
        self.session.respond_deliver(deliver.sequence, ESME_ROK)


async def _open(sim: Simulator, receiver: _Receiver, **kwargs: Any) -> SmppSession:
    session = SmppSession(
        "127.0.0.1", sim.port, system_id="msgcore", password="secret", on_deliver=receiver, **kwargs
    )
    receiver.session = session
    await session.open()
    return session


async def test_500_concurrent_submits_with_receipts(sim: Simulator, tmp_path: Path) -> None:
    receiver = _Receiver()
    session = await _open(sim, receiver, window=10)
    try:
        destinations = [f"4917{i:07d}" for i in range(500)]

        async def one(dest: str) -> tuple[str, int, str | None]:
            result = await session.submit(
                source="MSGCORE", destination=dest, short_message=b"hello " + dest.encode(), data_coding=0
            )
            assert session.in_flight <= session.window
            return dest, result.status, result.message_id

        results = await asyncio.gather(*(one(d) for d in destinations))
        assert all(status == ESME_ROK for _, status, _ in results)
        ids = [mid for _, _, mid in results]
        assert all(ids) and len(set(ids)) == 500

        await _eventually(lambda: len(receiver.delivered) >= 500)
        await _eventually(lambda: sim.stats()["deliver_sm_acked"] == 500)
        receipts = receiver.delivered
        assert len(receipts) == 500
        assert {d.receipted_message_id for d in receipts} == set(ids)
        for d in receipts:
            assert d.receipt is not None
            assert d.receipt.stat == "DELIVRD"
            assert d.receipt.id == d.receipted_message_id
            assert d.message_state == 2
            assert d.esm_class & 0x04
        by_id = {mid: dest for dest, _, mid in results}
        assert all(by_id[d.receipted_message_id or ""] == d.source for d in receipts)
    finally:
        await session.close()

    await _eventually(lambda: len(_journal(tmp_path / "journal.jsonl")) >= 500)
    journal = _journal(tmp_path / "journal.jsonl")
    assert len(journal) == 500
    assert sorted(line["destination"] for line in journal) == sorted(destinations)
    assert {line["message_id"] for line in journal} == set(ids)
    assert all(line["text"] == f"hello {line['destination']}" for line in journal)
    assert sim.stats()["deliver_sm_nacked"] == 0


async def test_ucs2_long_text_with_udh_arrives_in_parts(sim: Simulator, tmp_path: Path) -> None:
    text = ("Привет 😀 مرحبا — " * 12).strip()
    encoded = encode_text(text)
    assert encoded.encoding == "ucs2" and encoded.part_count > 1
    receiver = _Receiver()
    session = await _open(sim, receiver)
    try:
        ref = 0x7A
        results = await asyncio.gather(
            *(
                session.submit(
                    source="MSGCORE",
                    destination="971501234567",
                    short_message=make_udh(ref, encoded.part_count, i + 1) + part,
                    data_coding=encoded.data_coding,
                    esm_class=ESM_CLASS_UDHI,
                )
                for i, part in enumerate(encoded.parts)
            )
        )
        assert all(r.status == ESME_ROK for r in results)
    finally:
        await session.close()

    await _eventually(lambda: len(_journal(tmp_path / "journal.jsonl")) >= encoded.part_count)
    journal = _journal(tmp_path / "journal.jsonl")
    assert len(journal) == encoded.part_count
    parts: dict[int, str] = {}
    for line in journal:
        udh = bytes.fromhex(line["udh_hex"])
        assert udh[:4] == bytes((0x05, 0x00, 0x03, ref)) and udh[4] == encoded.part_count
        assert line["data_coding"] == 8 and line["esm_class"] & ESM_CLASS_UDHI
        body = bytes.fromhex(line["short_message_hex"])[len(udh) :]
        assert decode_short_message(body, 8) == line["text"]
        parts[udh[5]] = line["text"]
    assert "".join(parts[i] for i in sorted(parts)) == text


async def test_answers_enquire_link_and_unbinds_on_close(sim: Simulator) -> None:
    receiver = _Receiver()
    session = await _open(sim, receiver, enquire_link_s=0.1)
    assert session.is_up
    assert await sim.ping_sessions(timeout_s=5.0) == 1
    assert sim.stats()["enquire_link_resp_received"] >= 1
    # Idle for a while: our own keep-alive goes out and is answered, the session stays up.
    await _eventually(lambda: sim.stats()["enquire_link_received"] >= 1)
    assert session.is_up

    await session.close()
    assert not session.is_up
    assert sim.stats()["unbind_received"] == 1
    await _eventually(lambda: sim.stats()["binds_active"] == 0)
    with pytest.raises(SessionClosed):
        await session.submit(source="a", destination="b", short_message=b"x", data_coding=0)
    await session.close()  # idempotent


async def test_smsc_unbind_fails_pending_and_marks_down(tmp_path: Path) -> None:
    simulator = Simulator(port=0, receipt_delay_s=0.05)
    await simulator.start()
    receiver = _Receiver()
    session = await _open(simulator, receiver)
    try:
        result = await session.submit(source="a", destination="491", short_message=b"x", data_coding=0)
        assert result.status == ESME_ROK
        await simulator.stop()  # sends unbind to every session
        await _eventually(lambda: not session.is_up)
        with pytest.raises(SessionClosed):
            await session.submit(source="a", destination="491", short_message=b"x", data_coding=0)
    finally:
        await session.close()


async def test_bind_refused_and_connect_failed() -> None:
    simulator = Simulator(port=0, credentials={"msgcore": "right"})
    await simulator.start()
    try:
        session = SmppSession(
            "127.0.0.1", simulator.port, system_id="msgcore", password="wrong", on_deliver=lambda d: None
        )
        with pytest.raises(BindFailed) as info:
            await session.open()
        assert info.value.status == ESME_RINVPASWD
        port = simulator.port
    finally:
        await simulator.stop()
    session = SmppSession("127.0.0.1", port, system_id="x", password="y", on_deliver=lambda d: None)
    with pytest.raises(ConnectFailed):
        await session.open()


def test_receipt_text_round_trip() -> None:
    at = datetime(2025, 3, 4, 5, 6, tzinfo=UTC)
    text = build_receipt_text("ab12", at, at, text="a long message text beyond twenty")
    assert text.endswith(" text:a long message text ")
    fields = parse_receipt(text)
    assert fields is not None
    assert (fields.id, fields.stat, fields.err, fields.submit_date) == ("ab12", "DELIVRD", "000", at)
    shuffled = parse_receipt("STAT:undeliv Err:001 id:XY sub:001 dlvrd:000 done_date:2503040506 text:")
    assert shuffled is not None
    assert (shuffled.id, shuffled.stat, shuffled.done_date) == ("XY", "UNDELIV", at)
    assert parse_receipt("hello there") is None
