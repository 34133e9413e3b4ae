"""The connector's decisions (core/domain/outcomes.py): what an SMSC answer means for a message."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from core.domain import outcomes
from core.domain.outcomes import (
    HOLD,
    RESEND,
    Before,
    PartStat,
    StatKind,
    SubmitReport,
    Verdict,
    billed_data,
    decide_before_send,
    decide_submit,
    final_receipt,
    is_throttling,
    normal_stat,
    receipt_events,
    sent_expires_at,
    stat_kind,
)
from core.domain.routing import UnknownOutcomePolicy
from smsc import status

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def names(code: int) -> tuple[str, str]:
    return status.status_name(code), status.describe(code)


def test_the_status_tables_match_the_smpp_library() -> None:
    assert outcomes.TEMPORARY == status.TEMPORARY
    assert outcomes.THROTTLING == status.THROTTLING
    assert {RESEND, HOLD} == {p.value for p in UnknownOutcomePolicy}


# ---- before the submit ----------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "expected"), [
    ({}, Before.SEND),
    ({"earlier_attempt": True}, Before.SEND_DUPLICATE),
    ({"earlier_attempt": True, "policy": HOLD}, Before.UNKNOWN),
    ({"earlier_attempt": True, "policy": HOLD, "expired": True}, Before.UNKNOWN),  # the operator decides
    ({"earlier_attempt": True, "expired": True}, Before.EXPIRE),
    ({"expired": True, "suspended": True}, Before.EXPIRE),
    ({"suspended": True}, Before.SUSPENDED),
    ({"canceling": True, "earlier_attempt": True, "policy": HOLD, "expired": True}, Before.CANCEL),
])
def test_decide_before_send(flags: dict[str, object], expected: Before) -> None:
    args: dict[str, object] = {"canceling": False, "earlier_attempt": False, "policy": RESEND, "expired": False,
                               "suspended": False, **flags}
    assert decide_before_send(**args) == expected  # type: ignore[arg-type]


# ---- after the submit -----------------------------------------------------------------------------

def decide(report: SubmitReport, policy: str = RESEND, attempt: int = 1):  # type: ignore[no-untyped-def]
    return decide_submit(report, policy=policy, attempt=attempt, names=names, rng=random.Random(1))


def test_every_part_accepted_is_sent() -> None:
    assert decide(SubmitReport(("a", "b"))).verdict == Verdict.SENT


def test_a_permanent_status_fails() -> None:
    d = decide(SubmitReport((), 0x0B))
    assert (d.verdict, d.error_code, d.error_name) == (Verdict.FAILED, 0x0B, "ESME_RINVDSTADR")
    assert d.reason == status.describe(0x0B)


@pytest.mark.parametrize("code", sorted(status.TEMPORARY))
def test_a_temporary_status_retries_elsewhere_with_backoff(code: int) -> None:
    d = decide(SubmitReport((), code), attempt=3)
    assert d.verdict == Verdict.RETRY and d.exclude_route and d.error_code == code
    assert d.error_name == status.status_name(code) and not d.possible_duplicate
    assert 4.0 <= d.retry_in_s <= 8.0  # attempt 3: between half and all of 2 s * 2**2


def test_generic_nack_retries_elsewhere() -> None:
    d = decide(SubmitReport((), 0x08, nack=True))
    assert (d.verdict, d.error_name, d.error_code, d.exclude_route) == (Verdict.RETRY, "GENERIC_NACK", 0x08, True)
    assert "ESME_RSYSERR" in d.reason
    # A nack with status 0 is still a refusal, not a success.
    assert decide(SubmitReport((), 0, nack=True)).verdict == Verdict.RETRY


@pytest.mark.parametrize(("policy", "verdict"), [(RESEND, Verdict.RETRY), (HOLD, Verdict.UNKNOWN)])
def test_a_lost_bind_mid_submit_follows_the_policy(policy: str, verdict: Verdict) -> None:
    d = decide(SubmitReport(("a",), error="SessionClosed: connection lost", maybe_sent=True), policy=policy)
    assert d.verdict == verdict
    if verdict == Verdict.RETRY:
        assert d.error_name == "OUTCOME_UNKNOWN" and d.possible_duplicate and not d.exclude_route
    else:
        assert "no answer to submit_sm" in d.reason


@pytest.mark.parametrize("policy", [RESEND, HOLD])
def test_nothing_left_the_process_retries_on_the_same_route(policy: str) -> None:
    d = decide(SubmitReport((), error="no transmitting bind is up"), policy=policy)
    assert (d.verdict, d.error_name, d.exclude_route, d.possible_duplicate) == (Verdict.RETRY, "NOT_SENT", False,
                                                                               False)


def test_throttling() -> None:
    assert is_throttling(0x58, False) and is_throttling(0x14, False)
    assert not is_throttling(0x58, True) and not is_throttling(0x08, False) and not is_throttling(0, False)


def test_the_receipt_wait_ends_at_the_messages_expiry_else_after_the_default_validity() -> None:
    assert sent_expires_at(NOW + timedelta(hours=1), NOW, 60) == NOW + timedelta(hours=1)
    assert sent_expires_at(None, NOW, 48 * 3600) == NOW + timedelta(hours=48)


# ---- receipts -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("stat", "kind"), [
    ("DELIVRD", StatKind.DELIVERED), ("delivered", StatKind.DELIVERED), (" UNDELIV ", StatKind.UNDELIVERED),
    ("EXPIRED", StatKind.UNDELIVERED), ("REJECTED", StatKind.UNDELIVERED), ("DELETD", StatKind.UNDELIVERED),
    ("UNKNOWN", StatKind.UNDELIVERED), ("ENROUTE", StatKind.INTERMEDIATE), ("ACCEPTED", StatKind.INTERMEDIATE),
    ("WHATEVER", StatKind.UNKNOWN),
])
def test_stat_kinds(stat: str, kind: StatKind) -> None:
    assert stat_kind(normal_stat(stat)) == kind


def test_a_short_message_final_receipt() -> None:
    kind, data = final_receipt([PartStat("x1", "DELIVRD", "000", NOW)])
    assert kind == "delivered" and data == {"smsc_message_id": "x1", "stat": "DELIVRD", "err": "000", "done_at": NOW}


def test_a_long_message_is_undelivered_with_the_first_failing_part() -> None:
    parts = [PartStat("p1", "DELIVRD"), PartStat("p2", "UNDELIV", "069"), PartStat("p3", "EXPIRED")]
    kind, data = final_receipt(parts)
    assert kind == "undelivered" and (data["smsc_message_id"], data["stat"], data["err"]) == ("p2", "UNDELIV", "069")
    assert [p["smsc_message_id"] for p in data["parts"]] == ["p1", "p2", "p3"]
    kind, data = final_receipt([PartStat("p1", "DELIVRD"), PartStat("p2", "DELIVRD")])
    assert kind == "delivered" and data["smsc_message_id"] == "p2" and len(data["parts"]) == 2
    with pytest.raises(ValueError):
        final_receipt([])


@pytest.mark.parametrize(("state", "billed", "expected"), [
    ("sent", False, (True, True)),
    ("expired", True, (True, False)),  # the outcome still counts; billed once, with the expiry
    ("delivered", True, (False, False)),  # a duplicate receipt
    ("undelivered", True, (False, False)),
    ("retry", False, (False, False)),
])
def test_which_receipt_events_still_fit(state: str, billed: bool, expected: tuple[bool, bool]) -> None:
    assert receipt_events(state, billed) == expected


def test_billed_data_in_minor_units() -> None:
    assert billed_data("sim", 3, 7, "EUR") == {"route_id": "sim", "parts": 3, "price_per_part": 7, "amount": 21,
                                               "currency": "EUR"}
    assert billed_data("sim", 0, 7, "EUR")["amount"] == 7  # a message has at least one part
