"""A fresh replay of the whole event log into a (new) reporting schema.

Used as the reference result in tests, and by `msgcore projections rebuild`: replay into a new
schema, then start a Projector on it (it follows on from the cluster time noted before the scan),
then swap schemas.
"""

from __future__ import annotations

import logging

import psycopg
from pymongo.asynchronous.collection import AsyncCollection

from projections.projector import BatchWriter, ProjectorStats, replay_log
from projections.schema import lock_key, migrate

log = logging.getLogger(__name__)


class ReplayRefused(RuntimeError):
    """The target schema is not a fit target for a fresh replay."""


async def replay_into(
    events_collection: AsyncCollection,
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
