"""The connector's send queue hands out transactional messages before queued campaign traffic."""

from __future__ import annotations

from typing import Any, cast

from core.domain.message import TRANSACTIONAL_PRIORITY, MessageState
from smsc.connector_jobs import Item, Job
from smsc.send_queue import SendQueue


def _item(mid: str, **state: Any) -> Item:
    return Item(job=cast(Job, None), state=MessageState(message_id=mid, tenant_id="acme", state="routed", version=2,
                                                       **state), duplicate=False)


async def test_transactional_items_overtake_bulk_and_each_class_keeps_read_order() -> None:
    q = SendQueue()
    for i in range(3):
        q.put_nowait(_item(f"c{i}", campaign_id="42"))
    q.put_nowait(_item("m0", priority=0))  # a tenant's marketing lane
    q.put_nowait(_item("otp1", priority=TRANSACTIONAL_PRIORITY))
    q.put_nowait(_item("otp2", priority=TRANSACTIONAL_PRIORITY))
    assert q.qsize() == 6 and not q.empty()
    order = [(await q.get()).state.message_id for _ in range(6)]
    assert order == ["otp1", "otp2", "c0", "c1", "c2", "m0"]
    assert q.empty()
