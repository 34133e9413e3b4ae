"""The reporting projector: follows the `events` log into the PostgreSQL reporting tables.

This module is the package's front door; each job lives in its own module:

- `projections.rows`: event document -> row (`event_row`), the only reader of the document shape;
- `projections.writer`: `BatchWriter`, one PostgreSQL transaction per batch holding the rows of
  `messages`, `message_events`, `daily_stats`, `billing_ledger`, `inbound` AND the checkpoint;
- `projections.replay`: a fresh replay of the whole log (`replay_log`, `replay_into`);
- `projections.catchup`: the catch-up scan after every (re)open of the change stream, and why;
- `projections.runner`: `Projector`, the change-stream loop, advisory lock, resume and back-off.

Import from here or from those modules; the names below are the stable ones.
"""

from __future__ import annotations

from projections.catchup import CatchUp, id_time, newest_id_time, wall_now
from projections.replay import cluster_time_now, replay_log
from projections.rows import ROW_COLUMNS, UnprojectableEvent, dedupe_rows, event_row
from projections.runner import (
    REBUILD_HINT,
    TRANSIENT_ERRORS,
    ChangeStreamInvalidated,
    Projector,
    ResumeTokenLost,
)
from projections.writer import (
    FACTLESS_TYPES,
    STATE_OF_TYPE,
    STATELESS_TYPES,
    BatchWriter,
    Checkpoint,
    ProjectorStats,
    apply_events,
    int_to_ts,
    ts_to_int,
)

__all__ = [
    "FACTLESS_TYPES",
    "REBUILD_HINT",
    "ROW_COLUMNS",
    "STATELESS_TYPES",
    "STATE_OF_TYPE",
    "TRANSIENT_ERRORS",
    "BatchWriter",
    "CatchUp",
    "ChangeStreamInvalidated",
    "Checkpoint",
    "Projector",
    "ProjectorStats",
    "ResumeTokenLost",
    "UnprojectableEvent",
    "apply_events",
    "cluster_time_now",
    "dedupe_rows",
    "event_row",
    "id_time",
    "int_to_ts",
    "newest_id_time",
    "replay_log",
    "ts_to_int",
    "wall_now",
]
