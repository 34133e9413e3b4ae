"""A campaign through the whole product as processes: created and uploaded over HTTP, scheduled two
seconds ahead and released by the scheduler process, sent over SMPP exactly once per accepted row,
billed (in the receipt's commit), projected, and marked completed by the scheduler once every topic
of its lane is read to the end."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import timedelta

import httpx

from core.domain.events import utcnow
from ops.stack import Stack
from tests.e2e.test_lifecycle import eventually

N = 300


async def test_a_scheduled_campaign_runs_end_to_end(stack: Stack, mongo_client) -> None:
    stack.start_all()
    await asyncio.to_thread(stack.wait_http)
    key = stack.keys["acme"]  # type: ignore[attr-defined]
    rows = ["phone;first_name;city"]  # a European export: `;`
    rows += [f"+4917{i:09d};{'Zoë' if i % 10 == 0 else 'Max'} {i};Köln" for i in range(N)]
    rows += ["+4917000000001;dup;Bonn", "not-a-number;x;y", "+4917999999999;;Bonn"]
    csv_body = ("\ufeff" + "\r\n".join(rows) + "\r\n").encode()

    async with httpx.AsyncClient(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"},
                                 timeout=60) as http:
        send_at = utcnow() + timedelta(seconds=2)
        r = await http.post("/v1/campaigns", json={"name": "e2e", "from": "Shop", "send_at": send_at.isoformat(),
                                                   "template": "Hallo {{first_name}} aus {{city}}!"})
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        r = await http.post(f"/v1/campaigns/{cid}/recipients", content=csv_body,
                            headers={"Content-Type": "text/csv"})
        assert r.status_code == 200, r.text
        report = r.json()
        assert (report["accepted"], report["duplicates"], report["invalid"]) == (N, 1, 2)
        assert (await http.post(f"/v1/campaigns/{cid}/start")).json()["status"] == "scheduled"

        async def status() -> str:
            return (await http.get(f"/v1/campaigns/{cid}")).json()["status"]  # type: ignore[no-any-return]

        async def running() -> bool:
            return await status() in ("running", "completed")
        await eventually(running, 30, "the scheduler released the campaign", stack)
        assert utcnow() >= send_at

        db = mongo_client[stack.mongo_db]
        ids = [d["message_id"] async for d in db["events"].find({"type": "accepted", "data.campaign_id": cid},
                                                                 {"message_id": 1})]
        assert len(ids) == N

        async def all_done() -> bool:
            billed = await db["events"].count_documents({"type": "billed", "message_id": {"$in": ids}})
            return billed == N and await status() == "completed"
        await eventually(all_done, 240, "campaign sent, billed and completed", stack)

        async def projected() -> bool:
            got = (await http.get(f"/v1/campaigns/{cid}")).json()
            return (got["counts"] or {}).get("delivered") == N
        await eventually(projected, 60, "the reporting tables caught up", stack)
        got = (await http.get(f"/v1/campaigns/{cid}")).json()
        assert got["progress"]["total"] == N and got["progress"]["waiting"] == 0

    finals = Counter([d["type"] async for d in db["events"].find(
        {"message_id": {"$in": ids}, "type": {"$in": ["delivered", "undelivered", "expired", "billed"]}})])
    assert finals == {"delivered": N, "billed": N}  # each delivered and billed exactly once
    assert await db["timers"].count_documents({"lane": f"c:{cid}"}) == 0
    journal = [json.loads(line) for line in stack.journal.read_text().splitlines()]
    arrivals = Counter(j["destination"] for j in journal)
    assert len(arrivals) == N and set(arrivals.values()) == {1}
    zoe = next(j for j in journal if j["destination"] == "4917000000000")
    assert zoe["text"] == "Hallo Zoë 0 aus Köln!"
