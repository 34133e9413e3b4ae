"""The projector's access to the event log: the change stream on `events` and the scans beside it.

`projections/` imports no driver: what it needs of MongoDB is here, in plain values and with the
driver's errors translated (`core.store.errors`): a transient failure is `StoreUnavailable`, a
resume point that left the oplog is `HistoryLost`, any other refusal is `StoreError`.

Values that stay opaque to the projector: a resume token (a mapping, stored as JSON text via
`token_to_json` / `token_from_json`), a cluster time (`ClusterTime`, stored as a bigint via
`ts_to_int` / `int_to_ts`) and an `_id` bound of the catch-up scan (`id_bound`).

No `$project` in the change stream: it would halve the bytes the driver decodes, but measured on
the embedded server it costs the server more CPU per change than it saves here.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from bson import ObjectId, Timestamp, decode, json_util
from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.change_stream import AsyncCollectionChangeStream
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from core.store.errors import HistoryLost, StoreError, StoreUnavailable

EventsCollection = AsyncCollection[Any]
ClusterTime = Timestamp
IdBound = ObjectId
Change = dict[str, Any]

# ChangeStreamHistoryLost, ChangeStreamFatalError, CappedPositionLost.
_HISTORY_LOST_CODES = frozenset({286, 280, 136})
_PIPELINE: list[dict[str, Any]] = [{"$match": {"operationType": "insert"}}]
T = TypeVar("T")


def translate(e: PyMongoError) -> StoreError:
    """The store error for a driver error (the caller raises it `from e`)."""
    if isinstance(e, ConnectionFailure):
        return StoreUnavailable(f"{type(e).__name__}: {e}")
    if isinstance(e, OperationFailure) and (e.code in _HISTORY_LOST_CODES or "resume" in str(e).lower()):
        return HistoryLost(f"code {e.code}: {e}")
    return StoreError(f"{type(e).__name__}: {e}")


async def _call(op: Callable[[], Awaitable[T]]) -> T:
    try:
        return await op()
    except PyMongoError as e:
        raise translate(e) from e


# --- opaque values --------------------------------------------------------------------------------


def ts_to_int(ts: ClusterTime) -> int:
    return (ts.time << 32) | ts.inc


def cluster_time_at(at: datetime) -> ClusterTime:
    """The cluster time of a wall-clock instant (its whole second): where to start a change stream
    that must not miss anything written since `at`."""
    return Timestamp(int(at.timestamp()), 0)


def int_to_ts(value: int) -> ClusterTime:
    return Timestamp(value >> 32, value & 0xFFFFFFFF)


def ts_datetime(ts: ClusterTime | None) -> datetime | None:
    """The wall-clock second a cluster time stands for."""
    return None if ts is None else datetime.fromtimestamp(ts.time, UTC)


def token_to_json(token: Mapping[str, Any]) -> str:
    return json_util.dumps(token)


def token_from_json(text: str) -> dict[str, Any]:
    return json_util.loads(text)  # type: ignore[no-any-return]


def token_cluster_time(token: Any) -> ClusterTime | None:
    """The cluster time encoded in a change stream resume token, if it can be read.

    MongoDB's tokens (`_data` hex KeyString) start with 0x82 followed by the big-endian seconds and
    increment; other servers (e.g. the embedded one) encode a BSON document holding a Timestamp.
    """
    data = token.get("_data") if isinstance(token, dict) else None
    if not isinstance(data, str):
        return None
    try:
        raw = bytes.fromhex(data)
    except ValueError:
        return None
    if len(raw) >= 9 and raw[0] == 0x82:
        return Timestamp(int.from_bytes(raw[1:5], "big"), int.from_bytes(raw[5:9], "big"))
    try:
        doc = decode(raw)
    except Exception:  # not BSON: an opaque token we cannot read
        return None
    found = [v for v in doc.values() if isinstance(v, Timestamp)]
    return found[0] if found else None


def id_time(doc: Mapping[str, Any]) -> datetime | None:
    """When the writer's driver generated the document's `_id`; None if it is not an ObjectId."""
    oid = doc.get("_id")
    return oid.generation_time if isinstance(oid, ObjectId) else None


def newest_id_time(docs: Iterable[Mapping[str, Any]]) -> datetime | None:
    """The newest `_id` time among `docs` (ObjectIds order by their time first)."""
    ids: list[ObjectId] = [oid for oid in (d.get("_id") for d in docs) if isinstance(oid, ObjectId)]
    return max(ids).generation_time if ids else None


def id_bound(at: datetime) -> IdBound:
    """The smallest `_id` a driver could generate at `at` (a bound for `_id` range queries)."""
    return ObjectId.from_datetime(at)


def id_bound_time(bound: IdBound) -> datetime:
    return bound.generation_time


# --- the change stream ----------------------------------------------------------------------------


class FeedStream:
    """An open change stream on `events`: change documents as dicts (`_id` is the resume token,
    `clusterTime` the commit's cluster time, `fullDocument` the event).

    `resumes` counts the driver's own reopens (after some errors it resumes by itself with a new
    server cursor): the caller treats each like a reopen of its own.
    """

    def __init__(self, stream: AsyncCollectionChangeStream[Any]) -> None:
        self._stream = stream
        self.resumes = 0
        self.fetches = 0  # server round trips (getMore) so far

    @property
    def resume_token(self) -> Mapping[str, Any] | None:
        return self._stream.resume_token

    @property
    def alive(self) -> bool:
        return self._stream.alive

    async def try_next(self) -> Change | None:
        """The next change, or None when none is there yet (after at most one server round trip)."""
        cursor = self._stream._cursor
        if not self.buffered():
            self.fetches += 1
        try:
            change = await self._stream.try_next()
        except PyMongoError as e:
            raise translate(e) from e
        if self._stream._cursor is not cursor:
            self.resumes += 1
        return change

    @staticmethod
    def age_s(change: Mapping[str, Any]) -> float | None:
        """Seconds since the change committed, by the server's `wallTime` (None if not given)."""
        at = change.get("wallTime")
        if not isinstance(at, datetime):
            return None
        return (datetime.now(UTC) - (at if at.tzinfo else at.replace(tzinfo=UTC))).total_seconds()

    def buffered(self) -> int:
        """Changes already received and not yet returned (taken without a server round trip)."""
        return len(self._stream._cursor._data)

    async def close(self) -> None:
        with contextlib.suppress(PyMongoError):
            await self._stream.close()

    async def __aenter__(self) -> FeedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ChangeFeed:
    """The projector's reads of `events`: the change stream, catch-up and replay scans, status."""

    def __init__(self, events: EventsCollection) -> None:
        self.events = events

    @property
    def full_name(self) -> str:
        return self.events.full_name

    async def open(
        self,
        *,
        resume_token: Mapping[str, Any] | None,
        cluster_time: ClusterTime | None,
        batch_size: int,
        max_await_ms: int,
    ) -> FeedStream:
        """A change stream of inserts after `resume_token`, else at `cluster_time`, else from now."""
        kwargs: dict[str, Any] = {"batch_size": batch_size, "max_await_time_ms": max_await_ms}
        if resume_token is not None:
            kwargs["resume_after"] = resume_token
        elif cluster_time is not None:
            kwargs["start_at_operation_time"] = cluster_time
        stream = await _call(lambda: self.events.watch(_PIPELINE, **kwargs))
        return FeedStream(stream)

    async def cluster_time_now(self) -> ClusterTime:
        """The server's current cluster time (a change stream started here misses nothing after it)."""
        reply = await _call(lambda: self.events.database.command("hello"))
        ts = reply.get("operationTime") or reply.get("$clusterTime", {}).get("clusterTime")
        if not isinstance(ts, Timestamp):
            raise StoreError("MongoDB did not report a cluster time: is it a replica set?")
        return ts

    async def scan_ids(
        self, *, lo: IdBound | None, hi: IdBound, after: IdBound | None, limit: int
    ) -> list[dict[str, Any]]:
        """Events with `_id` in (after or [lo), hi], in `_id` order, at most `limit`."""
        bounds: dict[str, Any] = {"$lte": hi}
        if after is not None:
            bounds["$gt"] = after
        elif lo is not None:
            bounds["$gte"] = lo
        cursor = self.events.find({"_id": bounds}, sort=[("_id", ASCENDING)], limit=limit)
        return await _call(lambda: cursor.to_list(None))

    async def scan_all(self, batch_size: int) -> AsyncIterator[list[dict[str, Any]]]:
        """The whole log in (message_id, seq) order, in lists of up to `batch_size` events."""
        cursor = self.events.find({}, sort=[("message_id", 1), ("seq", 1)], batch_size=batch_size)
        try:
            while True:
                page = await cursor.to_list(batch_size)
                if not page:
                    return
                yield page
        except PyMongoError as e:
            raise translate(e) from e
        finally:
            await cursor.close()

    async def estimated_count(self) -> int:
        return await _call(self.events.estimated_document_count)

    async def newest_event(self) -> dict[str, Any] | None:
        """The newest event by `_id` (message_id, seq, at), or None for an empty log."""
        cursor = self.events.find({}, {"message_id": 1, "seq": 1, "at": 1}).sort("_id", DESCENDING).limit(1)
        found = await _call(lambda: cursor.to_list(1))
        return found[0] if found else None

    async def count_since(self, since: datetime, limit: int) -> int:
        """Events whose `_id` time is after `since`, counting at most `limit`."""
        query = {"_id": {"$gt": ObjectId.from_datetime(since)}}
        return await _call(lambda: self.events.count_documents(query, limit=limit))

    async def oplog_oldest(self) -> ClusterTime | None:
        """The `ts` of the oldest oplog entry (None: empty, or no `ts`); StoreError if unreadable."""
        oplog = self.events.database.client["local"]["oplog.rs"]
        oldest = await _call(lambda: oplog.find({}, {"ts": 1}).sort("$natural", 1).limit(1).to_list(1))
        if not oldest or not isinstance(oldest[0].get("ts"), Timestamp):
            return None
        return oldest[0]["ts"]  # type: ignore[no-any-return]


def as_feed(events: EventsCollection | ChangeFeed) -> ChangeFeed:
    """`events` itself if it is a ChangeFeed, else a ChangeFeed on that collection."""
    return events if isinstance(events, ChangeFeed) else ChangeFeed(events)
