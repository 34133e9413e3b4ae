"""Where a worker looks for due work in a queue: a moving window over `due_at`.

Why: on some MongoDB-wire servers (the embedded one among them) a query's cost is the number of
index entries in its range, whatever its `limit`. "Everything due up to now" is then as expensive as
the whole backlog, for every claim. A worker therefore scans a bounded slice of `due_at` starting at
its cursor, and moves the cursor forward as it finds the slices behind it empty.

Nothing is missed, because every write that puts a head in a queue sets `due_at` to the present or
the future (a lease sets it to the lease's end, so a leased head falls due again by itself if its
holder dies). The cursor lags `margin_s` behind what it has seen, to absorb clock skew between
processes; and every `sweep_s` one scan covers the whole range, as a safety net.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class QueueCursor:
    slice_s: float = 1.0
    margin_s: float = 2.0
    sweep_s: float = 30.0
    position: datetime | None = None  # None: the next scan is a full sweep
    last_sweep: datetime = field(default=EPOCH)

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        """The due_at range [lo, hi] to scan now."""
        if self.position is None or now - self.last_sweep >= timedelta(seconds=self.sweep_s):
            self.position = None
            return EPOCH, now
        lo = self.position - timedelta(seconds=self.margin_s)
        return lo, min(now, self.position + timedelta(seconds=self.slice_s))

    def advance(self, now: datetime, hi: datetime, full: bool, last_due: datetime | None) -> bool:
        """Record a scan of [.., hi]. `full`: it returned as many heads as asked for, so more may wait
        at `last_due`. Returns True if the next slice should be scanned right away (this one was
        empty and did not reach `now`)."""
        if self.position is None:
            self.last_sweep = now
        if full and last_due is not None:
            self.position = last_due
            return False
        self.position = hi
        return hi < now and last_due is None

    def rewind(self, due: datetime) -> None:
        """Heads up to `due` were used but later ones were fetched and left: look again from `due`."""
        if self.position is not None and due < self.position:
            self.position = due
