"""What a fault scenario counts once it settled: whether a message is finished, the folds of many
messages, and the SMSC duplicates one message's log explains."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from core.domain.events import Event
from core.domain.message import TERMINAL_STATES, MessageState, fold
from core.store.eventstore import EventStore

BILLABLE = frozenset({"delivered", "undelivered", "expired"})
FEW = 200  # up to this many messages are folded one indexed read each, more in one pass over the log


def finished(state: MessageState | None) -> bool:
    """A terminal state, billed if a send preceded it."""
    if state is None or state.state not in TERMINAL_STATES:
        return False
    return state.billed or state.state not in BILLABLE or state.sent_at is None


async def fold_all(db: Any, ids: Collection[str]) -> dict[str, MessageState | None]:
    """The fold of each of `ids`: one pass over `events` in (message_id, seq) order, or, for a few
    messages, one indexed read each. (A `$in` of many ids is no cheaper than the pass on the embedded
    server: it matches every document against the list.)"""
    wanted = set(ids)
    if len(wanted) <= FEW:
        store = EventStore(db)
        return {m: await store.state(m) for m in wanted}
    out: dict[str, MessageState | None] = dict.fromkeys(wanted)
    group: list[dict[str, Any]] = []

    def close() -> None:
        if group and group[0]["message_id"] in wanted:
            out[group[0]["message_id"]] = fold([Event.from_doc(d) for d in group])

    async for d in db["events"].find({}, {"_id": 0}, batch_size=2000).sort([("message_id", 1), ("seq", 1)]):
        if group and d["message_id"] != group[0]["message_id"]:
            close()
            group = []
        group.append(d)
    close()
    return out


def explained_duplicates(events: Sequence[dict[str, Any]]) -> int:
    """Submits beyond the first that one message's log explains: each `sent` marked possible_duplicate,
    each retry after an OUTCOME_UNKNOWN (counted once when the resend after it is marked as well)."""
    n, after_unknown = 0, False
    for e in sorted(events, key=lambda d: d["seq"]):
        data = e.get("data") or {}
        if e["type"] == "retry" and data.get("error_name") == "OUTCOME_UNKNOWN":
            n, after_unknown = n + 1, True
        elif e["type"] == "sent":
            if data.get("possible_duplicate") and not after_unknown:
                n += 1
            after_unknown = False
    return n
