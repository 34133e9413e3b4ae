"""The projector's runner: follows the `events` change stream into the reporting tables.

One active projector per (schema, projection name): it holds a session-level advisory lock on the
same connection it writes with, so losing that connection loses the lock and the ability to write
at the same instant (no window in which two projectors write). Others wait as hot standbys.

A session: connect to PostgreSQL, migrate the schema, take the lock, then either replay the whole
log (no checkpoint yet, `projections.replay`) or open the change stream at the checkpoint and
schedule a catch-up scan (`projections.catchup`); then follow: each batch of changes (or page of
the scan) is one transaction of `projections.writer.BatchWriter`, rows and checkpoint together.
Transient errors end the session and a new one resumes from the checkpoint; anything else (a lost
resume token, an unprojectable event, a dropped collection) stops the projector for an operator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import psycopg

from core import metrics
from core.aio import sleep_or_stop
from core.store.change_feed import (
    Change,
    ChangeFeed,
    EventsCollection,
    FeedStream,
    as_feed,
    id_bound,
    id_bound_time,
    newest_id_time,
    ts_datetime,
)
from core.store.errors import HistoryLost, StoreUnavailable
from projections.catchup import CatchUp, wall_now
from projections.replay import cluster_time_now, replay_log
from projections.rows import UnprojectableEvent, event_row
from projections.schema import lock_key, migrate
from projections.writer import BatchWriter, Checkpoint, ProjectorStats

log = logging.getLogger(__name__)

REBUILD_HINT = "run `msgcore projections rebuild` to replay the log into a new schema and swap it in"
_MIN_BACKOFF_S = 0.5
# Errors worth a reconnect: the stores went away or a transaction lost a race. Everything else
# (bad data, lost resume token, a bug) stops the projector.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StoreUnavailable, psycopg.OperationalError)


class ResumeTokenLost(RuntimeError):
    """The checkpoint's position is no longer in the oplog: following on would skip events."""

    def __init__(self, schema: str, projection: str, detail: str) -> None:
        super().__init__(
            f"projection {projection!r} in schema {schema!r}: its resume point is no longer in the "
            f"MongoDB oplog ({detail}); refusing to skip events: {REBUILD_HINT}"
        )
        self.schema = schema
        self.projection = projection


class ChangeStreamInvalidated(RuntimeError):
    """The change stream ended (e.g. the `events` collection was dropped or renamed)."""


class Projector:
    """Follows `events` into the reporting tables of `schema` until stopped.

    `run()` retries transient MongoDB/PostgreSQL errors with back-off, resuming from the stored
    checkpoint; it raises ResumeTokenLost, UnprojectableEvent or ChangeStreamInvalidated, which
    need an operator. A batch closes at `batch_size` events or after `batch_wait_s` (1 s: a batch's
    SQL costs as much CPU as hundreds of events, so the reporting tables trail by about a second).
    """

    def __init__(
        self,
        events: EventsCollection | ChangeFeed,
        pg_url: str,
        schema: str,
        *,
        name: str = "reporting",
        batch_size: int = 1000,
        batch_wait_s: float = 1.0,
        checkpoint_interval_s: float = 5.0,
        standby_poll_s: float = 1.0,
        max_backoff_s: float = 30.0,
        catchup_margin_s: float = 300.0,
    ) -> None:
        self.feed = as_feed(events)
        self.events = self.feed.events
        self.pg_url = pg_url
        self.schema = schema
        self.name = name
        self.batch_size = batch_size
        self.batch_wait_s = batch_wait_s
        self.checkpoint_interval_s = checkpoint_interval_s
        self.standby_poll_s = standby_poll_s
        self.max_backoff_s = max_backoff_s
        self.catchup_margin = timedelta(seconds=catchup_margin_s)
        self.stats = ProjectorStats()
        self._writer = BatchWriter(schema, name)
        self._write = metrics.timed(metrics.PROJECTOR_BATCH_SECONDS, self._writer.write)  # one per batch
        self._lock_key = lock_key("projection", schema, name)
        self._backoff_s = _MIN_BACKOFF_S
        # The checkpoint's scan_from as this session knows it (it alone writes the checkpoint).
        self._scan_from: datetime | None = None
        self._catchup: CatchUp | None = None
        self._largest_reply = 0  # changes in the largest reply of a round trip seen so far

    @property
    def applied(self) -> int:
        return self.stats.applied

    @property
    def batches(self) -> int:
        return self.stats.batches

    @property
    def last_event_at(self) -> datetime | None:
        return self.stats.last_event_at

    async def run(self, stop: asyncio.Event) -> None:
        """Project until `stop` is set. Transient errors are retried; fatal ones are raised."""
        while not stop.is_set():
            try:
                await self._session(stop)
                return
            except TRANSIENT_ERRORS as e:
                backoff = self._backoff_s
                # Doubling until a session gets as far as the lock again (which resets it).
                self._backoff_s = min(backoff * 2, self.max_backoff_s)
                self.stats.active = False
                log.warning(
                    "projection %s schema %s: %s: %s; reconnecting in %.1fs",
                    self.name, self.schema, type(e).__name__, e, backoff,
                )  # fmt: skip
                await sleep_or_stop(stop, backoff)
            except asyncio.CancelledError:
                self.stats.active = self.stats.standby = False
                raise
            except Exception:
                self.stats.active = self.stats.standby = False
                log.exception("projection %s schema %s: stopped", self.name, self.schema)
                raise
        self.stats.active = self.stats.standby = False

    async def _session(self, stop: asyncio.Event) -> None:
        # application_name lets an operator (or a test) find this session in pg_stat_activity.
        app_name = f"msgcore-projector {self.name} {self.schema}"[:63]
        async with await psycopg.AsyncConnection.connect(
            self.pg_url, autocommit=True, application_name=app_name
        ) as conn:
            await migrate(conn, self.schema)
            if not await self._acquire_lock(conn, stop):
                return
            try:
                await self._writer.prepare(conn)
                self._catchup = None
                checkpoint = await self._writer.load_checkpoint(conn)
                if checkpoint is None:
                    stream = await self._replay_then_stream(conn)
                else:
                    self._scan_from = self._initial_scan_from(checkpoint)
                    opened_at = wall_now()
                    stream = await self._open_stream(checkpoint)
                    self._start_catchup(opened_at)
                async with stream:
                    await self._follow(conn, stream, stop)
            finally:
                self.stats.active = False
                self.stats.catchup_pending = False
                self._catchup = None
        # Closing the connection released the advisory lock; a standby takes over.

    async def _acquire_lock(self, conn: psycopg.AsyncConnection, stop: asyncio.Event) -> bool:
        """Wait (as hot standby) until this projector holds the lock; False if stopped first."""
        announced = False
        while not stop.is_set():
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (self._lock_key,))
            row = await cur.fetchone()
            if row is not None and row[0]:
                self.stats.active, self.stats.standby = True, False
                self._backoff_s = _MIN_BACKOFF_S
                log.info("projection %s schema %s: active (lock %d held)", self.name, self.schema, self._lock_key)
                return True
            self.stats.standby = True
            if not announced:
                log.info(
                    "projection %s schema %s: another projector holds lock %d; standing by",
                    self.name, self.schema, self._lock_key,
                )  # fmt: skip
                announced = True
            await sleep_or_stop(stop, self.standby_poll_s)
        return False

    async def _replay_then_stream(self, conn: psycopg.AsyncConnection) -> FeedStream:
        """Replay the existing log, returning a change stream that continues without a gap.

        The stream is opened (at "now") BEFORE the scan rather than afterwards at the noted
        cluster time: everything committed before the open is seen by the scan, everything after
        by the stream, and the overlap is absorbed by the idempotent inserts. Opening at a past
        cluster time makes the server search its oplog, and SecantusDB 0.7.0b3 was seen to return
        an empty first batch whose postBatchResumeToken had moved past inserts that committed
        during that search; a stream opened at "now" has no such window.
        """
        started_at = wall_now()
        start = await cluster_time_now(self.feed)
        stream = await self._open_stream(Checkpoint(None, None, 0))
        try:
            await replay_log(
                self.feed, conn, self._writer,
                batch_size=self.batch_size, stats=self.stats, start=start, started_at=started_at,
            )  # fmt: skip
        except BaseException:
            await stream.close()
            raise
        self._scan_from = started_at
        return stream

    def _initial_scan_from(self, checkpoint: Checkpoint) -> datetime | None:
        """The catch-up scan's lower bound (before the margin); None scans the whole log."""
        if checkpoint.scan_from is not None:
            return checkpoint.scan_from
        if checkpoint.cluster_time is not None:
            # A checkpoint written before scan_from existed: the cluster time of the newest applied
            # change (or of a replay's start) is a commit time on the server's clock.
            return ts_datetime(checkpoint.cluster_time)
        log.warning(
            "projection %s schema %s: checkpoint has no scan_from nor cluster time; the catch-up scan "
            "reads the whole log once", self.name, self.schema,
        )  # fmt: skip
        return None

    def _start_catchup(self, opened_at: datetime) -> None:
        """Schedule a scan of everything that may have committed since the checkpoint.

        Called once the change stream is open (again): what commits from now on, the stream
        delivers; what committed before, the scan finds (it runs after this point).
        """
        lo = None if self._scan_from is None else id_bound(self._scan_from - self.catchup_margin)
        if self._catchup is not None:
            # A reopen during an unfinished scan: keep its lower bound and progress, widen its end.
            lo, opened_at = self._catchup.lo, self._catchup.opened_at
        hi = id_bound(wall_now() + self.catchup_margin)
        after = self._catchup.after if self._catchup is not None else None
        self._catchup = CatchUp(lo=lo, hi=hi, opened_at=opened_at, after=after)
        self.stats.catchup_pending = True
        log.info(
            "projection %s schema %s: catch-up scan of events with _id time in [%s, %s]", self.name, self.schema,
            "start of log" if lo is None else id_bound_time(lo).isoformat(), id_bound_time(hi).isoformat(),
        )  # fmt: skip

    async def _open_stream(self, checkpoint: Checkpoint) -> FeedStream:
        try:
            stream = await self.feed.open(
                resume_token=checkpoint.resume_token, cluster_time=checkpoint.cluster_time,
                batch_size=self.batch_size, max_await_ms=max(10, int(self.batch_wait_s * 1000)),
            )  # fmt: skip
        except HistoryLost as e:
            raise self._translate(e) from e
        self.stats.streams_opened += 1
        log.info(
            "projection %s schema %s: following events from %s",
            self.name, self.schema, "resume token" if checkpoint.resume_token else (checkpoint.cluster_time or "now"),
        )  # fmt: skip
        return stream

    def _translate(self, e: HistoryLost) -> ResumeTokenLost:
        return ResumeTokenLost(self.schema, self.name, str(e))

    async def _follow(self, conn: psycopg.AsyncConnection, stream: FeedStream, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        saved_token: Mapping[str, Any] | None = None
        saved_at = loop.time()
        while not stop.is_set():
            changes = await self._collect(stream, stop)
            token = stream.resume_token
            if changes:
                await self._apply_changes(conn, changes, token)
                saved_token, saved_at = token, loop.time()
            elif token is not None and token != saved_token and loop.time() - saved_at >= self.checkpoint_interval_s:
                # Keep the position moving on a quiet log, so that it stays inside the oplog window.
                await self._writer.save_checkpoint(conn, token)
                saved_token, saved_at = token, loop.time()
            if self._catchup is not None and not stop.is_set():
                await self._catchup_step(conn, self._catchup)

    async def _catchup_step(self, conn: psycopg.AsyncConnection, catchup: CatchUp) -> None:
        """Apply the next page of the catch-up scan (one transaction); finish it on the last page."""
        docs = await self.feed.scan_ids(lo=catchup.lo, hi=catchup.hi, after=catchup.after, limit=self.batch_size)
        done = len(docs) < self.batch_size
        rows = [event_row(d) for d in docs]
        # The last page also moves scan_from, in the same transaction: the scan is then complete.
        scan_from = catchup.opened_at if done else None
        applied = await self._write(conn, rows, scan_from=scan_from)
        if docs:
            catchup.after = docs[-1]["_id"]
            self.stats.received += len(rows)
            self.stats.applied += applied
            self.stats.batches += 1
            self.stats.catchup_scanned += len(rows)
            self.stats.catchup_applied += applied
            self.stats.saw(max(r[3] for r in rows))
            if applied:
                log.info(
                    "projection %s schema %s: catch-up scan applied %d events the change stream had not "
                    "delivered (yet)", self.name, self.schema, applied,
                )  # fmt: skip
        if done:
            self._scan_from = max(self._scan_from or catchup.opened_at, catchup.opened_at)
            self._catchup = None
            self.stats.catchup_pending = False
            self.stats.catchups_done += 1
            log.info(
                "projection %s schema %s: catch-up scan done (%d events read since the stream opened)",
                self.name, self.schema, self.stats.catchup_scanned,
            )  # fmt: skip

    async def _collect(self, stream: FeedStream, stop: asyncio.Event) -> list[Change]:
        """Changes until batch_size of them, or batch_wait_s has passed, or stop is set.

        Once caught up, the next round trip waits for the end of the window: a busy log then costs
        two or three round trips (getMore) per batch, not one per handful of changes.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        batch: list[Change] = []
        while len(batch) < self.batch_size:
            # The driver resumes a change stream by itself after some errors (a new server cursor
            # opened with resumeAfter): that reopen gets the same catch-up scan as ours.
            resumes, opened_at = stream.resumes, wall_now()
            try:
                got = await self._fetch(stream, batch)
            except HistoryLost as e:
                raise self._translate(e) from e
            if stream.resumes != resumes:
                self.stats.streams_opened += 1
                log.info("projection %s schema %s: the driver resumed the change stream", self.name, self.schema)
                self._start_catchup(opened_at)
            if got:
                wait = deadline - loop.time()
                if wait <= 0 or len(batch) >= self.batch_size or stop.is_set():
                    break
                # Caught up (a reply shorter than the largest yet -- servers cap them, SecantusDB
                # at 200 -- and its last change recent): let the rest of the window gather.
                self._largest_reply = max(self._largest_reply, got)
                age = stream.age_s(batch[-1])
                if got < self._largest_reply and (age is None or age < self.batch_wait_s):
                    await sleep_or_stop(stop, wait)
                continue
            if not stream.alive:
                raise ChangeStreamInvalidated(
                    f"projection {self.name} schema {self.schema}: the change stream on "
                    f"{self.feed.full_name} ended (collection dropped or renamed?)"
                )
            if stop.is_set() or loop.time() >= deadline:
                break
        return batch

    async def _fetch(self, stream: FeedStream, batch: list[Change]) -> int:
        """Append the changes of one round trip (at most) to `batch`, up to batch_size; how many."""
        got, change = 0, await stream.try_next()
        while change is not None:
            batch.append(change)
            got += 1
            if not stream.buffered() or len(batch) >= self.batch_size:
                break
            change = await stream.try_next()
        return got

    async def _apply_changes(
        self, conn: psycopg.AsyncConnection, changes: list[Change], token: Mapping[str, Any] | None
    ) -> None:
        docs = [change["fullDocument"] for change in changes if change.get("fullDocument") is not None]
        if len(docs) != len(changes):
            raise UnprojectableEvent(None, None, "insert change without fullDocument")
        rows = [event_row(doc) for doc in docs]
        cluster_time = changes[-1].get("clusterTime")
        # Everything committed after this batch has a later `_id` time, up to the margin; but
        # while a catch-up scan is unfinished, events it has yet to find may be older still.
        scan_from = None
        if self._catchup is None:
            newest = newest_id_time(docs)
            if newest is not None and (self._scan_from is None or newest > self._scan_from):
                self._scan_from = scan_from = newest
        applied = await self._write(
            conn, rows, resume_token=token, cluster_time=cluster_time, scan_from=scan_from
        )
        self.stats.received += len(rows)
        self.stats.applied += applied
        self.stats.batches += 1
        self.stats.saw(max(r[3] for r in rows))
        log.debug(
            "projection %s schema %s: batch of %d events, %d new, up to message_id=%s seq=%s",
            self.name, self.schema, len(rows), applied, rows[-1][0], rows[-1][1],
        )  # fmt: skip
