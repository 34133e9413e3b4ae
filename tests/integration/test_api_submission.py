"""The submission service (core/submission_service.py), the one way a new message enters the log,
against a real MongoDB-wire server: the documents it writes, lanes, idempotency."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus
from core.store.eventstore import EventStore
from core.store.lanes import LaneStore
from core.store.routes import RouteStore, RouteTable
from core.submission_service import (
    Idempotency,
    IdempotencyKeyReused,
    Submission,
    SubmissionService,
    accepted,
)


def _service(db: AsyncDatabase) -> SubmissionService:
    return SubmissionService(EventStore(db), LaneStore(db), set())


def _sms(**overrides: object) -> Submission:
    fields: dict[str, object] = {"to": "+4915112345678", "sender": "Acme", "text": "code 1234", "encoding": "gsm7",
                                 "parts": 1, "validity_s": 600}
    fields.update(overrides)
    return Submission(**fields)  # type: ignore[arg-type]


async def test_each_message_is_one_accepted_event_in_its_lane(mongo_db: AsyncDatabase) -> None:
    now = utcnow()
    later = now + timedelta(hours=1)
    submitted = await _service(mongo_db).submit(
        "acme", [_sms(), _sms(transactional=False), _sms(send_at=later)], now)
    assert not submitted.replayed and len(set(submitted.ids)) == 3
    docs = {d["message_id"]: d async for d in mongo_db["events"].find({"message_id": {"$in": submitted.ids}})}
    first, marketing, scheduled = (docs[i] for i in submitted.ids)
    assert [d["seq"] for d in docs.values()] == [1, 1, 1] and {d["type"] for d in docs.values()} == {"accepted"}
    assert first["topic"] == "route" and first["data"]["priority"] == 10
    assert marketing["topic"] == "route~t:acme" and marketing["data"]["priority"] == 0
    assert "topic" not in scheduled or scheduled["topic"] is None  # waits for its timer
    assert await mongo_db["timers"].count_documents({"message_id": submitted.ids[2]}) == 1
    assert await mongo_db["lanes"].find_one({"_id": "t:acme"}) is not None  # registered before the accept


async def test_same_key_same_request_replays_the_ids(mongo_db: AsyncDatabase) -> None:
    service, now = _service(mongo_db), utcnow()
    first = await service.submit("acme", [_sms(), _sms()], now, Idempotency("k1", "hash-a"))
    again = await service.submit("acme", [_sms(), _sms()], now, Idempotency("k1", "hash-a"))
    assert again.replayed and again.ids == first.ids
    assert await mongo_db["events"].count_documents({"tenant_id": "acme"}) == 2
    other_tenant = await service.submit("beta", [_sms(), _sms()], now, Idempotency("k1", "hash-a"))
    assert not other_tenant.replayed  # keys are per tenant
    with pytest.raises(IdempotencyKeyReused):
        await service.submit("acme", [_sms(), _sms()], now, Idempotency("k1", "hash-b"))
    assert await mongo_db["events"].count_documents({"tenant_id": "acme"}) == 2


def test_a_campaign_message_has_its_campaign_fields_and_no_validity() -> None:
    now = utcnow()
    write = accepted("m1", "acme", _sms(validity_s=0, campaign_id="c1", campaign_row=7, transactional=False), now)
    data = write.events[0]["data"]
    assert data["campaign_id"] == "c1" and data["campaign_row"] == 7 and data["validity_s"] == 0
    assert write.events[0]["seq"] == 1 and write.events[0]["tenant_id"] == "acme"


async def _routed_service(db: AsyncDatabase, status: RouteStatus) -> SubmissionService:
    routes, now = RouteStore(db), utcnow()
    await routes.upsert(Route(id="r1", price_per_part=5), actor="test", now=now)
    await routes.set_status("r1", status, now)
    return SubmissionService(EventStore(db), LaneStore(db), set(), routes=RouteTable(routes))


async def test_a_transactional_message_whose_route_is_up_is_routed_in_the_acceptance(mongo_db: AsyncDatabase) -> None:
    service, now = await _routed_service(mongo_db, RouteStatus.UP), utcnow()
    otp, marketing, scheduled = (await service.submit(
        "acme", [_sms(), _sms(transactional=False), _sms(send_at=now + timedelta(hours=1))], now)).ids
    docs = [d async for d in mongo_db["events"].find({"message_id": otp}).sort("seq", 1)]
    assert [(d["type"], d.get("topic")) for d in docs] == [("accepted", None), ("routed", "send:r1")]
    assert docs[1]["pos"] == 0 and docs[1]["data"]["route_id"] == "r1" and docs[1]["data"]["price_per_part"] == 5
    # Not transactional, or not due: the router decides, as before.
    for mid, topic in ((marketing, "route~t:acme"), (scheduled, None)):
        only = [d async for d in mongo_db["events"].find({"message_id": mid})]
        assert [(d["type"], d.get("topic")) for d in only] == [("accepted", topic)]
    state = await EventStore(mongo_db).state(otp)
    assert state is not None and state.state == "routed" and state.route_id == "r1" and state.version == 2


@pytest.mark.parametrize("status", [RouteStatus.BUSY, RouteStatus.DOWN])
async def test_a_route_that_is_not_up_leaves_the_choice_to_the_router(mongo_db: AsyncDatabase,
                                                                     status: RouteStatus) -> None:
    service, now = await _routed_service(mongo_db, status), utcnow()
    (mid,) = (await service.submit("acme", [_sms()], now)).ids
    docs = [d async for d in mongo_db["events"].find({"message_id": mid})]
    assert [(d["type"], d.get("topic")) for d in docs] == [("accepted", "route")]


async def test_no_route_for_the_destination_leaves_the_failure_to_the_router(mongo_db: AsyncDatabase) -> None:
    routes, now = RouteStore(mongo_db), utcnow()
    await routes.upsert(Route(id="uk", prefixes=("44",)), actor="test", now=now)
    await routes.set_status("uk", RouteStatus.UP, now)
    service = SubmissionService(EventStore(mongo_db), LaneStore(mongo_db), set(), routes=RouteTable(routes))
    (mid,) = (await service.submit("acme", [_sms(to="+4915112345678")], now)).ids
    assert [d["type"] async for d in mongo_db["events"].find({"message_id": mid})] == ["accepted"]
