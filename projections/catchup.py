"""The catch-up scan that follows every (re)open of the change stream, and its bookkeeping.

Why a resumed change stream is not trusted alone: SecantusDB 0.7.0b3 was seen to drop events when
a change stream is opened with `resume_after` or `start_at_operation_time` while inserts commit: it
searches its oplog, then answers with an empty first batch whose postBatchResumeToken is already
past inserts that committed during the search; those are never delivered. So every (re)open of the
stream -- restart, crash, reconnect, standby takeover, even the driver's own automatic resume -- is
followed by a catch-up scan of the log itself, applied through the same idempotent writer
(duplicates change nothing). `projections.runner` interleaves its pages with the stream's batches.

The scan window is keyed on `_id`, not on `at`: event documents get their `_id` from the driver
(an ObjectId stamped with the writer's wall clock when `insert_many` runs, i.e. inside the very
transaction attempt that commits it), and `_id` has an index on every collection, so the scan
costs no extra index on the hot insert path. `at` is unsuitable: it comes from an injectable clock
and is decided before a `commit` that may go through several rounds of driver retries.

The checkpoint keeps `scan_from` with this invariant: every event not yet applied has an `_id`
time >= scan_from - margin, where the margin (`catchup_margin_s`, 5 minutes by default) covers
the time between `_id` generation and commit (the driver retries a commit for up to ~2 minutes)
plus clock skew between hosts. It is maintained as follows:
- a fresh replay sets it to the wall-clock time noted before the log scan started;
- on (re)open, the scan reads `_id` in [scan_from - margin, time after the open + margin] in
  `_id` order, one page per PostgreSQL transaction, interleaved with the stream's batches so the
  stream is never held up for more than one page. Anything committed before the stream was open
  is in that window and visible to the scan; anything committed afterwards the stream delivers;
- while the scan is unfinished `scan_from` does not move (a crash mid-scan rescans the same
  window); when it finishes, `scan_from` becomes the time noted just before the stream was opened;
- afterwards each stream batch moves it to the newest `_id` time it applied (events committed
  after that batch have later `_id`s, up to the margin).
Events whose `_id` is not a driver-generated ObjectId are outside this scheme (none are written
today: `Event.to_doc` leaves `_id` to the driver).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from core.store.change_feed import IdBound, id_time, newest_id_time

__all__ = ["CatchUp", "id_time", "newest_id_time", "wall_now"]


def wall_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class CatchUp:
    """An unfinished catch-up scan: events with `_id` in [lo, hi], read in `_id` order.

    `opened_at` is the wall-clock time noted just before the change stream was (re)opened; once
    the scan is done it becomes the checkpoint's `scan_from`. The bounds are opaque `_id` values
    (`core.store.change_feed.id_bound`); `ChangeFeed.scan_ids` reads the next page.
    """

    lo: IdBound | None  # None: from the start of the log (a checkpoint that predates scan_from)
    hi: IdBound
    opened_at: datetime
    after: IdBound | None = None  # the last `_id` applied by this scan
