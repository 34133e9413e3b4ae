"""Where a worker looks for due work in a queue: a moving window over `due_at`.

Why: on some MongoDB-wire servers (the embedded one among them) a query's cost is the number of
index entries in its range, whatever its `limit` (measured: ~4 s for any query over a 200,000-head
range, 60 ms for a one-second slice of it). "Everything due up to now" is then as expensive as the
whole backlog, for every claim. A worker therefore scans a bounded slice of `due_at` starting at its
cursor, and moves the cursor forward as it finds the slices behind it empty.

Nothing is missed, because every write that puts a head in a queue sets `due_at` to the present or
the future (a lease sets it to the lease's end, so a leased head falls due again by itself if its
holder dies). The cursor lags `margin_s` behind what it has seen, to absorb clock skew between
processes; and every `sweep_s` it looks again from the start, as a safety net.

Two kinds of start:
- a shallow queue (the shared lane, receipts, bills) sweeps `[EPOCH, now]` in one query: its backlog
  is small, and nothing needs to be known about it;
- a deep queue (a campaign's lane, up to millions of heads) has a `floor`, the earliest `due_at` any
  of its heads can have (its lane's first write), and is only ever read in slices: a sweep moves the
  cursor back to the floor, and empty slices double in width (up to `max_slice_s`), so crossing an
  empty stretch of hours costs a few probes.
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
    position: datetime | None = None  # None: the next scan is a sweep
    last_sweep: datetime = field(default=EPOCH)
    deep: bool = False
    floor: datetime | None = None  # deep queues: no head is due before this
    max_slice_s: float = 3600.0
    width_s: float = 0.0  # deep queues: the current slice width (grows over empty slices)

    def window(self, now: datetime) -> tuple[datetime, datetime]:
        """The due_at range [lo, hi] to scan now."""
        if self.position is None or now - self.last_sweep >= timedelta(seconds=self.sweep_s):
            if not self.deep:
                self.position = None
                return EPOCH, now
            self.position = self.floor or now - timedelta(seconds=self.margin_s)
            self.width_s = self.slice_s
            self.last_sweep = now
        # The margin absorbs clock skew of heads written just now; deep in a backlog it would only make
        # every slice re-read seconds of heads already taken.
        behind = now - self.position > timedelta(seconds=4 * self.margin_s)
        lo = self.position - timedelta(seconds=0 if self.deep and behind else self.margin_s)
        width = self.width_s if self.deep else self.slice_s
        return lo, min(now, self.position + timedelta(seconds=width))

    def advance(self, now: datetime, hi: datetime, full: bool, last_due: datetime | None) -> bool:
        """Record a scan of [.., hi]. `full`: it returned as many heads as asked for, so more may wait
        at `last_due`. Returns True if the next slice should be scanned right away (this one was
        empty and did not reach `now`)."""
        if self.position is None:
            self.last_sweep = now
        if self.deep:
            self.width_s = self.slice_s if last_due is not None else min(self.max_slice_s, self.width_s * 2)
        if full and last_due is not None:
            self.position = last_due
            return False
        self.position = hi
        return hi < now and last_due is None

    def rewind(self, due: datetime) -> None:
        """Heads up to `due` were used but later ones were fetched and left: look again from `due`."""
        if self.position is not None and due < self.position:
            self.position = due
