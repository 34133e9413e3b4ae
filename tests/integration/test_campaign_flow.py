"""Campaigns flowing through router, connector, timer releaser and simulator (one process, real
MongoDB, real SMPP over loopback): a one-time password does not wait behind a campaign, two tenants'
campaigns share the route, pause stops reading the lane and resume carries on from the checkpoints,
cancel ends the rest as `canceled` (appended by the lane's consumers), a suspended tenant's messages
wait on timers and go once the tenant is active again.

Fairness is checked by the order in which the simulator received the messages (its journal), never
by how long something took.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.campaign import CampaignAction
from core.domain.events import utcnow
from core.domain.message import MessageState
from core.domain.recipients import Recipient
from core.domain.routing import Route, RouteStatus
from core.domain.templates import parse_template
from core.store.campaigns import CampaignStore
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from core.store.timers import Timers
from core.workers.campaigns import CampaignSweeper
from core.workers.loop import run_until_stopped
from core.workers.router import Router
from core.workers.timers import TimerReleaser
from smsc.connector import Connector
from smsc.sim.server import Simulator
from tests.support.factories import accepted
from tests.support.waiting import wait_for

TPS = 50


@dataclass
class Flow:
    db: AsyncDatabase
    store: EventStore
    campaigns: CampaignStore
    journal: Path
    stop: asyncio.Event

    async def states(self, query: dict[str, Any]) -> dict[str, MessageState]:
        """The fold of every message whose `accepted` event matches `query`."""
        ids = [d["message_id"] async for d in self.db["events"].find({"type": "accepted", **query}, {"message_id": 1})]
        return await self.store.states(ids)

    def arrivals(self) -> list[dict[str, Any]]:
        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines()]

    async def campaign(self, tenant: str, size: int, first: int, priority: str = "marketing") -> dict[str, Any]:
        now = utcnow()
        doc = await self.campaigns.create(tenant, name=f"{tenant} sale", sender="Shop",
                                          template=parse_template("Hi {{name}}"),
                                          transactional=priority == "transactional", send_at=None, now=now)
        recipients = [Recipient(row=i + 2, phone=f"+49151{first + i:07d}", text=f"Hi {tenant} {i}", encoding="gsm7",
                                parts=1) for i in range(size)]
        for i in range(0, size, 500):
            await self.campaigns.accept_batch(doc, recipients[i:i + 500], [], now)
        await self.campaigns.finish_upload(doc["_id"])
        return doc


@pytest_asyncio.fixture(loop_scope="session")
async def flow(mongo_db: AsyncDatabase, simulator: Simulator, tmp_path: Path) -> AsyncIterator[Flow]:
    store = EventStore(mongo_db)
    await store.ensure_indexes()
    campaigns = CampaignStore(mongo_db)
    await campaigns.ensure_indexes()
    routes = RouteStore(mongo_db)
    now = utcnow()
    route = Route(id="sim", port=simulator.port, price_per_part=1, window=10, tps=TPS)
    await routes.upsert(route, actor="test", now=now)
    await routes.set_status("sim", RouteStatus.UP, now)
    await mongo_db["tenants"].insert_many([{"_id": t, "name": t, "spent_minor": 0, "status": "active",
                                            "priority": 10} for t in ("acme", "corp", "bravo")])
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_until_stopped("router", Router(store, routes, utcnow, batch_size=200).step,
                                                   stop, 0.02)),
             asyncio.create_task(run_until_stopped("timers", TimerReleaser(Timers(mongo_db), LaneBook(mongo_db),
                                                                          utcnow).step, stop, 0.05)),
             asyncio.create_task(Connector(store, routes, route, utcnow, owner="test").run(stop))]
    try:
        yield Flow(mongo_db, store, campaigns, tmp_path / "journal.jsonl", stop)
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def _arrived(flow: Flow, n: int, timeout_s: float = 60.0) -> None:
    async def enough() -> bool:
        return len(flow.arrivals()) >= n
    await wait_for(enough, timeout_s=timeout_s)


async def test_a_one_time_password_does_not_wait_behind_a_campaign(flow: Flow) -> None:
    campaign = await flow.campaign("acme", 600, first=0)
    await flow.campaigns.act("acme", campaign["_id"], CampaignAction.START, utcnow())
    await _arrived(flow, 60)  # the campaign is flowing at the route's TPS

    otp = [accepted("bravo", utcnow(), to=f"+4917{i:09d}", text=f"code {i}") for i in range(2)]
    posted_after = len(flow.arrivals())
    await flow.store.accept([w for _, w in otp])
    otp_numbers = {e.data["to"].lstrip("+") for e, _ in otp}

    async def otp_arrived() -> bool:
        return otp_numbers <= {a["destination"] for a in flow.arrivals()}
    await wait_for(otp_arrived, timeout_s=30)

    order = [a["destination"] for a in flow.arrivals()]
    last_otp = max(order.index(n) for n in otp_numbers)
    campaign_before_otp = sum(1 for d in order[posted_after:last_otp] if d not in otp_numbers)
    # The journal lags the socket by its flush interval, so the count starts a little early: what
    # matters is that the OTP overtook the campaign's ~500 waiting messages, arriving within about a
    # second's worth of the route's TPS.
    assert campaign_before_otp <= int(1.5 * TPS), order[posted_after:last_otp + 1]
    assert len(order) - 2 < 600  # the campaign was still flowing when the OTP went out


async def test_two_tenants_campaigns_share_the_route(flow: Flow) -> None:
    a = await flow.campaign("acme", 300, first=0)
    c = await flow.campaign("corp", 300, first=5000)
    for tenant, doc in (("acme", a), ("corp", c)):
        await flow.campaigns.act(tenant, doc["_id"], CampaignAction.START, utcnow())
    await _arrived(flow, 200)
    order = [a["destination"] for a in flow.arrivals()][:200]
    shares = Counter("acme" if int(d[5:]) < 5000 else "corp" for d in order)
    assert 0.35 <= shares["acme"] / 200 <= 0.65, shares


async def test_pause_stops_claiming_resume_carries_on_cancel_ends_the_rest(flow: Flow) -> None:
    size = 400
    doc = await flow.campaign("acme", size, first=0)
    cid = doc["_id"]
    await flow.campaigns.act("acme", cid, CampaignAction.START, utcnow())
    await _arrived(flow, 40)
    await flow.campaigns.act("acme", cid, CampaignAction.PAUSE, utcnow())

    async def settled() -> bool:  # nothing more arrives for 1.5 s
        before = len(flow.arrivals())
        await asyncio.sleep(1.5)
        return len(flow.arrivals()) == before
    await wait_for(settled, timeout_s=30)
    paused_at = len(flow.arrivals())
    assert paused_at < size
    await asyncio.sleep(1.0)
    assert len(flow.arrivals()) == paused_at  # still nothing while paused

    await flow.campaigns.act("acme", cid, CampaignAction.RESUME, utcnow())
    await _arrived(flow, paused_at + 40)
    await flow.campaigns.act("acme", cid, CampaignAction.CANCEL, utcnow())
    sweeper = CampaignSweeper(flow.campaigns, utcnow)

    async def canceled() -> bool:
        await sweeper.sweep()
        return (await flow.campaigns.get("acme", cid))["status"] == "canceled"
    await wait_for(canceled, timeout_s=60)

    folds = await flow.states({"data.campaign_id": cid})
    states = Counter(s.state for s in folds.values())
    await asyncio.sleep(0.5)  # the journal's last flush
    sent = [a["destination"] for a in flow.arrivals()]
    assert len(folds) == size
    assert len(sent) == len(set(sent))  # nothing twice
    assert states["canceled"] > 0 and states["canceled"] + len(sent) == size, states
    canceled_numbers = {s.to.lstrip("+") for s in folds.values() if s.state == "canceled"}
    assert not canceled_numbers & set(sent)  # a canceled message never reached the SMSC
    assert sum(states[s] for s in ("accepted", "routed", "retry")) == 0
    lane = await flow.campaigns.lane_backlog(f"c:{cid}")
    assert set(lane.values()) == {0} and not await Timers(flow.db).any_for_lane(f"c:{cid}")


async def test_a_suspended_tenants_messages_are_held_not_lost(flow: Flow) -> None:
    tenants = TenantStore(flow.db)
    await tenants.suspend("bravo", "unpaid invoice", utcnow())
    await asyncio.sleep(1.5)  # the stages reread tenants every second
    singles = [accepted("bravo", utcnow(), to=f"+4916{i:09d}", text=f"alert {i}") for i in range(5)]
    await flow.store.accept([w for _, w in singles])
    campaign = await flow.campaign("bravo", 20, first=9000)
    await flow.campaigns.act("bravo", campaign["_id"], CampaignAction.START, utcnow())
    await asyncio.sleep(3.0)
    assert flow.arrivals() == []  # held: nothing sent
    states = Counter(s.state for s in (await flow.states({"tenant_id": "bravo"})).values())
    assert states == {"accepted": 25}  # and nothing failed or expired meanwhile
    held = await Timers(flow.db).count({"tenant_id": "bravo", "reason": "tenant_suspended"})
    assert held == 5  # the transactional ones wait on timers; the campaign's lane is simply not read

    await tenants.resume("bravo", utcnow())
    await _arrived(flow, 25)
    await asyncio.sleep(0.5)
    sent = [a["destination"] for a in flow.arrivals()]
    assert len(sent) == len(set(sent)) == 25
