"""A fresh replay of the whole event log into a (new) reporting schema.

`replay_log` scans `events` in (message_id, seq) order through the batch writer; the projector
runs it when its schema has no checkpoint yet. `replay_into` is the stand-alone form, used as the
reference result in tests and by `msgcore projections rebuild`: replay into a new schema, then start
a Projector on it (it follows on from the cluster time noted before the scan), then swap schemas.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

import psycopg

from core.store.change_feed import ChangeFeed, ClusterTime, EventsCollection, as_feed
from projections.catchup import wall_now
from projections.rows import event_row
from projections.schema import lock_key, migrate
from projections.writer import BatchWriter, ProjectorStats

log = logging.getLogger(__name__)


async def cluster_time_now(events: EventsCollection | ChangeFeed) -> ClusterTime:
    """The server's current cluster time (a change stream started here misses nothing after it)."""
    return await as_feed(events).cluster_time_now()


async def replay_log(
    events: EventsCollection | ChangeFeed,
    conn: psycopg.AsyncConnection,
    writer: BatchWriter,
    *,
    batch_size: int = 1000,
    stats: ProjectorStats | None = None,
    start: ClusterTime | None = None,
    started_at: datetime | None = None,
) -> ClusterTime:
    """Scan the whole log into the writer's schema; return the cluster time noted before the scan.

    `start`, if given, is a cluster time the caller noted before anything else it did (e.g.
    before opening its change stream); otherwise it is noted here. The checkpoint then holds that
    cluster time (and no token), so a change stream opened at it sees everything inserted during
    or after the scan; the overlap is absorbed by the idempotent inserts. Until the last batch
    commits the checkpoint says "replay in progress", so a crash in the middle restarts the replay
    (harmlessly) instead of following from a half-built state. `started_at` is the wall-clock
    time noted together with `start` (by the caller, or here): it becomes the checkpoint's
    `scan_from`, since every event the scan may have missed was committed after it.
    """
    feed = as_feed(events)
    if start is None:
        started_at = wall_now()
        start = await feed.cluster_time_now()
    elif started_at is None:
        raise ValueError("replay_log: `started_at` must come with `start`")
    log.info("projection %s schema %s: replaying the log (cluster time %s)", writer.name, writer.schema, start)
    stats = stats if stats is not None else ProjectorStats()
    async for page in feed.scan_all(batch_size):
        await _write_replay_batch(conn, writer, [event_row(doc) for doc in page], stats)
    await writer.save_checkpoint(conn, None, start, scan_from=started_at)
    log.info("projection %s schema %s: replay done, %d events applied", writer.name, writer.schema, stats.applied)
    return start


async def _write_replay_batch(
    conn: psycopg.AsyncConnection, writer: BatchWriter, rows: list[tuple[Any, ...]], stats: ProjectorStats
) -> None:
    applied = await writer.write(conn, rows)
    stats.received += len(rows)
    stats.applied += applied
    if rows:
        stats.batches += 1
        stats.saw(max(r[3] for r in rows))


class ReplayRefused(RuntimeError):
    """The target schema is not a fit target for a fresh replay."""


async def replay_into(
    events_collection: EventsCollection | ChangeFeed,
    pg_url: str,
    schema: str,
    *,
    name: str = "reporting",
    batch_size: int = 1000,
) -> ProjectorStats:
    """Replay every event of `events_collection` into `schema` (created/migrated); return counters.

    On return the schema holds the log as of the cluster time noted before the scan (and possibly a
    little more), and its checkpoint holds that cluster time and the matching wall-clock time as
    `scan_from`, so a `Projector` with the same `name` continues from there without a gap (its
    catch-up scan covers whatever its change stream, opened at that cluster time, fails to deliver).
    Refused (ReplayRefused) when the projection already has a checkpoint in `schema` or another
    process holds its lock: replaying into a live schema is not a fresh replay. An interrupted
    replay may simply be run again.
    """
    writer = BatchWriter(schema, name)
    key = lock_key("projection", schema, name)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await migrate(conn, schema)
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
        row = await cur.fetchone()
        if row is None or not row[0]:
            raise ReplayRefused(f"projection {name} schema {schema}: a projector holds its lock")
        # The lock is released when the connection closes.
        await writer.prepare(conn)
        if await writer.load_checkpoint(conn) is not None:
            raise ReplayRefused(f"projection {name} schema {schema}: already has a checkpoint")
        stats = ProjectorStats()
        await replay_log(events_collection, conn, writer, batch_size=batch_size, stats=stats)
        log.info("projection %s schema %s: fresh replay applied %d events", name, schema, stats.applied)
        return stats
