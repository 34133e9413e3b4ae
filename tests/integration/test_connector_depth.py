"""The SMPP connector in depth, against the simulator (with its faults) and a real MongoDB: texts
arrive intact and correctly split, bind types, receipts per part of a long message, receipts that
overtake the submit_sm_resp, malformed PDUs, generic_nack, throttling, and expiry when no receipt
comes. Where the simulator cannot produce the case (a generic_nack answering a submit_sm, a receipt
with a chosen stat for a chosen part), `FakeSmsc` from test_inbound.py stands in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pymongo.asynchronous.database import AsyncDatabase

import smsc.receipts as receipts_module
from core.domain.encoding import DATA_CODING_GSM7, DATA_CODING_UCS2, encode_text
from core.domain.events import Event, utcnow
from core.domain.routing import BindType, Route, RouteStatus, UnknownOutcomePolicy
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.routes import RouteStore
from core.store.timers import Timers
from core.workers.expiry import Expirer
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from core.workers.timers import TimerReleaser
from smsc.connector import Connector
from smsc.sim.server import Simulator
from tests.integration.test_inbound import FakeSmsc, acked, make_connector, running
from tests.support.factories import accepted
from tests.support.waiting import wait_for

# GSM-7 with extension characters right at the part boundaries (an escape pair must not be split),
# and UCS-2 with surrogate pairs (emoji) right at the boundaries.
GSM_LONG = "x" * 152 + "{" + "y" * 151 + "€" + "z" * 20 + "[]~^|\\ end"
UCS2_LONG = "ب" * 66 + "😀" + "ع" * 65 + "🎉" + "مرحبا بالعالم " * 3 + "🚀"
TEXTS = {
    "+4915100000001": "Hello world @£$¥èé! 0123456789",
    "+4915100000002": "Ext: {}[]~€^|\\ done",
    "+4915100000003": "مرحبا بالعالم",
    "+4915100000004": "Hi 😀🎉 there",
    "+4915100000005": GSM_LONG,
    "+4915100000006": UCS2_LONG,
}


def journal(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


async def setup(mongo_db: AsyncDatabase, port: int, **route: Any) -> tuple[EventStore, RouteStore, Route]:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    routes = RouteStore(mongo_db)
    r = Route(id="sim", port=port, **route)
    await routes.upsert(r, actor="test", now=utcnow())
    await routes.set_status(r.id, RouteStatus.UP, utcnow())
    return store, routes, r


async def accept_texts(store: EventStore, texts: dict[str, str], **data: Any) -> dict[str, str]:
    """Accept one message per (destination, text); returns destination -> message id."""
    now = utcnow()
    items = []
    for to, text in texts.items():
        encoding, parts = encode_text(text).encoding, encode_text(text).part_count
        items.append(accepted("acme", now, to=to, text=text, encoding=encoding, parts=parts, **data))
    await store.accept([w for _, w in items])
    return {e.data["to"]: e.message_id for e, _ in items}


def releaser(store: EventStore) -> TimerReleaser:
    """The scheduler's timer job: hands retried messages back to the router when due."""
    return TimerReleaser(Timers(store.db), LaneBook(store.db), utcnow)


def helpers(store: EventStore, routes: RouteStore, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """The router and the timer releaser, polling until `stop`."""
    return [asyncio.create_task(run_until_stopped("router", Router(store, routes, utcnow).step, stop, 0.02)),
            asyncio.create_task(run_until_stopped("timers", releaser(store).step, stop, 0.1))]


@contextlib.asynccontextmanager
async def pipeline(store: EventStore, routes: RouteStore, route: Route) -> AsyncIterator[Connector]:
    """Router, timer releaser and connector running until the block ends."""
    stop = asyncio.Event()
    connector = Connector(store, routes, route, utcnow, owner="test-connector", lease_s=10)
    tasks = [*helpers(store, routes, stop), asyncio.create_task(connector.run(stop))]
    try:
        yield connector
        assert not any(t.done() for t in tasks), "a component died"
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def states(mongo_db: AsyncDatabase, ids: list[str], wanted: set[str]) -> Callable[[], Awaitable[bool]]:
    """Every message's state (the fold of its events) is one of `wanted`."""
    store = EventStore(mongo_db)

    async def check() -> bool:
        folded = await store.states(ids)
        return len(folded) == len(ids) and all(s.state in wanted for s in folded.values())
    return check


async def state_of(store: EventStore, message_id: str) -> str | None:
    s = await store.state(message_id)
    return s.state if s is not None else None


async def events_of(store: EventStore, message_id: str) -> list[Event]:
    return await store.load_events(message_id)


def udh_fields(udh_hex: str) -> tuple[int, int, int]:
    udh = bytes.fromhex(udh_hex)
    assert udh[:3] == b"\x05\x00\x03", udh_hex
    return udh[3], udh[4], udh[5]


# ---- texts ----------------------------------------------------------------------------------------

async def test_texts_arrive_at_the_simulator_intact_and_correctly_split(
        mongo_db: AsyncDatabase, simulator: Simulator, tmp_path: Path) -> None:
    store, routes, route = await setup(mongo_db, simulator.port)
    ids = await accept_texts(store, TEXTS)
    async with pipeline(store, routes, route):
        await wait_for(states(mongo_db, list(ids.values()), {"delivered"}), timeout_s=30)

    async def journaled() -> bool:
        expected = sum(encode_text(t).part_count for t in TEXTS.values())
        return len(journal(tmp_path / "journal.jsonl")) >= expected
    await wait_for(journaled)
    lines = journal(tmp_path / "journal.jsonl")
    for to, text in TEXTS.items():
        encoded = encode_text(text)
        got = [j for j in lines if j["destination"] == to.lstrip("+")]
        assert len(got) == encoded.part_count, to
        coding = DATA_CODING_GSM7 if encoded.encoding == "gsm7" else DATA_CODING_UCS2
        assert all(j["data_coding"] == coding for j in got), to
        if encoded.part_count == 1:
            assert got[0]["udh_hex"] is None and got[0]["esm_class"] & 0x40 == 0
            assert got[0]["text"] == text
            continue
        fields = sorted((udh_fields(j["udh_hex"]), j) for j in got)
        refs = {f[0][0] for f in fields}
        assert len(refs) == 1, "every part carries the same reference"
        assert [f[0][1] for f in fields] == [encoded.part_count] * encoded.part_count
        assert [f[0][2] for f in fields] == list(range(1, encoded.part_count + 1))
        assert all(j["esm_class"] & 0x40 for _, j in fields)
        limit = 153 if encoded.encoding == "gsm7" else 134
        assert all(len(bytes.fromhex(j["short_message_hex"])) - 6 <= limit for _, j in fields)
        # Each part decodes on its own to whole characters, and the parts join to the text.
        assert "".join(j["text"] for _, j in fields) == text
        assert all("\ufffd" not in j["text"] for _, j in fields)
        evs = await events_of(store, ids[to])
        delivered = evs[-2]
        assert [e.type.value for e in evs[-2:]] == ["delivered", "billed"]
        assert [p["stat"] for p in delivered.data["parts"]] == ["DELIVRD"] * encoded.part_count
        assert [p["smsc_message_id"] for p in delivered.data["parts"]] == evs[2].data["smsc_message_ids"]


# ---- binds ----------------------------------------------------------------------------------------

async def test_transmitter_and_receiver_binds(mongo_db: AsyncDatabase, simulator: Simulator) -> None:
    store, routes, route = await setup(mongo_db, simulator.port, binds=2,
                                       bind_type=BindType.TRANSMITTER_RECEIVER)
    ids = await accept_texts(store, {f"+49151{i:07d}": f"message {i}" for i in range(40)})
    async with pipeline(store, routes, route) as connector:
        await wait_for(states(mongo_db, list(ids.values()), {"delivered"}), timeout_s=30)
        kinds = sorted(s.bind for s in connector.sessions if s.is_up)
        assert kinds == ["receiver", "receiver", "transmitter", "transmitter"]
        assert simulator.stats()["binds_active"] == 4
    assert connector.stats["receipts"] == 40


async def test_route_ton_npi_and_transmitter_only_submits(mongo_db: AsyncDatabase) -> None:
    smsc = FakeSmsc()
    await smsc.start()
    try:
        connector = await make_connector(mongo_db, smsc.port, bind_type=BindType.TRANSMITTER_RECEIVER,
                                         source_ton=2, source_npi=8, dest_ton=4, dest_npi=6)
        store = connector.store
        ids = await accept_texts(store, {"+4915100000001": "ton npi"})
        await Router(store, connector.routes, utcnow).step()
        async with running(connector):
            await wait_for(states(mongo_db, list(ids.values()), {"sent"}), timeout_s=20)
    finally:
        await smsc.stop()
    assert smsc.submits == [{"source_ton": 2, "source_npi": 8, "dest_ton": 4, "dest_npi": 6,
                             "destination": "4915100000001", "bind": "bind_transmitter"}]


# ---- receipts per part ------------------------------------------------------------------------------

async def sent_ids(store: EventStore, message_id: str) -> list[str]:
    evs = await store.load_events(message_id)
    sent = [e for e in evs if e.type.value == "sent"]
    return list(sent[-1].data["smsc_message_ids"]) if sent else []


async def test_a_long_message_is_final_only_when_every_part_has_its_receipt(
        mongo_db: AsyncDatabase, fake_smsc: FakeSmsc) -> None:
    connector = await make_connector(mongo_db, fake_smsc.port)
    store = connector.store
    stats = ["DELIVRD", "UNDELIV", "EXPIRED", "REJECTD", "DELETED", "UNKNOWN", "ACCEPTD"]
    texts = {"+4915100000001": "a" * 400, "+4915100000002": "b" * 300}
    texts.update({f"+491510000010{i}": f"short {s}" for i, s in enumerate(stats)})
    ids = await accept_texts(store, texts)
    await Router(store, connector.routes, utcnow).step()
    long_a, long_b = ids["+4915100000001"], ids["+4915100000002"]
    async with running(connector):
        await wait_for(states(mongo_db, list(ids.values()), {"sent"}), timeout_s=20)
        a_parts, b_parts = await sent_ids(store, long_a), await sent_ids(store, long_b)
        assert len(a_parts) == 3 and len(b_parts) == 2

        # Message A: an intermediate receipt, then two of three finals: still `sent`, finals unacknowledged.
        seqs = [fake_smsc.send_receipt(a_parts[0], "ENROUTE")]
        await wait_for(acked(fake_smsc, seqs))
        held = [fake_smsc.send_receipt(a_parts[0], "DELIVRD"), fake_smsc.send_receipt(a_parts[2], "DELIVRD")]
        await wait_for(lambda: _is(connector.stats["receipts_intermediate"] >= 1))
        await asyncio.sleep(0.5)
        assert await state_of(store, long_a) == "sent"
        assert not any(s in fake_smsc.acks for s in held)
        # The last part fails: undelivered with that part's stat, and every part is acknowledged.
        last = fake_smsc.send_receipt(a_parts[1], "UNDELIV", err="069")
        await wait_for(acked(fake_smsc, [*held, last]))
        # Message B: every part delivered, in reverse order.
        b_seqs = [fake_smsc.send_receipt(i, "DELIVRD") for i in reversed(b_parts)]
        # The short ones, one per stat.
        short_seqs = []
        for i, stat in enumerate(stats):
            (smsc_id,) = await sent_ids(store, ids[f"+491510000010{i}"])
            short_seqs.append(fake_smsc.send_receipt(smsc_id, stat))
        await wait_for(acked(fake_smsc, b_seqs + short_seqs))

    a_events = await store.load_events(long_a)
    assert [e.type.value for e in a_events] == ["accepted", "routed", "sent", "undelivered", "billed"]
    final = a_events[-2].data
    assert final["stat"] == "UNDELIV" and final["err"] == "069" and final["smsc_message_id"] == a_parts[1]
    assert [(p["smsc_message_id"], p["stat"]) for p in final["parts"]] == [
        (a_parts[0], "DELIVRD"), (a_parts[1], "UNDELIV"), (a_parts[2], "DELIVRD")]
    b_final = (await store.load_events(long_b))[-2]
    assert b_final.type.value == "delivered" and [p["stat"] for p in b_final.data["parts"]] == ["DELIVRD"] * 2
    for i, stat in enumerate(stats):
        evs = await store.load_events(ids[f"+491510000010{i}"])
        if stat == "ACCEPTD":  # intermediate: acknowledged, nothing recorded
            assert evs[-1].type.value == "sent"
            continue
        assert [e.type.value for e in evs[-2:]] == ["delivered" if stat == "DELIVRD" else "undelivered", "billed"]
        assert evs[-2].data["stat"] == stat and "parts" not in evs[-2].data
    assert all(fake_smsc.acks[s] == 0 for s in fake_smsc.acks)


async def test_part_receipts_waiting_long_are_kept_in_the_store_and_survive_a_restart(
        mongo_db: AsyncDatabase, fake_smsc: FakeSmsc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(receipts_module, "PART_HOLD_S", 0.0)
    connector = await make_connector(mongo_db, fake_smsc.port)
    store = connector.store
    ids = await accept_texts(store, {"+4915100000001": "c" * 200})
    await Router(store, connector.routes, utcnow).step()
    (mid,) = ids.values()
    async with running(connector):
        await wait_for(states(mongo_db, [mid], {"sent"}), timeout_s=20)
        parts = await sent_ids(store, mid)
        first = fake_smsc.send_receipt(parts[0], "DELIVRD")
        await wait_for(acked(fake_smsc, [first]))  # acknowledged once it is in `part_receipts`
    assert await mongo_db["part_receipts"].count_documents({"message_id": mid}) == 1
    assert await state_of(store, mid) == "sent"

    restarted = await make_connector(mongo_db, fake_smsc.port)  # its memory is empty
    async with running(restarted):
        await wait_for(lambda: _is(bool(fake_smsc.receivers())))
        second = fake_smsc.send_receipt(parts[1], "DELIVRD")
        await wait_for(acked(fake_smsc, [second]))
    final = (await store.load_events(mid))[-2]
    assert final.type.value == "delivered"
    assert [p["smsc_message_id"] for p in final.data["parts"]] == parts
    assert await mongo_db["part_receipts"].count_documents({"message_id": mid}) == 0


async def test_receipts_with_a_stat_mix_out_of_order(mongo_db: AsyncDatabase, simulator: Simulator) -> None:
    simulator.set_faults(receipt_mode="out_of_order", receipt_stat_mix={"DELIVRD": 3, "UNDELIV": 1, "REJECTD": 1},
                         seed=7)
    store, routes, route = await setup(mongo_db, simulator.port)
    texts = {f"+49151{i:07d}": ("long " * 80 if i % 3 == 0 else f"short {i}") for i in range(60)}
    ids = await accept_texts(store, texts)
    async with pipeline(store, routes, route) as connector:
        await wait_for(states(mongo_db, list(ids.values()), {"delivered", "undelivered"}), timeout_s=40)
    assert connector.stats["orphan_receipts"] == 0
    for mid in ids.values():
        evs = await store.load_events(mid)
        sent, final = evs[2], evs[-2]
        assert len(evs) == 5 and evs[-1].type.value == "billed"
        parts = final.data.get("parts") or [{"smsc_message_id": final.data["smsc_message_id"],
                                             "stat": final.data["stat"]}]
        assert [p["smsc_message_id"] for p in parts] == sent.data["smsc_message_ids"]
        failing = [p for p in parts if p["stat"] != "DELIVRD"]
        assert final.type.value == ("undelivered" if failing else "delivered")
        if failing:
            assert final.data["stat"] == failing[0]["stat"]


# ---- the receipt-before-response race -----------------------------------------------------------------

async def test_receipts_that_overtake_the_submit_response_are_applied(
        mongo_db: AsyncDatabase, simulator: Simulator) -> None:
    simulator.set_faults(receipt_mode="before_response")
    store, routes, route = await setup(mongo_db, simulator.port)
    texts = {f"+49151{i:07d}": ("early " * 60 if i % 5 == 0 else f"early {i}") for i in range(50)}
    ids = await accept_texts(store, texts)
    async with pipeline(store, routes, route) as connector:
        await wait_for(states(mongo_db, list(ids.values()), {"delivered"}), timeout_s=30)
    assert simulator.stats()["receipts_before_response"] == sum(encode_text(t).part_count for t in texts.values())
    assert connector.stats["orphan_receipts"] == 0 and connector.held == {}
    assert await mongo_db["orphan_receipts"].count_documents({}) == 0
    for mid in ids.values():
        assert [e.type.value for e in await store.load_events(mid)] == ["accepted", "routed", "sent", "delivered",
                                                                        "billed"]


# ---- faults -----------------------------------------------------------------------------------------

async def test_malformed_pdus_from_the_smsc_do_not_kill_the_connector(
        mongo_db: AsyncDatabase, simulator: Simulator) -> None:
    simulator.set_faults(malformed_ratio=0.2, seed=3)
    store, routes, route = await setup(mongo_db, simulator.port)
    ids = await accept_texts(store, {f"+49151{i:07d}": f"message {i}" for i in range(80)})
    async with pipeline(store, routes, route) as connector:
        await wait_for(states(mongo_db, list(ids.values()), {"delivered"}), timeout_s=60)
    assert simulator.stats()["malformed_sent"] > 0
    assert connector.stats["malformed_pdus"] > 0
    # Each malformed PDU could be framed, so it was skipped (and nacked) and the bind stayed up.
    assert simulator.stats()["binds_total"] == 1 and connector.stats["reconnects"] == 0
    assert simulator.stats()["generic_nack_sent"] == 0
    for mid in ids.values():
        evs = await store.load_events(mid)
        assert [e.type.value for e in evs[-2:]] == ["delivered", "billed"]
        # A submit whose bind dropped before its answer was retried (outcome unknown, or not sent
        # while no bind was up) and sent again.
        assert all(e.data.get("error_name") in ("OUTCOME_UNKNOWN", "NOT_SENT") for e in evs if e.type.value == "retry")


@pytest.mark.parametrize("policy", [UnknownOutcomePolicy.RESEND, UnknownOutcomePolicy.HOLD])
async def test_an_unframeable_pdu_drops_the_bind_and_in_flight_submits_follow_the_policy(
        mongo_db: AsyncDatabase, fake_smsc: FakeSmsc, policy: UnknownOutcomePolicy) -> None:
    fake_smsc.hold_submits = True
    connector = await make_connector(mongo_db, fake_smsc.port, on_unknown_outcome=policy)
    store = connector.store
    ids = await accept_texts(store, {"+4915100000001": "in flight when the stream broke"})
    (mid,) = ids.values()
    stop = asyncio.Event()
    others = helpers(store, connector.routes, stop)
    try:
        async with running(connector) as task:
            await wait_for(lambda: _is(len(fake_smsc.submits) == 1), timeout_s=20)
            fake_smsc.hold_submits = False
            fake_smsc.send_raw(b"\x00\x00\x00\x02garbage")  # a command_length that frames nothing
            wanted = {"sent"} if policy == UnknownOutcomePolicy.RESEND else {"unknown"}
            await wait_for(states(mongo_db, [mid], wanted), timeout_s=30)
            await wait_for(lambda: _is(any(s.is_up for s in connector.sessions)), timeout_s=20)
            assert not task.done()
    finally:
        stop.set()
        await asyncio.gather(*others)
    assert connector.stats["reconnects"] >= 1 and connector.stats["malformed_pdus"] >= 1
    evs = await store.load_events(mid)
    if policy == UnknownOutcomePolicy.RESEND:
        assert [e.type.value for e in evs] == ["accepted", "routed", "retry", "released", "routed", "sent"]
        assert evs[2].data["error_name"] == "OUTCOME_UNKNOWN" and evs[2].data["exclude_route"] is False
        assert evs[2].data["possible_duplicate"] is True  # the resend may repeat what the SMSC has
        assert connector.stats["possible_duplicates"] == 1
        assert len(fake_smsc.submits) == 2  # sent again, after the new bind
    else:
        assert [e.type.value for e in evs] == ["accepted", "routed", "unknown"]
        assert "no answer to submit_sm" in evs[2].data["reason"]
        assert connector.stats["held_unknown"] == 1
        assert len(fake_smsc.submits) == 1


async def test_generic_nack_for_a_submit_is_a_temporary_error(mongo_db: AsyncDatabase, fake_smsc: FakeSmsc) -> None:
    fake_smsc.nack_submits = 1
    connector = await make_connector(mongo_db, fake_smsc.port)
    store = connector.store
    ids = await accept_texts(store, {"+4915100000001": "nacked once"})
    (mid,) = ids.values()
    stop = asyncio.Event()
    others = helpers(store, connector.routes, stop)
    try:
        async with running(connector):
            await wait_for(states(mongo_db, [mid], {"sent"}), timeout_s=30)
    finally:
        stop.set()
        await asyncio.gather(*others)
    evs = await store.load_events(mid)
    assert [e.type.value for e in evs] == ["accepted", "routed", "retry", "released", "routed", "sent"]
    assert evs[2].data["error_name"] == "GENERIC_NACK" and evs[2].data["error_code"] == 0x08
    assert connector.stats["generic_nacks"] == 1


async def test_throttling_backs_off_and_loses_nothing(mongo_db: AsyncDatabase, simulator: Simulator) -> None:
    simulator.set_faults(throttle_tps=40)
    store, routes, route = await setup(mongo_db, simulator.port, window=20)
    texts = {f"+49151{i:07d}": ("throttled " * 30 if i % 10 == 0 else f"m {i}") for i in range(150)}
    ids = await accept_texts(store, texts)
    async with pipeline(store, routes, route) as connector:
        await wait_for(states(mongo_db, list(ids.values()), {"delivered"}), timeout_s=60)
    assert connector.stats["throttled"] > 0 and connector.stats["failed"] == 0
    assert simulator.stats()["submit_sm_throttled"] > 0
    for mid in ids.values():
        assert [e.type.value for e in await store.load_events(mid)] == ["accepted", "routed", "sent", "delivered",
                                                                        "billed"]


async def test_a_message_whose_receipt_never_comes_expires_after_its_validity(
        mongo_db: AsyncDatabase, simulator: Simulator) -> None:
    simulator.set_faults(receipt_mode="never")
    store, routes, route = await setup(mongo_db, simulator.port)
    ids = await accept_texts(store, {"+4915100000001": "no receipt for me"}, validity_s=2)
    (mid,) = ids.values()
    async with pipeline(store, routes, route):
        await wait_for(states(mongo_db, [mid], {"sent"}), timeout_s=20)
    expirer = Expirer(store, routes, utcnow)

    async def expired() -> bool:
        await expirer.step()
        return await state_of(store, mid) == "expired"
    await wait_for(expired, timeout_s=20, interval_s=0.3)
    assert [e.type.value for e in await store.load_events(mid)] == ["accepted", "routed", "sent", "expired", "billed"]


async def _is(value: bool) -> bool:
    return value


@pytest.fixture
async def fake_smsc() -> AsyncIterator[FakeSmsc]:
    smsc = FakeSmsc()
    await smsc.start()
    yield smsc
    await smsc.stop()



async def test_a_receipt_completing_a_message_after_it_expired_still_records_the_outcome(
        mongo_db: AsyncDatabase, fake_smsc: FakeSmsc) -> None:
    connector = await make_connector(mongo_db, fake_smsc.port)
    store = connector.store
    ids = await accept_texts(store, {"+4915100000001": "d" * 200}, validity_s=2)
    (mid,) = ids.values()
    await Router(store, connector.routes, utcnow).step()
    async with running(connector):
        await wait_for(states(mongo_db, [mid], {"sent"}), timeout_s=20)
        parts = await sent_ids(store, mid)
        first = fake_smsc.send_receipt(parts[0], "DELIVRD")  # held: the second part's receipt is late
        expirer = Expirer(store, connector.routes, utcnow)

        async def expired() -> bool:
            await expirer.step()
            return await state_of(store, mid) == "expired"
        await wait_for(expired, timeout_s=20, interval_s=0.3)
        assert first not in fake_smsc.acks
        second = fake_smsc.send_receipt(parts[1], "DELIVRD")
        await wait_for(acked(fake_smsc, [first, second]))
    evs = await store.load_events(mid)
    # The outcome is still recorded after the expiry; the message was billed once, with its expiry.
    assert [e.type.value for e in evs] == ["accepted", "routed", "sent", "expired", "billed", "delivered"]
    assert [p["smsc_message_id"] for p in evs[-1].data["parts"]] == parts
