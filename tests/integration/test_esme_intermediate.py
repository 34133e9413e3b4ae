"""registered_delivery over real TCP through the whole pipeline (router, connector, SMSC simulator):
bit 4 gets an intermediate ENROUTE (esm_class 0x20) before the final receipt; 1 gets the final only;
2 gets a receipt for a failure only."""

from __future__ import annotations

import asyncio
from typing import Any

from core.store.eventstore import EventStore
from smsc.sim.server import Simulator
from tests.integration.esme_client import Esme
from tests.integration.test_esme_receipts import pipeline  # noqa: F401  (the fixture)
from tests.integration.test_esme_server import Running, bound, resp_of
from tests.support.waiting import wait_for


async def _submit(esme: Esme, to: str, registered_delivery: int) -> str:
    seq = await asyncio.to_thread(esme.submit, to, b"hello", registered_delivery=registered_delivery)
    resp: Any = await resp_of(esme, seq)
    assert resp.status == 0
    return str(resp.message_id.decode())


def _of(esme: Esme, message_id: str) -> list[Any]:
    with esme.lock:
        return [p for p in esme.delivered if p.receipted_message_id.decode() == message_id]


async def _checkpoint(r: Running) -> int:
    doc = await r.db["checkpoints"].find_one({"_id": "esme|dlr:acme1"})
    return 0 if doc is None else int(doc["pos"])


async def test_intermediate_enroute_then_the_final_receipt(pipeline: Running) -> None:  # noqa: F811
    esme = await bound(pipeline)
    try:
        both = await _submit(esme, "4915110000001", 0x11)
        final_only = await _submit(esme, "4915110000002", 0x01)

        async def finals_back() -> bool:
            return all(any(p.esm_class == 0x04 for p in _of(esme, m)) for m in (both, final_only))
        await wait_for(finals_back, timeout_s=60, interval_s=0.05)
        got_both, got_final = _of(esme, both), _of(esme, final_only)
    finally:
        esme.close()
    # An ENROUTE is sent (and answered) before its message's final receipt, so none can follow it.
    assert [(p.esm_class, p.message_state) for p in got_both] == [(0x20, 1), (0x04, 2)]
    text = got_both[0].short_message.decode()
    assert text.startswith(f"id:{both} sub:001 dlvrd:000 submit date:") and "stat:ENROUTE err:000" in text
    assert "stat:DELIVRD" in got_both[1].short_message.decode()
    assert [(p.esm_class, p.message_state) for p in got_final] == [(0x04, 2)]
    account = await pipeline.db["smpp_accounts"].find_one({"_id": "acme1"})
    assert account is not None and account.get("intermediate_since") is not None
    assert pipeline.server.senders["acme1"].intermediate.sent == 1


async def test_receipts_on_failure_only(pipeline: Running, simulator: Simulator) -> None:  # noqa: F811
    esme = await bound(pipeline)
    try:
        delivered = await _submit(esme, "4915110000003", 0x02)
        marker = await _submit(esme, "4915110000004", 0x01)

        async def both_done() -> bool:  # both finals in the topic, and the sender past them
            counters = await EventStore(pipeline.db).log.counters(["dlr:acme1"])
            return counters["dlr:acme1"] == 2 and await _checkpoint(pipeline) == 2
        await wait_for(both_done, timeout_s=60, interval_s=0.05)
        assert _of(esme, delivered) == [] and len(_of(esme, marker)) == 1
        assert pipeline.server.senders["acme1"].stats["not_asked"] == 1

        simulator.set_faults(receipt_stat="UNDELIV")
        undelivered = await _submit(esme, "4915110000005", 0x02)

        async def failure_back() -> bool:
            return len(_of(esme, undelivered)) == 1
        await wait_for(failure_back, timeout_s=60, interval_s=0.05)
        [receipt] = _of(esme, undelivered)
    finally:
        esme.close()
    assert receipt.esm_class == 0x04 and receipt.message_state == 5  # UNDELIVERABLE
    assert "stat:UNDELIV" in receipt.short_message.decode()
