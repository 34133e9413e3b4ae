"""The ports of the event log: what every adapter (MongoDB in core/store/topics.py, owners.py and
timers.py; in memory in core/store/memory.py) promises. tests/contract/ holds the one suite every
adapter must pass; a worker written against these Protocols runs on either.

Vocabulary:
- An *event* is a document `{message_id, seq, type, at, tenant_id, route_id, channel, v, data}`;
  (message_id, seq) is unique in the whole log and an event is never updated or deleted.
- A *topic* is a stage's input: an event handed to a topic carries `topic` and `pos`, its position.
  Positions of a topic are dense (0, 1, 2, ... without holes) and given in commit order.
- A topic's *counter* is its next free position; a *checkpoint* (`"<consumer>|<topic>"`, see
  `topics.checkpoint_id`) is the position below which a consumer has its outcomes in the log.
- An *owner* (e.g. `connector|send:sim`) is held by one holder at a time under a lease; its `epoch`
  (the fencing token) grows by one at every acquire. An *attempt* records, before a side effect, which
  positions an owner is about to act on.
- A *timer* (one per message, `_id` = message id) holds a message until `due_at`.

Errors (core/store/errors.py) are the same for every adapter: `CheckpointMoved`, `Fenced`,
`GapInTopic`, `StoreUnavailable` (nothing written, retry later).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol

from core.store.owners import OpenAttempt, Ownership
from core.store.timers import ReleaseResult
from core.store.topics import CommitResult, ExtraWrites, Redecide, Write

__all__ = ["EventLogPort", "OwnersPort", "TimersPort"]


class EventLogPort(Protocol):
    """The log as the work queue, read by position."""

    async def commit(self, writes: Sequence[Write], *, moves: dict[str, tuple[int, int]] | None = None,
                     fence: tuple[str, int] | None = None, extra: ExtraWrites | None = None,
                     redecide: Redecide | None = None) -> CommitResult:
        """Append `writes` and move checkpoints, as ONE atomic unit.

        - Atomic: the events, the positions they take, the checkpoint moves (`checkpoint id ->
          (from, to)`), the timers (`Write.timer` set, `Write.clear_timer` deleted before) and the
          `extra` writes (`extra(batch) -> [(collection, bulk ops)]`, called with the writes that
          commit) are all written, or none is.
        - Positions: each topic's events take consecutive positions from its counter, in the order of
          `writes` and of `events` within a write. Two commits touching the same topic are
          serialised: commit order is position order, so a reader of [checkpoint, counter) never
          meets a position that commits later. `CommitResult.positions[topic] = (first, end)`.
        - Conflict: a write whose (message_id, seq) is taken already (by an earlier commit or by an
          earlier write of the same batch) loses. Only that message is removed; the rest commits,
          checkpoints included. Without `redecide` its id is reported in `CommitResult.conflicts`;
          with it, `await redecide(lost ids)` (called outside any lock: it may read the log) returns
          replacement writes that join the same commit (not reported as conflicts). Conflicts that
          do not settle within a few rounds raise `StoreUnavailable`.
        - Checkpoints: a move `(from, to)` with `from != to` requires the checkpoint at `from` (a
          missing checkpoint is at 0), else `CheckpointMoved` and nothing is written. `from == to`
          is no move and checks nothing.
        - Fence: with `fence=(owner, epoch)` the commit happens only while `epoch` is the owner's
          current epoch (lease expiry alone does not fence: a takeover does), else `Fenced` and
          nothing is written.
        - `CommitResult.committed`: the message ids written, in order.
        """
        ...

    async def counters(self, topics: Iterable[str]) -> dict[str, int]:
        """Each topic's next free position (0 for a topic never written)."""
        ...

    async def load_checkpoints(self, consumer: str, topics: Iterable[str]) -> dict[str, int]:
        """`consumer`'s checkpoint on each topic (0 when it never moved)."""
        ...

    async def read(self, topic: str, start: int, end: int) -> list[dict[str, Any]]:
        """The events at positions [start, end) of `topic`, by position; [] if `end <= start`.
        A range that is not complete (e.g. reaching past the counter) raises `GapInTopic`: a reader
        never skips a position."""
        ...

    async def load_events(self, message_id: str) -> list[dict[str, Any]]:
        """Every event of one message, by seq ([] for an unknown message)."""
        ...

    async def load_many(self, message_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """Every event of each message, by seq; every asked id is a key ([] when unknown)."""
        ...

    async def sent_by_smsc_ids(self, smsc_ids: Sequence[str]) -> list[dict[str, Any]]:
        """The `sent` events whose `data.smsc_message_ids` holds any of `smsc_ids` (any order;
        events of other types are never returned). An adapter may return only message_id, seq, type, at,
        tenant_id, route_id, channel and data.{smsc_message_ids, route_id, parts, price_per_part,
        currency}: nothing else of them may be relied on."""
        ...


class OwnersPort(Protocol):
    """Owners fenced by epoch, and the attempts they record before a side effect."""

    async def acquire(self, owner: str, holder: str, now: datetime, lease_s: float) -> Ownership | None:
        """Take `owner` when it is new (epoch 1), its lease ended (`lease_until <= now`), or
        `holder` holds it already; the epoch grows by one every time (so a holder's earlier
        `Ownership` is fenced by its own re-acquire). None while another holder's lease runs."""
        ...

    async def renew(self, own: Ownership, now: datetime, lease_s: float) -> Ownership:
        """Extend the lease to `now + lease_s`. Succeeds while `own.epoch` is current, even after
        the lease lapsed if nobody took over; `Fenced` once another acquire bumped the epoch."""
        ...

    async def release(self, own: Ownership, now: datetime) -> None:
        """End the lease at `now` so any holder may acquire at once. A stale `own` changes
        nothing; never raises for a store error (the lease ends by itself)."""
        ...

    async def record_attempt(self, own: Ownership, ranges: dict[str, tuple[int, int]], message_ids: list[str],
                             now: datetime) -> str:
        """Record (atomically with the epoch check) that `own` is about to act on `ranges`
        (topic -> [from, to)) holding `message_ids`; returns the attempt id. `Fenced` and nothing
        written when the epoch is stale. Attempts are never updated: checkpoints resolve them."""
        ...

    async def open_attempts(self, owner: str, checkpoints: dict[str, int]) -> list[OpenAttempt]:
        """The parts of `owner`'s attempts that reach past the checkpoints (one `OpenAttempt` per
        attempt and topic, `start` raised to the checkpoint), oldest attempt first. A topic missing
        from `checkpoints` is read from the log, consumer = the part of `owner` before `|`."""
        ...

    async def forget_resolved(self, owner: str, checkpoints: dict[str, int], keep: int = 100) -> int:
        """Delete attempts whose every range ends at or below its checkpoint (a topic missing from
        `checkpoints` keeps the attempt), sparing the newest `keep`; returns how many."""
        ...


class TimersPort(Protocol):
    """Messages that wait for a time. Timers are written by `EventLogPort.commit` (`Write.timer`)."""

    async def due(self, now: datetime, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` timers with `due_at <= now`, earliest first (each with `_id` = message id)."""
        ...

    async def count(self, query: dict[str, Any] | None = None) -> int:
        """How many timers match `query` (equality on top-level fields; all when None)."""
        ...

    async def any_for_lane(self, lane: str) -> bool:
        """Whether a timer waits in `lane`."""
        ...

    async def release_due(self, now: datetime, limit: int, suspended: Callable[[str], bool],
                          canceling: Collection[str] = ()) -> ReleaseResult:
        """Release up to `limit` due timers: for each, a `released` event (seq = timer seq + 1) into
        the timer's topic and the timer deleted, in one commit. Released exactly once: a concurrent
        releaser (or anything that took seq + 1 meanwhile) loses on (message_id, seq), and such a
        timer is dropped as `obsolete`. A timer whose tenant is `suspended` is `postponed` to
        `now + timers.HOLD_S` instead, with no event, unless its `lane` is in `canceling` (released:
        the stage reading it cancels it, so a canceled campaign of a suspended tenant completes)."""
        ...
