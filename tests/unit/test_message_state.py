"""The message state machine: allowed and refused transitions, folding, queues."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.domain.errors import InvalidTransition
from core.domain.events import Event, EventType
from core.domain.message import ALLOWED_FROM, MessageState, evolve, fold, next_event, queue_for

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def accepted_event(**data: object) -> Event:
    body = {"to": "+4915112345678", "sender": "acme", "text": "hi", "encoding": "gsm7", "parts": 2,
            "priority": 10, "validity_s": 3600, "send_at": None, "campaign_id": None, "client_ref": None, **data}
    return Event(message_id="m1", seq=1, type=EventType.ACCEPTED, at=T0, tenant_id="t1", data=body)


def step(state: MessageState, kind: EventType, **data: object) -> MessageState:
    defaults: dict[EventType, dict[str, object]] = {
        EventType.ROUTED: {"route_id": "r1", "price_per_part": 3, "currency": "EUR", "strategy": "failover"},
        EventType.SENT: {"route_id": "r1", "smsc_message_ids": ["a", "b"], "attempt": 1, "parts": 2},
        EventType.BILLED: {"route_id": "r1", "parts": 2, "price_per_part": 3, "amount": 6, "currency": "EUR"},
    }
    event = next_event(state, kind, T0 + timedelta(seconds=state.version), {**defaults.get(kind, {}), **data})
    return evolve(state, event)


def test_happy_path_states_and_queues() -> None:
    s = evolve(None, accepted_event())
    assert (s.state, s.version, queue_for(s)) == ("accepted", 1, "route")
    s = step(s, EventType.ROUTED)
    assert (s.state, s.route_id, queue_for(s)) == ("routed", "r1", "send:r1")
    s = step(s, EventType.SENT)
    assert (s.state, s.smsc_message_ids, queue_for(s)) == ("sent", ("a", "b"), "receipt")
    s = step(s, EventType.DELIVERED, smsc_message_id="a", stat="DELIVRD")
    assert (s.state, queue_for(s)) == ("delivered", "bill")
    s = step(s, EventType.BILLED)
    assert (s.state, s.billed, s.version, queue_for(s)) == ("delivered", True, 5, None)


def test_fold_equals_successive_evolve() -> None:
    s = evolve(None, accepted_event())
    events = [accepted_event()]
    for kind in (EventType.ROUTED, EventType.SENT):
        nxt = step(s, kind)
        events.append(next_event(s, kind, T0 + timedelta(seconds=s.version), {
            EventType.ROUTED: {"route_id": "r1", "price_per_part": 3, "currency": "EUR", "strategy": "failover"},
            EventType.SENT: {"route_id": "r1", "smsc_message_ids": ["a", "b"], "attempt": 1, "parts": 2},
        }[kind]))
        s = nxt
    assert fold(events) == s


@pytest.mark.parametrize("kind", [EventType.SENT, EventType.DELIVERED, EventType.BILLED, EventType.ACCEPTED])
def test_refused_from_accepted(kind: EventType) -> None:
    s = evolve(None, accepted_event())
    with pytest.raises(InvalidTransition) as e:
        step(s, kind)
    assert e.value.state == "accepted" and e.value.event_type == kind.value


def test_billed_only_once_and_never_before_a_receipt() -> None:
    s = step(step(evolve(None, accepted_event()), EventType.ROUTED), EventType.SENT)
    with pytest.raises(InvalidTransition):
        step(s, EventType.BILLED)
    s = step(step(s, EventType.DELIVERED), EventType.BILLED)
    with pytest.raises(InvalidTransition):
        step(s, EventType.BILLED)


def test_terminal_states_refuse_everything_but_billing() -> None:
    s = step(step(evolve(None, accepted_event()), EventType.ROUTED), EventType.FAILED, error_code=11)
    assert queue_for(s) is None
    for kind in EventType:
        if kind in (EventType.ACCEPTED, EventType.INBOUND, EventType.REQUEUED):
            continue
        assert "failed" not in ALLOWED_FROM[kind]


def test_retry_excludes_the_route_and_returns_to_the_router() -> None:
    s = step(evolve(None, accepted_event()), EventType.ROUTED)
    s = step(s, EventType.RETRY, route_id="r1", attempt=1, error_code=8, exclude_route=True)
    assert (s.state, s.excluded_routes, queue_for(s)) == ("retry", ("r1",), "route")
    s = step(s, EventType.ROUTED, route_id="r2")
    assert s.route_id == "r2"


def test_expiry_time_from_send_at_or_acceptance() -> None:
    s = evolve(None, accepted_event(validity_s=60))
    assert s.expires_at == T0 + timedelta(seconds=60)
    later = T0 + timedelta(hours=1)
    s = evolve(None, accepted_event(validity_s=60, send_at=later))
    assert s.expires_at == later + timedelta(seconds=60)


def test_expired_after_sent_is_billed_but_unsent_expiry_is_not() -> None:
    sent = step(step(evolve(None, accepted_event()), EventType.ROUTED), EventType.SENT)
    assert queue_for(step(sent, EventType.EXPIRED, reason="x")) == "bill"
    assert queue_for(step(evolve(None, accepted_event()), EventType.EXPIRED, reason="x")) is None
