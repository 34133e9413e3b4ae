"""Dead letters: messages the pipeline gave up on, listed for operators and requeued by appending events.

Contract:
- A dead letter is a head in `streams` whose `state` is `dead_lettered` (the router appends
  `dead_lettered` once a message's attempts reach `max_attempts`). Operators may also retry `failed`
  messages: both functions take the state to work on (`REQUEUABLE_STATES`).
- Listing reads heads (keyset pagination on `_id`, so pages stay stable while messages leave the
  list) and, for each page, the last event of each message (one query on the `(message_id, seq)`
  index) for the reason and time. `streams` keeps a single secondary index on purpose (every head
  write pays for each index), so the state filter walks the `_id` index: fine for an admin tool.
- Requeueing never edits the log: it appends one `requeued` event per message through
  `EventStore.commit`, all in one transaction, each head guarded by the version read. The head then
  says state `retry`, queue `route`, attempts 0, so the router takes the message again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase

from core.domain.events import EventType
from core.domain.message import evolve, next_event
from core.store.eventstore import EventStore, Transition

log = logging.getLogger(__name__)

DEAD_LETTERED = "dead_lettered"
REQUEUABLE_STATES: frozenset[str] = frozenset({DEAD_LETTERED, "failed", "unknown"})
MAX_PAGE = 1000
MAX_REQUEUE = 1000


@dataclass
class RequeueResult:
    """What `requeue` did with each id it was given (every id lands in exactly one list).

    `requeued`: a `requeued` event was appended; `not_found`: no such message; `not_dead`: the message
    is not in the state asked for (its current state is in `states`); `conflicts`: the head moved on
    between read and commit (another writer), nothing was appended for it.
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
    """Up to `limit` (1..1000) messages in `state`, ordered by id, starting after id `after`.

    Each item: `id`, `tenant_id`, `to`, `state`, `attempts`, `route_id`, `version`, and from the
    message's last event (the one that put it in `state`): `reason` (its `data.reason`, or None) and
    `at` (UTC). Pass the last item's `id` as `after` for the next page.
    """
    _check_state(state)
    limit = max(1, min(limit, MAX_PAGE))
    query: dict[str, Any] = {"state": state}
    if tenant_id is not None:
        query["tenant_id"] = tenant_id
    if after is not None:
        query["_id"] = {"$gt": after}
    projection = {"tenant_id": 1, "state": 1, "version": 1, "attempts": 1, "route_id": 1, "msg.to": 1}
    heads = [h async for h in db["streams"].find(query, projection).sort("_id", ASCENDING).limit(limit)]
    if not heads:
        return []
    last_events = {
        e["message_id"]: e
        async for e in db["events"].find({"$or": [{"message_id": h["_id"], "seq": h["version"]} for h in heads]},
                                         {"message_id": 1, "at": 1, "data.reason": 1})
    }
    out = []
    for h in heads:
        last = last_events.get(h["_id"], {})
        out.append({
            "id": h["_id"],
            "tenant_id": h["tenant_id"],
            "to": h.get("msg", {}).get("to", ""),
            "state": h["state"],
            "attempts": h.get("attempts", 0),
            "route_id": h.get("route_id"),
            "version": h["version"],
            "reason": last.get("data", {}).get("reason"),
            "at": last.get("at"),
        })
    return out


async def requeue(store: EventStore, message_ids: Sequence[str], actor: str, reason: str, now: datetime,
                  *, state: str | Sequence[str] = DEAD_LETTERED) -> RequeueResult:
    """Append `requeued` (data: reason, actor, previous_state) to each message of `message_ids` that
    is in `state` (one state or several of `REQUEUABLE_STATES`), in one `EventStore.commit`.

    At most 1,000 distinct ids per call (ValueError beyond: page through bigger sets). Duplicate ids
    count once. Nothing is ever updated in `events`; a head that moved on since it was read is
    reported in `conflicts` and left alone.
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
    heads = await store.heads_by_ids(ids)
    transitions: list[Transition] = []
    for mid in ids:
        head = heads.get(mid)
        if head is None:
            result.not_found.append(mid)
        elif head.state not in states:
            result.not_dead.append(mid)
            result.states[mid] = head.state
        else:
            event = next_event(head, EventType.REQUEUED, now,
                               {"reason": reason, "actor": actor, "previous_state": head.state})
            transitions.append(Transition(head.version, [event], evolve(head, event)))
    if transitions:
        committed = await store.commit(transitions, now)
        result.requeued.extend(committed.committed)
        result.conflicts.extend(committed.conflicts)
    for mid in result.requeued:
        log.info("requeued message=%s tenant=%s from=%s actor=%s reason=%r", mid, heads[mid].tenant_id,
                 heads[mid].state, actor, reason)
    if result.not_found or result.not_dead or result.conflicts:
        log.warning("requeue by %s: not found %s, not in %s %s, conflicts %s", actor, result.not_found[:20],
                    sorted(states), result.not_dead[:20], result.conflicts[:20])
    return result
