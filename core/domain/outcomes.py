"""What the SMSC's answers mean for a message: the connector's decisions, as pure functions.

The connector (smsc/connector.py) only does I/O: it reads a batch, submits, collects what came back,
and asks this module what each answer means:

- `decide_before_send`: an entry read from the route's send topic is canceled (its lane is being
  canceled), held for the operator (an earlier owner attempted it without recording the outcome and
  the route's policy is `hold`), expired (its validity passed while it waited), parked on a timer
  (its tenant is suspended), or sent (a possible duplicate when an earlier attempt is open and the
  policy is `resend`).
- `decide_submit`: a message's submit_sm results (one per part) become `sent`, `retry` (temporary
  error, generic_nack, lost bind under `resend`, no bind up), `failed` (permanent error) or
  `unknown` (lost bind under `hold`). Throttling is not decided here: the connector waits out the
  pause and submits the same part again (`is_throttling`).
- Receipts: `normal_stat`, `stat_kind`, `final_receipt` (the final event of a message once every
  part's receipt is in), `receipt_events` (which of `delivered|undelivered` and `billed` still fit
  the message's state) and `billed_data`.

SMPP command_status values are protocol constants; the ones acted on are listed here so the domain
needs no SMPP library (tests/unit/test_outcomes.py checks them against smsc/status.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from core.domain.pricing import price_message
from core.domain.retry import backoff_s

ESME_RSYSERR = 0x08
ESME_RMSGQFUL = 0x14
ESME_RSUBMITFAIL = 0x45
ESME_RTHROTTLED = 0x58
ESME_RX_T_APPN = 0x64
ESME_RX_R_APPN = 0x66
ESME_RUNKNOWNERR = 0xFF

# The SMSC could not take the message now; the same message may succeed later or elsewhere.
TEMPORARY = frozenset({ESME_RSYSERR, ESME_RMSGQFUL, ESME_RTHROTTLED, ESME_RSUBMITFAIL, ESME_RX_T_APPN,
                       ESME_RX_R_APPN, ESME_RUNKNOWNERR})
# The SMSC asks us to slow down: the whole route pauses; the message is not at fault.
THROTTLING = frozenset({ESME_RTHROTTLED, ESME_RMSGQFUL})

RESEND, HOLD = "resend", "hold"  # core.domain.routing.UnknownOutcomePolicy values

UNDELIVERED_STATS = frozenset({"UNDELIV", "EXPIRED", "REJECTD", "DELETED", "UNKNOWN"})
FINAL_STATS = UNDELIVERED_STATS | {"DELIVRD"}
INTERMEDIATE_STATS = frozenset({"ENROUTE", "ACCEPTD"})
STAT_ALIASES = {"DELIVERED": "DELIVRD", "UNDELIVERABLE": "UNDELIV", "REJECTED": "REJECTD", "ACCEPTED": "ACCEPTD",
                "DELETD": "DELETED"}

# ---- before the submit ----------------------------------------------------------------------------


class Before(StrEnum):
    SEND = "send"
    SEND_DUPLICATE = "send_duplicate"  # an earlier attempt may have reached the SMSC (policy resend)
    UNKNOWN = "unknown"  # an earlier attempt may have reached the SMSC (policy hold): not sent again
    CANCEL = "cancel"
    EXPIRE = "expire"
    SUSPENDED = "suspended"  # the tenant is suspended: wait on a timer, no event


def decide_before_send(*, canceling: bool, earlier_attempt: bool, policy: str, expired: bool,
                       suspended: bool) -> Before:
    """What to do with one entry of a send topic before any submit_sm.

    A canceling lane wins over everything (its entries end `canceled`; `attempted` tells whether an
    earlier attempt may have sent it). An open earlier attempt under `hold` is never sent again, even
    if its validity passed meanwhile: its outcome is for the operator to find out."""
    if canceling:
        return Before.CANCEL
    if earlier_attempt and policy == HOLD:
        return Before.UNKNOWN
    if expired:
        return Before.EXPIRE
    if suspended:
        return Before.SUSPENDED
    return Before.SEND_DUPLICATE if earlier_attempt else Before.SEND


# ---- after the submit -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitReport:
    """What came back for one message's submit_sm (one per part, in order, stopping at the first part
    that was not accepted).

    `status` is the first non-zero status (0: every part accepted); `nack` the SMSC answered with
    generic_nack; `error` no answer came (`maybe_sent`: the submit_sm left this process, the bind
    dropped or timed out before the answer; otherwise it never left, e.g. no bind was up)."""

    smsc_ids: tuple[str, ...] = ()
    status: int = 0
    nack: bool = False
    error: str = ""
    maybe_sent: bool = False


class Verdict(StrEnum):
    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class SubmitDecision:
    verdict: Verdict
    error_code: int | None = None
    error_name: str = ""
    reason: str = ""
    exclude_route: bool = False  # retry elsewhere: this route refused the message
    possible_duplicate: bool = False  # the next send may repeat a submit the SMSC already has
    retry_in_s: float = 0.0


StatusNames = Callable[[int], tuple[str, str]]  # status -> (name, description)


def _plain_names(status: int) -> tuple[str, str]:
    return f"0x{status:08X}", "SMPP command status"


def is_throttling(status: int, nack: bool) -> bool:
    """The SMSC asked us to slow down: pause the route and submit the same part again later."""
    return not nack and status in THROTTLING


def unanswered(error: str, maybe_sent: bool, *, policy: str, attempt: int, rng: random.Random | None,
               exclude_route: bool, what: str) -> SubmitDecision:
    """No answer to a send (`what`: "to submit_sm", "from the provider"). If it may have left (time-out,
    lost connection after it was written): policy `hold` -> UNKNOWN, `resend` -> RETRY as
    OUTCOME_UNKNOWN with `possible_duplicate`; if nothing left: RETRY as NOT_SENT. A retry waits an
    exponential back-off with jitter."""
    if maybe_sent:
        if policy == HOLD:
            return SubmitDecision(Verdict.UNKNOWN, reason=f"no answer {what}: {error}")
        return SubmitDecision(Verdict.RETRY, None, "OUTCOME_UNKNOWN", error, exclude_route=exclude_route,
                              possible_duplicate=True, retry_in_s=backoff_s(attempt, rng=rng))
    return SubmitDecision(Verdict.RETRY, None, "NOT_SENT", error, exclude_route=exclude_route,
                          retry_in_s=backoff_s(attempt, rng=rng))


def decide_submit(report: SubmitReport, *, policy: str, attempt: int, names: StatusNames = _plain_names,
                  rng: random.Random | None = None) -> SubmitDecision:
    """The outcome of one message's submit. `attempt` is this attempt's number (1 for the first);
    `names` gives a status's name and description (smsc/status.py in the connector).

    - every part accepted: SENT;
    - no answer after the submit_sm left (lost bind, time-out): policy `resend` -> RETRY with
      error OUTCOME_UNKNOWN, the route kept, and `possible_duplicate`; policy `hold` -> UNKNOWN;
    - no answer and nothing left this process (no bind up): RETRY (NOT_SENT), the route kept;
    - generic_nack or a temporary status: RETRY on another route if there is one (`exclude_route`);
    - any other status: FAILED.
    A retry waits an exponential back-off with jitter (core/domain/retry.py)."""
    if report.error:
        return unanswered(report.error, report.maybe_sent, policy=policy, attempt=attempt, rng=rng,
                          exclude_route=False, what="to submit_sm")
    if report.nack:
        name, _ = names(report.status)
        return SubmitDecision(Verdict.RETRY, report.status, "GENERIC_NACK", f"generic_nack for submit_sm ({name})",
                              exclude_route=True, retry_in_s=backoff_s(attempt, rng=rng))
    if report.status == 0:
        return SubmitDecision(Verdict.SENT)
    name, text = names(report.status)
    if report.status in TEMPORARY:
        # Throttling that outlasted the connector's patience is not the message's fault either, but
        # another route may take it now: retry elsewhere like any temporary refusal.
        return SubmitDecision(Verdict.RETRY, report.status, name, text, exclude_route=True,
                              retry_in_s=backoff_s(attempt, rng=rng))
    return SubmitDecision(Verdict.FAILED, report.status, name, text)


def sent_expires_at(message_expires_at: datetime | None, sent_at: datetime, default_validity_s: float) -> datetime:
    """When the wait for a sent message's receipt ends: its own expiry, else the default validity
    after sending."""
    return message_expires_at or sent_at + timedelta(seconds=default_validity_s)


# ---- receipts --------------------------------------------------------------------------------------


class StatKind(StrEnum):
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    INTERMEDIATE = "intermediate"
    UNKNOWN = "unknown"  # a stat no table knows: taken as intermediate (acknowledged, nothing recorded)


def normal_stat(stat: str) -> str:
    """The SMPP v3.4 appendix B spelling of a receipt's stat (some SMSCs spell them out)."""
    stat = stat.strip().upper()
    return STAT_ALIASES.get(stat, stat)


def stat_kind(stat: str) -> StatKind:
    """What a receipt's (normalised) stat says about its part."""
    if stat == "DELIVRD":
        return StatKind.DELIVERED
    if stat in UNDELIVERED_STATS:
        return StatKind.UNDELIVERED
    if stat in INTERMEDIATE_STATS:
        return StatKind.INTERMEDIATE
    return StatKind.UNKNOWN


@dataclass(frozen=True, slots=True)
class PartStat:
    """The final receipt of one part."""

    smsc_message_id: str
    stat: str
    err: str | None = None
    done_at: datetime | None = None

    def as_data(self) -> dict[str, Any]:
        return {"smsc_message_id": self.smsc_message_id, "stat": self.stat, "err": self.err, "done_at": self.done_at}


def final_receipt(parts: Sequence[PartStat]) -> tuple[str, dict[str, Any]]:
    """(event type, data without route_id) once every part's final receipt is in, parts in the
    order of the `sent` event: `delivered` if all say DELIVRD, else `undelivered` with the first
    failing part's stat; a long message lists every part in `parts`."""
    if not parts:
        raise ValueError("a final receipt needs at least one part")
    failing = next((p for p in parts if p.stat != "DELIVRD"), None)
    chosen = failing or parts[-1]
    data = chosen.as_data()
    if len(parts) > 1:
        data["parts"] = [p.as_data() for p in parts]
    return ("delivered" if failing is None else "undelivered"), data


def receipt_events(state: str, billed: bool) -> tuple[bool, bool]:
    """(record the final receipt, also bill) for a message in `state` when its final receipt is in.

    `sent`: both. `expired` (the receipt wait ended first): the outcome is still recorded, the
    message was billed with its expiry, never twice. A message that already has its final receipt
    (or any other state): nothing, the receipt is a duplicate."""
    if state == "sent":
        return True, not billed
    if state == "expired":
        return True, False
    return False, False


def billed_data(route_id: str | None, parts: int, price_per_part: int, currency: str) -> dict[str, Any]:
    """The data of a `billed` event: the message's parts at the route's price (integer minor units)."""
    parts = max(1, parts)
    return {"route_id": route_id, "parts": parts, "price_per_part": price_per_part,
            "amount": price_message(parts, price_per_part), "currency": currency}
