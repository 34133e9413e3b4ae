"""`msgcore verify`: nothing lost, nothing sent twice unknowingly, nothing billed twice.

The event log is the truth; every other document is checked against it. The checks:

1. topics: every topic is gapless: positions 0 .. counter-1 each held by exactly one event, none at
   or past the counter (`topic_gap`, `position_twice`, `position_beyond_counter`), and no checkpoint
   ahead of its topic's counter (`checkpoint_ahead`).
2. checkpoints: every position below a consumer's checkpoint has its outcome: the message has a later
   event than the entry's seq, or (the router holding a suspended tenant's message) a timer for that
   very seq (`no_outcome`).
3. attempts: every attempt document whose range reaches past its consumer's checkpoint is listed with
   its owner, epoch and age: as a note while younger than `stale_after_s` (in flight), else as
   `attempt_unresolved` (no owner resolved it: is a connector running?).
4. messages: each message's seqs are 1..n, each once, and its events fold without error
   (`core.domain.message.fold`; `fold_failed`); no message is billed twice (`billed_twice`) and none
   that was sent and ended is unbilled (`unbilled`). Each is finished (a terminal state) or waits
   legitimately: in a topic backlog (at or past the consumer's checkpoint), on a timer for its last
   seq, or sent and awaiting a receipt until its `expires_at`. Waiting longer than `stale_after_s`
   past its due time (a paused or suspended lane excepted) is `stuck`; in no topic backlog and on no
   timer is `stuck` too.
5. duplicates: `sent` events marked `possible_duplicate` are notes (explained); a second `sent` of a
   message with neither that mark nor a `retry` (e.g. OUTCOME_UNKNOWN) or `requeued` since the
   previous `sent` is a discrepancy (`duplicate_sent`).
6. money: each tenant's `spent_minor` equals the sum of its `billed` amounts (`spend_mismatch`).
7. reporting (with PostgreSQL): every event is in `{schema}.message_events` exactly once (same seq and
   type) and nothing else is there; every `{schema}.messages` row agrees with the events projected for
   it; `{schema}.daily_stats` equals its recount. Events newer than `VerifyReport.pending_after` may
   be missing without fault (`not_yet_projected`).

Consistency without a global snapshot, by read order: checkpoints are read before counters, counters
before the events (a checkpoint or counter only grows, and the events below it committed with it), the
tenants' spend before and after the scan (the billed sum the scan sees must lie between). A message that
looks wrong is read again, events and timer in one snapshot transaction, before it is reported (it may
have moved on during the scan: counted as `in_motion`). PostgreSQL is read in one REPEATABLE READ
snapshot taken before MongoDB is read.

Memory stays flat in the number of messages: the events (sorted by message_id, seq), the timers (by
_id), `message_events` and `messages` (server-side cursors, by message_id in byte order) are merged
message by message; topics are read one at a time by position. What is held whole is small: counters,
checkpoints, lanes, tenants, attempts.

The modules, by check: `topics` (1), `messages` (2, 4, 5), `attempts` (3), `billing` (6),
`reporting` (7); `snapshot` reads the small documents first, `streams` the sorted streams, `run`
merges them, `report` holds the result types.
"""

from ops.verify.attempts import check_attempts
from ops.verify.messages import judge
from ops.verify.report import DEFAULT_LAG_GRACE_S, DEFAULT_STALE_AFTER_S, Discrepancy, VerifyError, VerifyReport
from ops.verify.run import verify
from ops.verify.snapshot import LogSnapshot, read_snapshot
from ops.verify.topics import check_topics

__all__ = [
    "DEFAULT_LAG_GRACE_S",
    "DEFAULT_STALE_AFTER_S",
    "Discrepancy",
    "LogSnapshot",
    "VerifyError",
    "VerifyReport",
    "check_attempts",
    "check_topics",
    "judge",
    "read_snapshot",
    "verify",
]
