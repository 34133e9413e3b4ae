"""The `requeued` event: an operator's retry of a dead-lettered or failed message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.domain.errors import InvalidTransition
from core.domain.events import Event, EventType
from core.domain.message import (
    ALLOWED_FROM,
    TERMINAL_STATES,
    MessageState,
    evolve,
    fold,
    lane_of,
    next_event,
    route_topic,
    send_topic,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
REQUEUE_DATA = {"reason": "SMSC fixed", "actor": "cli:ops", "previous_state": "dead_lettered"}


def accepted() -> MessageState:
    body = {"to": "+4915112345678", "sender": "acme", "text": "hi", "encoding": "gsm7", "parts": 1,
            "priority": 10, "validity_s": 3600, "send_at": None, "campaign_id": None, "client_ref": None}
    return evolve(None, Event(message_id="m1", seq=1, type=EventType.ACCEPTED, at=T0, tenant_id="t1", data=body))


def step(state: MessageState, kind: EventType, **data: object) -> MessageState:
    return evolve(state, next_event(state, kind, T0 + timedelta(seconds=state.version), dict(data)))


def retried(times: int) -> MessageState:
    """A message routed and retried `times` times, each retry excluding its route."""
    s = accepted()
    for attempt in range(1, times + 1):
        s = step(s, EventType.ROUTED, route_id=f"r{attempt}", price_per_part=1, currency="EUR", strategy="failover")
        s = step(s, EventType.RETRY, route_id=f"r{attempt}", attempt=attempt, error_code=8, error_name="ESME_RSYSERR",
                 next_at=T0, exclude_route=True)
    return s


def dead_lettered() -> MessageState:
    s = retried(5)
    return step(s, EventType.DEAD_LETTERED, reason="5 attempts failed", attempts=5)


def failed() -> MessageState:
    return step(accepted(), EventType.FAILED, route_id=None, attempt=0, error_code=None, error_name="NO_ROUTE",
                reason="no route for destination +4915112345678")


def test_requeued_is_allowed_from_operator_states_only() -> None:
    assert ALLOWED_FROM[EventType.REQUEUED] == frozenset({"dead_lettered", "failed", "unknown"})


@pytest.mark.parametrize("build", [dead_lettered, failed], ids=["dead_lettered", "failed"])
def test_requeue_moves_back_to_the_router_with_a_fresh_budget(build: object) -> None:
    before = build()  # type: ignore[operator]
    assert before.state in TERMINAL_STATES  # no stage acts on it until an operator does
    event = next_event(before, EventType.REQUEUED, T0 + timedelta(hours=1), {**REQUEUE_DATA,
                                                                            "previous_state": before.state})
    after = evolve(before, event)

    assert event.seq == before.version + 1
    assert (after.state, after.version, after.attempts, after.excluded_routes) == ("retry", event.seq, 0, ())
    assert route_topic(lane_of(after)) == "route"  # where requeue hands it: the router's topic of its lane
    # What the message is stays as it was: only the delivery bookkeeping is reset.
    assert (after.to, after.text, after.tenant_id, after.parts) == (before.to, before.text, before.tenant_id,
                                                                    before.parts)


def test_dead_lettered_message_had_spent_its_budget_and_requeue_resets_it() -> None:
    before = dead_lettered()
    assert before.attempts == 5
    assert before.excluded_routes == ("r1", "r2", "r3", "r4", "r5")
    after = step(before, EventType.REQUEUED, **REQUEUE_DATA)
    assert (after.attempts, after.excluded_routes) == (0, ())


def test_requeued_message_routes_again_and_can_be_dead_lettered_again() -> None:
    s = step(dead_lettered(), EventType.REQUEUED, **REQUEUE_DATA)
    s = step(s, EventType.ROUTED, route_id="r1", price_per_part=1, currency="EUR", strategy="failover")
    assert (s.state, s.route_id, send_topic("r1", lane_of(s))) == ("routed", "r1", "send:r1")
    s = step(s, EventType.SENT, route_id="r1", smsc_message_ids=["x"], attempt=1, parts=1)
    assert (s.state, s.attempts) == ("sent", 1)
    # A second round of failures ends in a second dead letter, then a second requeue.
    s2 = step(retried(1), EventType.DEAD_LETTERED, reason="gave up", attempts=1)
    s2 = step(s2, EventType.REQUEUED, **REQUEUE_DATA)
    s2 = step(s2, EventType.DEAD_LETTERED, reason="gave up again", attempts=0)
    assert step(s2, EventType.REQUEUED, **REQUEUE_DATA).state == "retry"


@pytest.mark.parametrize("build", [
    accepted,
    lambda: step(step(step(accepted(), EventType.ROUTED, route_id="r1"), EventType.SENT, route_id="r1",
                      smsc_message_ids=["x"], attempt=1, parts=1), EventType.DELIVERED, route_id="r1"),
    lambda: step(accepted(), EventType.ROUTED, route_id="r1"),
    lambda: retried(1),
], ids=["accepted", "delivered", "routed", "retry"])
def test_requeue_is_refused_from_other_states(build: object) -> None:
    s = build()  # type: ignore[operator]
    with pytest.raises(InvalidTransition):
        next_event(s, EventType.REQUEUED, T0, REQUEUE_DATA)
    bogus = Event(message_id="m1", seq=s.version + 1, type=EventType.REQUEUED, at=T0, tenant_id="t1",
                  data=REQUEUE_DATA)
    with pytest.raises(InvalidTransition):
        evolve(s, bogus)


def test_requeue_cannot_start_a_stream() -> None:
    with pytest.raises(InvalidTransition):
        evolve(None, Event(message_id="m1", seq=1, type=EventType.REQUEUED, at=T0, tenant_id="t1", data=REQUEUE_DATA))


def test_fold_of_a_requeued_log_equals_the_stepwise_state() -> None:
    s = accepted()
    events = []
    for kind, data in [
        (EventType.ROUTED, {"route_id": "r1"}),
        (EventType.RETRY, {"route_id": "r1", "attempt": 1, "exclude_route": True}),
        (EventType.DEAD_LETTERED, {"reason": "1 attempts failed", "attempts": 1}),
        (EventType.REQUEUED, REQUEUE_DATA),
    ]:
        e = next_event(s, kind, T0 + timedelta(seconds=s.version), data)
        events.append(e)
        s = evolve(s, e)
    first = Event(message_id="m1", seq=1, type=EventType.ACCEPTED, at=T0, tenant_id="t1",
                  data={"to": "+4915112345678", "sender": "acme", "text": "hi", "encoding": "gsm7", "parts": 1,
                        "priority": 10, "validity_s": 3600, "send_at": None, "campaign_id": None,
                        "client_ref": None})
    assert fold([first, *events]) == s
    assert (s.state, s.attempts, s.excluded_routes) == ("retry", 0, ())
