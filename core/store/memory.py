"""The event log's ports (core/store/ports.py) in memory: plain dicts and lists, one asyncio.Lock.

For the workers' unit tests: the whole pipeline's logic runs in milliseconds without a server. It
passes the same contract suite as the MongoDB adapters (tests/contract/). What it does not model:
- durability, and `StoreUnavailable` (nothing here ever fails for a transient reason);
- `extra` writes (`(collection, bulk ops)` from `commit(extra=...)`) are recorded raw, in commit
  order, in `MemoryData.extra_writes`. Only one kind is applied: an `UpdateOne`-like op (read by
  duck typing: `._filter == {"_id": key}`, `._doc` with `$inc` / `$set`) on collection `tenants`
  updates `MemoryData.tenants[key]` (that is how `topics.spend_updates` moves `spent_minor`).
  Anything else is only recorded.
- `TimersPort.count(query)` matches equality on top-level fields only (no operators).

Atomicity: every mutation of a commit happens after all its checks, under the lock, without an await
in between; `redecide` is called outside the lock (it may read the log), as in MongoDB.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.domain.events import Event
from core.domain.message import MessageState, fold
from core.store.errors import CheckpointMoved, Fenced, GapInTopic, StoreUnavailable
from core.store.eventstore import IdempotencyRecord, IdempotencyReplay
from core.store.owners import OpenAttempt, Ownership
from core.store.timers import HOLD_S, ReleaseResult, obsolete_collector, release_plan
from core.store.topics import (
    MAX_CONFLICT_ROUNDS,
    CommitResult,
    ExtraWrites,
    Redecide,
    Write,
    checkpoint_id,
    drop_lost,
)

log = logging.getLogger(__name__)

Doc = dict[str, Any]


class DuplicateMessage(Exception):
    """`MemoryEventStore.accept` met an existing message id (MongoDB raises DuplicateKeyError)."""


@dataclass
class MemoryData:
    """Everything the in-memory adapters share (one per test: a fresh, empty log)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    events: dict[tuple[str, int], Doc] = field(default_factory=dict)  # (message_id, seq) -> event
    topics: dict[str, list[Doc]] = field(default_factory=dict)  # topic -> events, index = pos
    checkpoints: dict[str, int] = field(default_factory=dict)
    owners: dict[str, Doc] = field(default_factory=dict)
    attempts: list[Doc] = field(default_factory=list)  # in insertion order
    timers: dict[str, Doc] = field(default_factory=dict)  # message id -> timer
    extra_writes: list[tuple[str, list[Any]]] = field(default_factory=list)
    tenants: dict[str, Doc] = field(default_factory=dict)  # only what `extra` writes applied
    idempotency: dict[str, Doc] = field(default_factory=dict)
    by_smsc_id: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # sent events


class MemoryEventLog:
    """`EventLogPort` in memory."""

    def __init__(self, data: MemoryData) -> None:
        self.data = data

    async def commit(self, writes: Sequence[Write], *, moves: dict[str, tuple[int, int]] | None = None,
                     fence: tuple[str, int] | None = None, extra: ExtraWrites | None = None,
                     redecide: Redecide | None = None) -> CommitResult:
        """See `EventLogPort.commit`."""
        result = CommitResult()
        pending = list(writes)
        for _ in range(MAX_CONFLICT_ROUNDS):
            async with self.data.lock:
                lost = self.apply_locked(pending, moves or {}, fence, extra, result)
            if not lost:
                result.committed.extend(w.message_id for w in pending)
                return result
            pending = await drop_lost(pending, lost, redecide, result)
        raise StoreUnavailable(f"commit: conflicts did not settle after {MAX_CONFLICT_ROUNDS} rounds")

    def apply_locked(self, batch: list[Write], moves: dict[str, tuple[int, int]], fence: tuple[str, int] | None,
                     extra: ExtraWrites | None, result: CommitResult) -> set[str]:
        """One round of a commit; the caller holds `data.lock`. Checks everything, then writes
        everything (no await: atomic). Returns the messages that lost on (message_id, seq), having
        written nothing, or an empty set once committed (`result.positions` set)."""
        owner = self._owner(fence)  # checked first, as in MongoDB
        for cid, (start, end) in sorted(moves.items()):  # then the checkpoints: a stale reader fails fast
            if end != start and self.data.checkpoints.get(cid, 0) != start:
                raise CheckpointMoved([cid])
        lost = _conflicts(self.data.events, batch)
        if lost:
            return lost
        docs = _placed(batch)  # copies: a caller's later change to its documents never reaches the log
        extras = extra(batch) if extra else []
        # ---- nothing can fail below this line: write ----
        if owner is not None:
            owner["commits"] = owner.get("commits", 0) + 1
        result.positions = {}
        for doc, topic in docs:
            self._insert(doc, topic)
            if topic is not None:
                first, _ = result.positions.get(topic, (doc["pos"], 0))
                result.positions[topic] = (first, doc["pos"] + 1)
        self.data.checkpoints.update({cid: end for cid, (start, end) in moves.items() if end != start})
        _write_timers(self.data.timers, batch)
        for collection, ops in extras:
            if ops:
                self.data.extra_writes.append((collection, list(ops)))
                if collection == "tenants":
                    _apply_updates(self.data.tenants, ops)
        return set()

    def _owner(self, fence: tuple[str, int] | None) -> Doc | None:
        """The owner document `fence` names if its epoch is current (None without a fence)."""
        if fence is None:
            return None
        owner = self.data.owners.get(fence[0])
        if owner is None or owner["epoch"] != fence[1]:
            raise Fenced(*fence)
        return owner

    def _insert(self, doc: Doc, topic: str | None) -> None:
        d = self.data
        doc.setdefault("_id", uuid.uuid4().hex)
        if topic is not None:
            entries = d.topics.setdefault(topic, [])
            doc["topic"], doc["pos"] = topic, len(entries)
            entries.append(doc)
        key = (doc["message_id"], int(doc["seq"]))
        d.events[key] = doc
        if doc.get("type") == "sent":
            for sid in (doc.get("data") or {}).get("smsc_message_ids") or ():
                d.by_smsc_id.setdefault(sid, []).append(key)

    async def counters(self, topics: Iterable[str]) -> dict[str, int]:
        return {t: len(self.data.topics.get(t, ())) for t in topics}

    async def load_checkpoints(self, consumer: str, topics: Iterable[str]) -> dict[str, int]:
        return {t: self.data.checkpoints.get(checkpoint_id(consumer, t), 0) for t in topics}

    async def read(self, topic: str, start: int, end: int) -> list[Doc]:
        if end <= start:
            return []
        docs = self.data.topics.get(topic, [])[max(start, 0):end]
        if start < 0 or len(docs) != end - start:
            raise GapInTopic(topic, start, end, len(docs))
        return copy.deepcopy(docs)

    async def load_events(self, message_id: str) -> list[Doc]:
        return (await self.load_many([message_id]))[message_id]

    async def load_many(self, message_ids: Iterable[str]) -> dict[str, list[Doc]]:
        out: dict[str, list[Doc]] = {m: [] for m in dict.fromkeys(message_ids)}
        for (mid, _), doc in self.data.events.items():
            if mid in out:
                out[mid].append(copy.deepcopy(doc))
        for events in out.values():
            events.sort(key=lambda e: e["seq"])
        return out

    async def sent_by_smsc_ids(self, smsc_ids: Sequence[str]) -> list[Doc]:
        keys = dict.fromkeys(k for sid in smsc_ids for k in self.data.by_smsc_id.get(sid, ()))
        return [copy.deepcopy(self.data.events[k]) for k in keys]


class MemoryOwners:
    """`OwnersPort` in memory."""

    def __init__(self, data: MemoryData) -> None:
        self.data = data
        self.log = MemoryEventLog(data)

    async def acquire(self, owner: str, holder: str, now: datetime, lease_s: float) -> Ownership | None:
        until = now + timedelta(seconds=lease_s)
        async with self.data.lock:
            doc = self.data.owners.get(owner)
            if doc is None:
                doc = self.data.owners[owner] = {"_id": owner, "epoch": 0, "commits": 0}
            elif doc["lease_until"] > now and doc["holder"] != holder:
                return None
            doc.update(holder=holder, lease_until=until, acquired_at=now, epoch=doc["epoch"] + 1)
            epoch = int(doc["epoch"])
        log.info("owner %s acquired by %s (epoch %d)", owner, holder, epoch)
        return Ownership(owner, holder, epoch, until)

    def _current(self, own: Ownership) -> Doc:
        doc = self.data.owners.get(own.owner)
        if doc is None or doc["epoch"] != own.epoch:
            raise Fenced(own.owner, own.epoch)
        return doc

    async def renew(self, own: Ownership, now: datetime, lease_s: float) -> Ownership:
        until = now + timedelta(seconds=lease_s)
        async with self.data.lock:
            self._current(own)["lease_until"] = until
        return Ownership(own.owner, own.holder, own.epoch, until)

    async def release(self, own: Ownership, now: datetime) -> None:
        async with self.data.lock:
            with contextlib.suppress(Fenced):  # somebody else holds it now: nothing of ours to give up
                self._current(own)["lease_until"] = now

    async def record_attempt(self, own: Ownership, ranges: dict[str, tuple[int, int]], message_ids: list[str],
                             now: datetime) -> str:
        attempt_id = uuid.uuid4().hex
        async with self.data.lock:
            self._current(own)["last_attempt_at"] = now
            self.data.attempts.append({"_id": attempt_id, "owner": own.owner, "epoch": own.epoch, "at": now,
                                       "ranges": {t: [a, b] for t, (a, b) in ranges.items()},
                                       "message_ids": list(message_ids)})
        return attempt_id

    async def open_attempts(self, owner: str, checkpoints: dict[str, int]) -> list[OpenAttempt]:
        # A stable sort: attempts recorded at the same time keep their recording order.
        docs = sorted((a for a in self.data.attempts if a["owner"] == owner), key=lambda a: a["at"])
        missing = {t for a in docs for t in a["ranges"] if t not in checkpoints}
        if missing:
            consumer = owner.split("|", 1)[0]
            checkpoints = {**checkpoints, **await self.log.load_checkpoints(consumer, missing)}
        out = []
        for a in docs:
            for topic, (start, end) in a["ranges"].items():
                cp = checkpoints.get(topic, 0)
                if end > cp:
                    out.append(OpenAttempt(a["_id"], int(a["epoch"]), topic, max(start, cp), end,
                                           tuple(a["message_ids"])))
        return out

    async def forget_resolved(self, owner: str, checkpoints: dict[str, int], keep: int = 100) -> int:
        async with self.data.lock:
            mine = sorted((a for a in self.data.attempts if a["owner"] == owner), key=lambda a: a["at"],
                          reverse=True)[keep:]
            done = {a["_id"] for a in mine
                    if all(end <= checkpoints.get(t, -1) for t, (_, end) in a["ranges"].items())}
            self.data.attempts = [a for a in self.data.attempts if a["_id"] not in done]
        return len(done)


class MemoryTimers:
    """`TimersPort` in memory."""

    def __init__(self, data: MemoryData) -> None:
        self.data = data
        self.log = MemoryEventLog(data)

    async def due(self, now: datetime, limit: int) -> list[Doc]:
        due = sorted((t for t in self.data.timers.values() if t["due_at"] <= now), key=lambda t: t["due_at"])
        return copy.deepcopy(due if limit == 0 else due[:abs(limit)])  # MongoDB: limit 0 = no limit

    async def count(self, query: dict[str, Any] | None = None) -> int:
        q = query or {}
        if any(k.startswith("$") or isinstance(v, dict) for k, v in q.items()):
            raise NotImplementedError(f"in-memory timers match equality only: {q}")
        return sum(1 for t in self.data.timers.values() if all(t.get(k) == v for k, v in q.items()))

    async def any_for_lane(self, lane: str) -> bool:
        return any(t.get("lane") == lane for t in self.data.timers.values())

    async def release_due(self, now: datetime, limit: int, suspended: Callable[[str], bool],
                          canceling: Collection[str] = ()) -> ReleaseResult:
        """See `TimersPort.release_due` (the same steps as timers.Timers.release_due)."""
        result = ReleaseResult()
        due = await self.due(now, limit)
        held, go, writes = release_plan(due, now, suspended, canceling)
        if held:
            async with self.data.lock:
                for t in held:
                    if t["_id"] in self.data.timers:
                        self.data.timers[t["_id"]]["due_at"] = now + timedelta(seconds=HOLD_S)
            result.postponed = [t["_id"] for t in held]
        if writes:
            res = await self.log.commit(writes, redecide=obsolete_collector(result))
            result.released = res.committed
            async with self.data.lock:
                for mid in result.obsolete:
                    timer = self.data.timers.get(mid)
                    if timer is not None and timer["seq"] == go[mid]["seq"]:
                        del self.data.timers[mid]
        return result


class MemoryEventStore:
    """The parts of `eventstore.EventStore` the workers use, over the in-memory log: `.log`,
    `accept`, `load_events`, `state`, `states`, `exists`. `db` is None: a worker that needs more of
    the database than the ports must be given it another way."""

    db: None = None

    def __init__(self, data: MemoryData) -> None:
        self.data = data
        self.log = MemoryEventLog(data)

    async def accept(self, writes: Sequence[Write], idempotency: IdempotencyRecord | None = None,
                     side_writes: Sequence[tuple[str, list[Any]]] = ()) -> None:
        """Append new messages' first events with the idempotency record and side writes, all or
        nothing. Raises IdempotencyReplay for a used key, DuplicateMessage for an existing id."""
        extra = (lambda _batch: list(side_writes)) if side_writes else None
        async with self.data.lock:
            if idempotency is not None and idempotency.key in self.data.idempotency:
                raise IdempotencyReplay(self.data.idempotency[idempotency.key])
            taken = _conflicts(self.data.events, writes)
            if taken:
                raise DuplicateMessage(sorted(taken)[:5])
            # Under the same lock as the check: nothing can conflict now, this writes all.
            self.log.apply_locked(list(writes), {}, None, extra, CommitResult())
            if idempotency is not None:
                created = writes[0].events[0]["at"] if writes else None
                self.data.idempotency[idempotency.key] = {
                    "_id": idempotency.key, "request_hash": idempotency.request_hash,
                    "message_ids": idempotency.message_ids, "created_at": created}

    async def load_events(self, message_id: str) -> list[Event]:
        return [Event.from_doc(d) for d in await self.log.load_events(message_id)]

    async def state(self, message_id: str) -> MessageState | None:
        return fold(await self.load_events(message_id))

    async def states(self, message_ids: Iterable[str]) -> dict[str, MessageState]:
        loaded = await self.log.load_many(message_ids)
        folded = {m: fold([Event.from_doc(d) for d in docs]) for m, docs in loaded.items()}
        return {m: s for m, s in folded.items() if s is not None}

    async def exists(self, message_ids: Iterable[str]) -> set[str]:
        return {m for m in message_ids if (m, 1) in self.data.events}


class InMemory:
    """One in-memory log and its adapters, sharing `data`."""

    def __init__(self) -> None:
        self.data = MemoryData()
        self.log = MemoryEventLog(self.data)
        self.owners = MemoryOwners(self.data)
        self.timers = MemoryTimers(self.data)
        self.store = MemoryEventStore(self.data)


def _conflicts(events: dict[tuple[str, int], Doc], batch: Sequence[Write]) -> set[str]:
    """Messages of `batch` with an event whose (message_id, seq) exists already or comes twice."""
    seen: set[tuple[str, int]] = set()
    lost = set()
    for w in batch:
        for e in w.events:
            key = (e["message_id"], int(e["seq"]))
            if key in events or key in seen:
                lost.add(e["message_id"])
            seen.add(key)
    return lost


def _placed(batch: Sequence[Write]) -> list[tuple[Doc, str | None]]:
    """Copies of the batch's event documents with their topics, in batch order."""
    out: list[tuple[Doc, str | None]] = []
    for w in batch:
        if len(w.topics) != len(w.events):
            raise ValueError(f"message={w.message_id}: {len(w.events)} events, {len(w.topics)} topics")
        out.extend((copy.deepcopy(e), t) for e, t in zip(w.events, w.topics, strict=True))
    return out


def _write_timers(timers: dict[str, Doc], batch: Sequence[Write]) -> None:
    for w in batch:
        if w.clear_timer:
            timers.pop(w.message_id, None)
        if w.timer is not None:
            timers[w.message_id] = {**copy.deepcopy(w.timer), "_id": w.message_id}


def _apply_updates(docs: dict[str, Doc], ops: Iterable[Any]) -> None:
    """Apply `UpdateOne`-like ops (`._filter == {"_id": key}`, `._doc` with `$inc`/`$set`): upserting,
    which the only user (`spend_updates` on tenants that exist) cannot tell apart."""
    for op in ops:
        flt, update = getattr(op, "_filter", None), getattr(op, "_doc", None)
        if not isinstance(flt, dict) or set(flt) != {"_id"} or not isinstance(update, dict):
            continue
        doc = docs.setdefault(flt["_id"], {"_id": flt["_id"]})
        for k, v in (update.get("$inc") or {}).items():
            doc[k] = doc.get(k, 0) + v
        doc.update(update.get("$set") or {})
