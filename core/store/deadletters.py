"""Dead letters: messages the pipeline gave up on, listed for operators and requeued by appending events.

Contract:
- A dead letter is a message whose CURRENT state (the fold of its events) is `dead_lettered` (the
  router appends it once a message's attempts reach `max_attempts`). Operators may also retry
  `failed` and `unknown` messages: both functions take the state to work on (`REQUEUABLE_STATES`).
- Listing finds the candidates among the events of that type (a message requeued since still has
  one), ordered by message id through the (message_id, seq) index, folds each candidate's events
  (one query per page) and keeps those still in the state. Keyset pagination on the message id, so
  pages stay stable while messages leave the list. No per-message head is kept anywhere: this reads
  the log, which is fine for an admin tool (the events of other types are skipped by the filter).
- Requeueing never edits the log: it appends one `requeued` event per message (seq = the fold's
  version + 1), handed to the router's topic of the message's lane (`route_topic(lane_of(state))`),
  all in one commit. A message whose next seq was taken meanwhile (another writer, another operator)
  loses on the unique (message_id, seq) index: it is reported in `conflicts`, nothing appended for it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.domain.events import Event, EventType
from core.domain.message import MessageState, event_doc, fold, lane_of, route_topic
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.topics import Write

log = logging.getLogger(__name__)

DEAD_LETTERED = "dead_lettered"
REQUEUABLE_STATES: frozenset[str] = frozenset({DEAD_LETTERED, "failed", "unknown"})
MAX_PAGE = 1000
MAX_REQUEUE = 1000
CANDIDATE_ROUND = 2000  # candidate events read per round while filling a page


@dataclass
class RequeueResult:
    """What `requeue` did with each id it was given (every id lands in exactly one list).

    `requeued`: a `requeued` event was appended; `not_found`: no such message; `not_dead`: the message
    is not in the state asked for (its current state is in `states`); `conflicts`: the message moved
    on between read and commit (another writer), nothing was appended for it.
    """

    requeued: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    not_dead: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    states: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every id given was requeued."""
        return not (self.not_found or self.not_dead or self.conflicts)


def _check_state(state: str) -> None:
    if state not in REQUEUABLE_STATES:
        raise ValueError(f"state must be one of {sorted(REQUEUABLE_STATES)}, not {state!r}")


async def list_dead_letters(db: AsyncDatabase[Any], tenant_id: str | None, limit: int, after: str | None,
                            *, state: str = DEAD_LETTERED) -> list[dict[str, Any]]:
    """Up to `limit` (1..1000) messages currently in `state`, ordered by id, starting after id `after`.

    Each item: `id`, `tenant_id`, `to`, `state`, `attempts`, `route_id`, `version`, and from the
    message's last event (the one that put it in `state`): `reason` (its `data.reason`, or None) and
    `at` (UTC). Pass the last item's `id` as `after` for the next page.
    """
    _check_state(state)
    limit = max(1, min(limit, MAX_PAGE))
    store = EventStore(db)
    out: list[dict[str, Any]] = []
    cursor_after = after
    while len(out) < limit:
        candidates = await _candidates(db, state, tenant_id, cursor_after, CANDIDATE_ROUND)
        if not candidates:
            break
        cursor_after = candidates[-1]
        for mid, docs in (await store.log.load_many(candidates)).items():
            item = _item(mid, docs, state)
            if item is not None:
                out.append(item)
                if len(out) == limit:
                    break
        if len(candidates) < CANDIDATE_ROUND:
            break
    return out


async def _candidates(db: AsyncDatabase[Any], state: str, tenant_id: str | None, after: str | None,
                      limit: int) -> list[str]:
    """Ids of messages with an event of type `state` (now or earlier), in id order, after `after`."""
    query: dict[str, Any] = {"type": state}
    if tenant_id is not None:
        query["tenant_id"] = tenant_id
    if after is not None:
        query["message_id"] = {"$gt": after}
    try:
        docs = [d async for d in db["events"].find(query, {"message_id": 1, "_id": 0})
                .sort([("message_id", ASCENDING), ("seq", ASCENDING)]).limit(limit)]
    except PyMongoError as e:
        raise StoreUnavailable(str(e)) from e
    return list(dict.fromkeys(d["message_id"] for d in docs))


def _item(message_id: str, docs: list[dict[str, Any]], state: str) -> dict[str, Any] | None:
    """The listing of one message if its fold is in `state` (None otherwise)."""
    current = fold([Event.from_doc(d) for d in docs])
    if current is None or current.state != state:
        return None
    last = docs[-1]
    at = last.get("at")
    if at is not None and at.tzinfo is None:  # a client that is not tz-aware
        at = at.replace(tzinfo=UTC)
    return {"id": message_id, "tenant_id": current.tenant_id, "to": current.to, "state": current.state,
            "attempts": current.attempts, "route_id": current.route_id, "version": current.version,
            "reason": (last.get("data") or {}).get("reason"), "at": at}


def _requeued(state: MessageState, actor: str, reason: str, now: datetime) -> Write:
    """The `requeued` event of `state` (seq = version + 1), into the router's topic of its lane."""
    doc = event_doc(state, EventType.REQUEUED, now, {"reason": reason, "actor": actor,
                                                     "previous_state": state.state})
    return Write(state.message_id, [doc], [route_topic(lane_of(state))])


async def requeue(store: EventStore, message_ids: Sequence[str], actor: str, reason: str, now: datetime,
                  *, state: str | Sequence[str] = DEAD_LETTERED) -> RequeueResult:
    """Append `requeued` (data: reason, actor, previous_state) to each message of `message_ids` that
    is in `state` (one state or several of `REQUEUABLE_STATES`), in one commit.

    At most 1,000 distinct ids per call (ValueError beyond: page through bigger sets). Duplicate ids
    count once. Nothing is ever updated in `events`; a message that moved on since it was folded is
    reported in `conflicts` and left alone. Raises StoreUnavailable if the store cannot be reached
    (nothing appended then).
    """
    states = {state} if isinstance(state, str) else set(state)
    for s in states:
        _check_state(s)
    ids = list(dict.fromkeys(message_ids))
    if len(ids) > MAX_REQUEUE:
        raise ValueError(f"at most {MAX_REQUEUE} messages per requeue, got {len(ids)}")
    result = RequeueResult()
    if not ids:
        return result
    folds = await store.states(ids)
    writes: list[Write] = []
    for mid in ids:
        current = folds.get(mid)
        if current is None:
            result.not_found.append(mid)
        elif current.state not in states:
            result.not_dead.append(mid)
            result.states[mid] = current.state
        else:
            writes.append(_requeued(current, actor, reason, now))
    if writes:
        committed = await store.log.commit(writes)
        result.requeued.extend(committed.committed)
        result.conflicts.extend(committed.conflicts)
    for mid in result.requeued:
        log.info("requeued message=%s tenant=%s from=%s actor=%s reason=%r", mid, folds[mid].tenant_id,
                 folds[mid].state, actor, reason)
    if result.not_found or result.not_dead or result.conflicts:
        log.warning("requeue by %s: not found %s, not in %s %s, conflicts %s", actor, result.not_found[:20],
                    sorted(states), result.not_dead[:20], result.conflicts[:20])
    return result
