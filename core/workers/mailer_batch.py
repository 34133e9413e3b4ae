"""What the mailer does with the entries of one batch, decided before anything is sent (pure apart
from logging): which e-mails to send, and the writes of the entries that are not sent.

An entry is skipped ("moved on") when its message is no longer `routed` at the entry's seq on this
route, appears twice in the batch, or belongs to a batch read earlier and not yet committed (`busy`:
the mailer reads the next batch while the previous one is sent and committed; without this, a
second entry of the same message at the same seq, e.g. a timer released twice, could be sent once
per batch before the first commit shows the message moved on).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.domain.email import EMAIL, EmailContent
from core.domain.events import Event
from core.domain.message import MessageState, fold, lane_of_topic, state_of_routed
from core.domain.outcomes import Before, decide_before_send
from core.domain.routing import Route
from core.store.lanes import Batch, LaneBook
from core.store.topics import Write
from core.workers.mailer_writes import MailItem, unsent_write

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Prepared:
    """A batch read and decided: its e-mails to send and the writes of the others."""

    batch: Batch
    items: list[MailItem] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)  # every message the batch took (busy until committed)


def state_of(entry: dict[str, Any], docs: list[dict[str, Any]]) -> MessageState | None:
    if entry["type"] == "routed":
        return state_of_routed(entry)
    return fold([Event.from_doc(d) for d in docs])


def decide_batch(batch: Batch, docs: dict[str, list[dict[str, Any]]], *, route: Route, book: LaneBook,
                 unresolved: dict[str, list[tuple[int, int]]], busy: set[str], now: datetime,
                 stats: collections.Counter[str]) -> Prepared:
    job = Prepared(batch)
    for entry in batch.entries:
        mid = entry["message_id"]
        state = state_of(entry, docs.get(mid) or [])
        if state is None or state.state != "routed" or state.version != entry["seq"] or mid in job.ids \
                or mid in busy or state.route_id != route.id or state.channel != EMAIL:
            log.info("mailer route=%s: message=%s moved on after entry %s@%d; skipped", route.id, mid,
                     entry["topic"], entry["pos"])
            continue
        job.ids.add(mid)
        earlier = any(a <= entry["pos"] < b for a, b in unresolved.get(entry["topic"], ()))
        expires_at = state.expires_at
        what = decide_before_send(canceling=lane_of_topic(entry["topic"]) in book.canceling,
                                  earlier_attempt=earlier, policy=route.on_unknown_outcome.value,
                                  expired=expires_at is not None and now >= expires_at,
                                  suspended=state.tenant_id in book.suspended)
        if what in (Before.SEND, Before.SEND_DUPLICATE):
            content = EmailContent.from_accepted(docs[mid][0]["data"])
            job.items.append(MailItem(state, content, duplicate=what == Before.SEND_DUPLICATE))
        else:
            stats[what.value] += 1
            job.writes.append(unsent_write(what, state, entry["topic"], route.id, now))
    return job
