"""Check 6, money: no message billed twice, none sent and ended unbilled, and each tenant's
`spent_minor` equal to the sum of its `billed` amounts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from core.domain.message import MessageState
from ops.verify.report import VerifyReport

if TYPE_CHECKING:
    from ops.verify.messages import Judgement

# States after which a sent message must carry its `billed` (written in the same commit).
BILLABLE_STATES = frozenset({"delivered", "undelivered", "expired"})


def check_billing(j: Judgement, docs: Sequence[Mapping[str, Any]], state: MessageState | None) -> None:
    bills = [d for d in docs if d.get("type") == "billed"]
    j.billed_events = len(bills)
    j.billed_amounts = sum(int((d.get("data") or {}).get("amount") or 0) for d in bills)
    if len(bills) > 1:
        j.problems.append(("billed_twice", f"{len(bills)} billed events (seqs {[d.get('seq') for d in bills]}), "
                           f"amounts {[(d.get('data') or {}).get('amount') for d in bills]}"))
    if state is not None and state.state in BILLABLE_STATES and state.sent_at is not None and not bills:
        j.problems.append(("unbilled", f"state {state.state!r} after a send, but no billed event (the outcome "
                           "and its billed commit together)"))


def check_spend(report: VerifyReport, before: Mapping[str, int], after: Mapping[str, int],
                 billed: Mapping[str, int]) -> None:
    """Each tenant's spent_minor equals the sum of its billed amounts. The scan saw every bill committed
    before `before` was read and none committed after `after`: its sum must lie between the two."""
    for tenant in sorted(set(before) | set(after) | {t for t, n in billed.items() if n}):
        seen = billed.get(tenant, 0)
        if tenant not in after and tenant not in before:
            report.add("spend_mismatch", None, f"tenant {tenant}: billed {seen} but has no tenant document")
            continue
        low, high = before.get(tenant, 0), after.get(tenant, before.get(tenant, 0))
        if not low <= seen <= high:
            what = f"spent_minor {low}" if low == high else f"spent_minor between {low} and {high} during the scan"
            report.add("spend_mismatch", None, f"tenant {tenant}: {what}, billed events sum to {seen}")
