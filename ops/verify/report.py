"""What `verify` returns (VerifyReport, its Discrepancy findings), its errors, and the constants
every check shares."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

ASCENDING = 1
DEFAULT_STALE_AFTER_S = 3600.0
DEFAULT_LAG_GRACE_S = 60.0
BATCH = 2000
COUNT_KEYS = (
    "messages", "events", "topics", "positions", "checkpoints", "terminal", "in_flight", "in_backlog",
    "on_timer", "awaiting_receipt", "paused", "stuck", "attempts_open", "billed", "possible_duplicates",
    "multi_sent", "projected", "not_yet_projected", "in_motion",
)  # fmt: skip


class VerifyError(RuntimeError):
    """Verification cannot run as configured (e.g. the reporting schema does not exist)."""


class OutOfOrder(VerifyError):
    """A stream that must be sorted was not: a merge would report nonsense, so stop."""


@dataclass(frozen=True)
class Discrepancy:
    """One finding: `kind` (stable, e.g. `no_outcome`), the message concerned (None for log-level
    findings such as `topic_gap` or `daily_stats_mismatch`) and a human-readable detail."""

    kind: str
    message_id: str | None
    detail: str


@dataclass
class VerifyReport:
    """The result of `verify`.

    `discrepancies` keeps at most `keep_per_kind` findings per kind; `discrepancy_counts` counts all
    of them. `notes` are information, not faults (a `possible_duplicate` send that the log explains,
    an attempt in flight). `counts` has the keys of COUNT_KEYS. `reporting_checked` is False when no
    PostgreSQL was given. `pending_after`: events newer than this may be missing from
    `message_events` without fault.
    """

    discrepancies: list[Discrepancy] = field(default_factory=list)
    discrepancy_counts: Counter[str] = field(default_factory=Counter)
    notes: list[Discrepancy] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    reporting_checked: bool = False
    projector_position: datetime | None = None
    pending_after: datetime | None = None
    keep_per_kind: int = 1000

    @property
    def ok(self) -> bool:
        return not self.discrepancy_counts

    def add(self, kind: str, message_id: str | None, detail: str) -> None:
        self.discrepancy_counts[kind] += 1
        if self.discrepancy_counts[kind] <= self.keep_per_kind:
            self.discrepancies.append(Discrepancy(kind, message_id, detail))
        log.debug("verify: %s message=%s %s", kind, message_id, detail)

    def note(self, kind: str, message_id: str | None, detail: str) -> None:
        if len(self.notes) < self.keep_per_kind:
            self.notes.append(Discrepancy(kind, message_id, detail))


def aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
