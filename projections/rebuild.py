"""`msgcore projections rebuild`: replay the whole log into a shadow schema and swap it in, live.

Steps (traffic keeps flowing throughout; BI readers keep reading the live schema until the swap):

1. Take the rebuild lock (one rebuild per schema at a time) and drop shadow schemas that an
   earlier, interrupted rebuild left behind.
2. Replay the log into a new schema `<schema>_rebuild_<ts>` (migrated first). The replay notes the
   cluster time and wall-clock time before it scans, and stores them as the shadow's checkpoint.
3. Run a Projector on the shadow: it opens the change stream at that cluster time and runs its
   catch-up scan (projections/catchup.py), so it ends up following the live log. Wait until it
   has caught up: the newest event in the log (by `_id`) is in the shadow.
4. Stop the live projector by taking its advisory lock (`lock_key("projection", <schema>, name)`):
   the session holding it is terminated (`pg_terminate_backend`; needs superuser, the same role, or
   `pg_signal_backend`). The live Projector treats the lost connection as transient, reconnects and
   finds the lock taken, so it waits as a hot standby; other standbys do the same. Without
   `stop_live` the rebuild waits for the lock to be released instead.
5. Holding that lock, wait until the shadow has caught up again, stop the shadow projector (its
   last batch and checkpoint are committed), then in ONE transaction rename `<schema>` to
   `<schema>_old_<ts>` and the shadow to `<schema>`, and copy the grants of the old schema and of
   its tables/views to their namesakes in the new one (so a BI role keeps working). Earlier
   `<schema>_old_*` schemas are dropped just before (an old schema is kept until the next rebuild).
6. Release the lock. The standby live projector takes it, loads the checkpoint of the schema now
   called `<schema>` -- the shadow's, which moved with it -- and resumes from its resume token,
   followed by a catch-up scan from its `scan_from`: whatever committed between the shadow stopping
   and the takeover is applied, nothing twice (idempotent inserts). A projector started later
   does the same. No restart is needed.

Why the live projector must be stopped before the swap: it resolves the schema name on every
statement, so after the rename it would write its own batches and its (different) resume token
into the swapped-in schema; a token ahead of the shadow's would skip events.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from core.store.change_feed import ChangeFeed, EventsCollection, as_feed
from projections.replay import replay_log
from projections.runner import Projector
from projections.schema import lock_key, migrate
from projections.status import lock_holder
from projections.writer import BatchWriter, ProjectorStats

log = logging.getLogger(__name__)

MAX_IDENT = 63
_TS_FORMAT = "%Y%m%dt%H%M%S"
_TS_RE = "[0-9]{8}t[0-9]{6}"


class RebuildError(RuntimeError):
    """The rebuild cannot proceed; the message says why and what to do."""


@dataclass
class RebuildResult:
    schema: str
    shadow: str
    old_schema: str | None  # None: there was no live schema to keep
    replayed: int  # events applied by the replay
    followed: int  # events applied by the shadow projector afterwards
    dropped: list[str] = field(default_factory=list)  # earlier _old_ / leftover _rebuild_ schemas
    stopped_live: list[int] = field(default_factory=list)  # pids of projector sessions terminated
    seconds: float = 0.0


ReplayProgress = Callable[[int, int], None]  # (events read so far, estimated total)
PhaseCallback = Callable[[str], None]


def shadow_names(schema: str, now: datetime) -> tuple[str, str]:
    """(`<schema>_rebuild_<ts>`, `<schema>_old_<ts>`); RebuildError if too long for PostgreSQL."""
    ts = now.astimezone(UTC).strftime(_TS_FORMAT)
    shadow, old = f"{schema}_rebuild_{ts}", f"{schema}_old_{ts}"
    if len(shadow) > MAX_IDENT:
        raise RebuildError(f"schema name {schema!r} is too long for a shadow schema (at most {MAX_IDENT - 24} chars)")
    return shadow, old


async def schemas_matching(conn: psycopg.AsyncConnection, schema: str, kind: str) -> list[str]:
    """Schemas named `<schema>_<kind>_<ts>`, oldest first."""
    pattern = f"^{re.escape(schema)}_{kind}_{_TS_RE}$"
    cur = await conn.execute("SELECT nspname FROM pg_namespace WHERE nspname ~ %s ORDER BY nspname", (pattern,))
    return [r[0] for r in await cur.fetchall()]


def _set_lock_timeout(seconds: float) -> sql.Composed:
    return sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(seconds * 1000)}ms"))


def _rename(old: str, new: str) -> sql.Composed:
    return sql.SQL("ALTER SCHEMA {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new))


async def _drop_schema(conn: psycopg.AsyncConnection, name: str, lock_timeout_s: float) -> bool:
    try:
        async with conn.transaction():
            await conn.execute(_set_lock_timeout(lock_timeout_s))
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    except psycopg.errors.LockNotAvailable:
        log.warning("rebuild: schema %s is in use (lock timeout); kept, drop it later by hand", name)
        return False
    log.info("rebuild: dropped schema %s", name)
    return True


async def _try_lock(conn: psycopg.AsyncConnection, key: int) -> bool:
    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (key,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def take_projector_lock(
    conn: psycopg.AsyncConnection, key: int, *, stop_live: bool, timeout_s: float, poll_s: float = 0.05
) -> list[int]:
    """Take the session advisory lock `key` on `conn`; with `stop_live`, terminate whoever holds it.

    Returns the pids terminated. Raises RebuildError after `timeout_s`.
    """
    terminated: list[int] = []
    own = conn.info.backend_pid
    deadline = time.monotonic() + timeout_s
    while not await _try_lock(conn, key):
        if time.monotonic() > deadline:
            raise RebuildError(
                f"could not take the live projector's lock {key} within {timeout_s:.0f}s"
                + ("" if stop_live else ": stop the running `msgcore projector`, or allow stopping it")
            )
        holder = await lock_holder(conn, key)
        if stop_live and holder is not None and holder.pid != own:
            log.info("rebuild: stopping the live projector: terminating session pid %d (%s) holding lock %d",
                     holder.pid, holder.application_name, key)
            await conn.execute("SELECT pg_terminate_backend(%s)", (holder.pid,))
            terminated.append(holder.pid)
        await asyncio.sleep(poll_s)
    log.info("rebuild: holding the live projector's lock %d", key)
    return terminated


# --- replay with progress -------------------------------------------------------------------------


async def replay_shadow(
    events: EventsCollection | ChangeFeed,
    pg_url: str,
    shadow: str,
    *,
    name: str,
    batch_size: int,
    progress: ReplayProgress | None,
    progress_every_s: float = 0.2,
) -> ProjectorStats:
    """`projections.replay.replay_into` for a brand-new schema, reporting progress as it goes.

    The same steps (migrate, take the shadow's projector lock, `replay_log`), with the stats object
    visible so that a progress bar can follow it.
    """
    stats = ProjectorStats()
    estimate = await as_feed(events).estimated_count()
    writer = BatchWriter(shadow, name)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await migrate(conn, shadow)
        if not await _try_lock(conn, lock_key("projection", shadow, name)):
            raise RebuildError(f"schema {shadow}: another process holds its projector lock")
        await writer.prepare(conn)
        if await writer.load_checkpoint(conn) is not None:
            raise RebuildError(f"schema {shadow} already has a checkpoint: not a fresh shadow")
        task = asyncio.create_task(replay_log(events, conn, writer, batch_size=batch_size, stats=stats))
        while not task.done():
            if progress is not None:
                progress(stats.received, max(estimate, stats.received))
            await asyncio.wait({task}, timeout=progress_every_s)
        await task
    if progress is not None:
        progress(stats.received, stats.received)
    log.info("rebuild: replayed %d events into %s", stats.applied, shadow)
    return stats


# --- following and catching up ----------------------------------------------------------------------


async def _has_event(pg_url: str, schema: str, message_id: str, seq: int) -> bool:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT 1 FROM {}.message_events WHERE message_id = %s AND seq = %s").format(
                sql.Identifier(schema)), (message_id, seq))
        return await cur.fetchone() is not None


async def wait_caught_up(
    events: EventsCollection | ChangeFeed, projector: Projector, task: asyncio.Task[None], pg_url: str, *,
    timeout_s: float,
    poll_s: float = 0.1,
) -> None:
    """Until `projector` has finished its catch-up scan and holds the newest event of the log as it
    was when this call started (by `_id`). Raises the projector's error if it stopped."""
    deadline = time.monotonic() + timeout_s
    newest = await as_feed(events).newest_event()
    while True:
        if task.done():
            task.result()  # raises the projector's error
            raise RebuildError(f"the shadow projector on {projector.schema} stopped unexpectedly")
        st = projector.stats
        if st.active and not st.catchup_pending and st.catchups_done >= 1 and (
            newest is None or await _has_event(pg_url, projector.schema, newest["message_id"], newest["seq"])
        ):
            return
        if time.monotonic() > deadline:
            raise RebuildError(f"the shadow projector on {projector.schema} did not catch up within {timeout_s:.0f}s")
        await asyncio.sleep(poll_s)


# --- the swap -----------------------------------------------------------------------------------------

_ACLS = """
SELECT c.relname, a.privilege_type, r.rolname, a.is_grantable
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL aclexplode(c.relacl) a JOIN pg_roles r ON r.oid = a.grantee
WHERE n.nspname = %s AND c.relkind IN ('r', 'v', 'm', 'p', 'S') AND a.grantee <> c.relowner
"""
_SCHEMA_ACLS = """
SELECT a.privilege_type, r.rolname, a.is_grantable
FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a JOIN pg_roles r ON r.oid = a.grantee
WHERE n.nspname = %s AND a.grantee <> n.nspowner
"""
# ALTER DEFAULT PRIVILEGES ... IN SCHEMA: kept per schema (by oid), so they are copied too.
_DEFAULT_ACLS = """
SELECT o.rolname, CASE d.defaclobjtype WHEN 'r' THEN 'TABLES' ELSE 'SEQUENCES' END,
       a.privilege_type, r.rolname, a.is_grantable
FROM pg_default_acl d JOIN pg_namespace n ON n.oid = d.defaclnamespace JOIN pg_roles o ON o.oid = d.defaclrole
CROSS JOIN LATERAL aclexplode(d.defaclacl) a JOIN pg_roles r ON r.oid = a.grantee
WHERE n.nspname = %s AND d.defaclobjtype IN ('r', 'S')
"""


async def _copy_grants(conn: psycopg.AsyncConnection, old: str, new: str) -> int:
    """Grant on `new` (schema, its relations by name, default privileges) what `old` granted to other roles."""
    grants: list[sql.Composed] = []
    cur = await conn.execute(_SCHEMA_ACLS, (old,))
    for priv, role, grantable in await cur.fetchall():
        grants.append(sql.SQL("GRANT {} ON SCHEMA {} TO {}{}").format(
            sql.SQL(priv), sql.Identifier(new), sql.Identifier(role),
            sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    cur = await conn.execute(_ACLS, (old,))
    for rel, priv, role, grantable in await cur.fetchall():
        grants.append(sql.SQL("GRANT {} ON {} TO {}{}").format(
            sql.SQL(priv), sql.Identifier(new, rel), sql.Identifier(role),
            sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    cur = await conn.execute(_DEFAULT_ACLS, (old,))
    for owner, objtype, priv, role, grantable in await cur.fetchall():
        grants.append(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT {} ON {} TO {}{}").format(
            sql.Identifier(owner), sql.Identifier(new), sql.SQL(priv), sql.SQL(objtype), sql.Identifier(role),
            sql.SQL(" WITH GRANT OPTION" if grantable else "")))
    for grant in grants:
        try:
            async with conn.transaction():  # a savepoint: a relation missing in `new` is skipped
                await conn.execute(grant)
        except psycopg.errors.UndefinedTable:
            log.warning("rebuild: grant not copied (no such relation in %s): %s", new, grant.as_string(conn))
    return len(grants)


async def _schema_exists(conn: psycopg.AsyncConnection, name: str) -> bool:
    cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,))
    return await cur.fetchone() is not None


async def swap_schemas(
    conn: psycopg.AsyncConnection, schema: str, shadow: str, old: str, *, lock_timeout_s: float = 10.0
) -> str | None:
    """In one transaction: `schema` -> `old` (if it exists), `shadow` -> `schema`, grants copied.

    The caller holds the live projector's lock. Returns the old schema's name, or None.
    """
    async with conn.transaction():
        await conn.execute(_set_lock_timeout(lock_timeout_s))
        # Serialise with `migrate` on either name.
        for name in sorted((schema, shadow)):
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("migrate", name),))
        had_live = await _schema_exists(conn, schema)
        if had_live:
            await conn.execute(_rename(schema, old))
        await conn.execute(_rename(shadow, schema))
        copied = await _copy_grants(conn, old, schema) if had_live else 0
    log.info("rebuild: swapped schema %s in (was %s); previous kept as %s; %d grant(s) copied",
             schema, shadow, old if had_live else "-", copied)
    return old if had_live else None


# --- the whole rebuild --------------------------------------------------------------------------------


@dataclass
class _Run:
    events: EventsCollection | ChangeFeed
    pg_url: str
    schema: str
    name: str
    shadow: str
    old: str
    phase: PhaseCallback
    catch_up_timeout_s: float


async def _follow_and_swap(run: _Run, result: RebuildResult, lock_conn: psycopg.AsyncConnection,
                           *, stop_live: bool, lock_timeout_s: float, batch_size: int) -> None:
    stop = asyncio.Event()
    shadow_projector = Projector(run.events, run.pg_url, run.shadow, name=run.name, batch_size=batch_size,
                                 batch_wait_s=0.1, standby_poll_s=0.2)
    task = asyncio.create_task(shadow_projector.run(stop), name=f"shadow-projector-{run.shadow}")
    try:
        run.phase(f"catching up with the live log in {run.shadow}")
        await wait_caught_up(run.events, shadow_projector, task, run.pg_url, timeout_s=run.catch_up_timeout_s)
        run.phase(f"stopping the live projector of {run.schema} (taking its lock)")
        result.stopped_live = await take_projector_lock(
            lock_conn, lock_key("projection", run.schema, run.name), stop_live=stop_live, timeout_s=lock_timeout_s)
        run.phase("final catch-up")
        await wait_caught_up(run.events, shadow_projector, task, run.pg_url, timeout_s=run.catch_up_timeout_s)
    finally:
        stop.set()
        await task  # its last batch and checkpoint are committed when this returns
    result.followed = shadow_projector.applied
    for name in await schemas_matching(lock_conn, run.schema, "old"):
        if await _drop_schema(lock_conn, name, lock_timeout_s=10.0):
            result.dropped.append(name)
    run.phase(f"swapping {run.shadow} in as {run.schema}")
    result.old_schema = await swap_schemas(lock_conn, run.schema, run.shadow, run.old)


async def rebuild(
    events: EventsCollection | ChangeFeed,
    pg_url: str,
    schema: str,
    *,
    name: str = "reporting",
    batch_size: int = 1000,
    stop_live: bool = True,
    lock_timeout_s: float = 60.0,
    catch_up_timeout_s: float = 600.0,
    progress: ReplayProgress | None = None,
    phase: PhaseCallback | None = None,
    now: datetime | None = None,
) -> RebuildResult:
    """Replay the log into a shadow of `schema` and swap it in while traffic continues (module doc).

    On failure before the swap, the live schema is untouched and the shadow is left for the next
    rebuild to drop; the live projector (if it was stopped) resumes as soon as the lock is released.
    """
    started = time.monotonic()
    shadow, old = shadow_names(schema, now or datetime.now(UTC))

    def say(text: str) -> None:
        log.info("rebuild of %s: %s", schema, text)
        if phase is not None:
            phase(text)

    async with await psycopg.AsyncConnection.connect(
        pg_url, autocommit=True, application_name=f"msgcore-rebuild {schema}"[:63]
    ) as lock_conn:
        if not await _try_lock(lock_conn, lock_key("rebuild", schema, name)):
            raise RebuildError(f"another `msgcore projections rebuild` of schema {schema} is running")
        result = RebuildResult(schema=schema, shadow=shadow, old_schema=None, replayed=0, followed=0)
        for leftover in await schemas_matching(lock_conn, schema, "rebuild"):
            if await _drop_schema(lock_conn, leftover, lock_timeout_s=10.0):
                result.dropped.append(leftover)
        say(f"replaying the log into {shadow}")
        stats = await replay_shadow(events, pg_url, shadow, name=name, batch_size=batch_size, progress=progress)
        result.replayed = stats.applied
        run = _Run(events, pg_url, schema, name, shadow, old, say, catch_up_timeout_s)
        await _follow_and_swap(run, result, lock_conn, stop_live=stop_live, lock_timeout_s=lock_timeout_s,
                               batch_size=batch_size)
    # Closing lock_conn released the live projector's lock: a waiting projector resumes on the new schema.
    result.seconds = time.monotonic() - started
    say(f"done in {result.seconds:.1f}s: {result.replayed} events replayed, {result.followed} followed; "
        f"previous schema kept as {result.old_schema or '-'}")
    return result
