"""Checks 2, 4 and 5 on one message: its events fold, every entry below a checkpoint has its
outcome, it is finished or waits legitimately (else `stuck`), and no second send is unexplained."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pydantic

from core.domain.errors import InvalidTransition
from core.domain.events import Event
from core.domain.message import TERMINAL_STATES, MessageState, fold
from ops.verify.billing import check_billing
from ops.verify.report import aware
from ops.verify.snapshot import LogSnapshot

# Events after which a new `sent` is a deliberate resend: the connector's retry (OUTCOME_UNKNOWN among
# them), an operator's requeue.
RETRY_TYPES = frozenset({"retry", "requeued"})


@dataclass
class Folded:
    events: list[Event]
    state: MessageState | None
    error: str | None


def fold_docs(docs: Sequence[Mapping[str, Any]]) -> Folded:
    """Parse and fold one message's event documents (sorted by seq); never raises."""
    events: list[Event] = []
    for expected_seq, doc in enumerate(docs, start=1):
        try:
            event = Event.from_doc(dict(doc))
        except (pydantic.ValidationError, KeyError, TypeError, ValueError, AttributeError) as e:
            return Folded(events, None, f"seq {doc.get('seq')!r} unreadable: {e}".splitlines()[0])
        if event.seq != expected_seq:
            what = "twice" if event.seq == expected_seq - 1 else f"found {event.seq}"
            return Folded(events, None, f"seqs not 1..n: expected {expected_seq}, {what}")
        events.append(event)
    try:
        return Folded(events, fold(events), None)
    except InvalidTransition as e:
        return Folded(events, None, f"does not fold: {e}")


def parse_event(doc: Mapping[str, Any]) -> Event | None:
    try:
        return Event.from_doc(dict(doc))
    except (pydantic.ValidationError, KeyError, TypeError, ValueError, AttributeError):
        return None


@dataclass
class Judgement:
    """What the Mongo-side checks make of one message: its place (a COUNT_KEYS key) and its problems."""

    place: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    multi_sent: bool = False
    billed_amounts: int = 0
    billed_events: int = 0


def _check_sends(j: Judgement, events: Sequence[Mapping[str, Any]]) -> None:
    """Possible duplicates (notes) and second sends the log does not explain (problems)."""
    sends = 0
    retry_since_send = False
    for e in events:
        kind = e.get("type")
        data = e.get("data") or {}
        if kind in RETRY_TYPES:
            retry_since_send = True
        if kind != "sent":
            continue
        marked = bool(data.get("possible_duplicate"))
        if marked:
            j.notes.append(("possible_duplicate", f"seq {e.get('seq')} sent on route {e.get('route_id')} attempt "
                            f"{data.get('attempt')} after an attempt whose outcome was unknown"))
        if sends and not marked and not retry_since_send:
            j.problems.append(("duplicate_sent", f"seq {e.get('seq')}: sent again (send #{sends + 1}) with neither "
                               "possible_duplicate nor a retry since the previous send"))
        sends += 1
        retry_since_send = False
    j.multi_sent = sends > 1


def _check_outcomes(j: Judgement, snap: LogSnapshot, docs: Sequence[Mapping[str, Any]],
                    timer: Mapping[str, Any] | None) -> None:
    """Every entry of this message below a consumer's checkpoint has its outcome."""
    last_seq = max((int(d.get("seq") or 0) for d in docs), default=0)
    for d in docs:
        topic, pos, seq = d.get("topic"), d.get("pos"), int(d.get("seq") or 0)
        if topic is None or not isinstance(pos, int) or seq < last_seq:
            continue  # a later event is the outcome
        held = timer is not None and timer.get("seq") == seq and timer.get("topic") == topic
        for consumer, checkpoint in sorted(snap.consumers.get(topic, {}).items()):
            if pos < checkpoint and not held:
                j.problems.append(("no_outcome", f"{topic}@{pos} ({d.get('type')} seq {seq}) is below the "
                                   f"{consumer} checkpoint ({checkpoint}) but nothing followed it"))


def _check_progress(j: Judgement, snap: LogSnapshot, state: MessageState, docs: Sequence[Mapping[str, Any]],
                    timer: Mapping[str, Any] | None, now: datetime, stale_after_s: float) -> None:
    """Finished, or waiting where it may wait (backlog, timer, receipt), or stuck."""
    stale = timedelta(seconds=stale_after_s)
    if state.state in TERMINAL_STATES:
        j.place = "terminal"
    elif state.channel == "email" and state.state == "sent" and state.billed:
        # Taken and billed by the provider; its delivery or bounce comes (if ever) from its event webhook.
        j.place = "awaiting_receipt"
    elif timer is not None and timer.get("seq") == state.version:
        _check_timer(j, state, timer, now, stale)
    else:
        _check_topic_wait(j, snap, state, docs[-1], now, stale)


def _check_timer(j: Judgement, state: MessageState, timer: Mapping[str, Any], now: datetime, stale: timedelta
                 ) -> None:
    """On a timer for its last seq: waiting, or stuck once overdue by more than `stale`."""
    due = aware(timer.get("due_at"))
    j.place = "on_timer"
    if isinstance(due, datetime) and due < now - stale:
        j.place = "stuck"
        j.problems.append(("stuck", f"state {state.state!r} on a {timer.get('reason')} timer due "
                           f"{due.isoformat()} ({(now - due).total_seconds():.0f}s overdue): is the scheduler "
                           "running?"))


def _check_topic_wait(j: Judgement, snap: LogSnapshot, state: MessageState, last: Mapping[str, Any], now: datetime,
                      stale: timedelta) -> None:
    """Not on a timer: waiting in the topic of its last event (a backlog, a paused lane, a receipt
    wait), or stuck (in no topic, below a checkpoint, or waiting longer than `stale`)."""
    topic, pos = last.get("topic"), last.get("pos")
    if topic is None or not isinstance(pos, int):
        j.place = "stuck"
        j.problems.append(("stuck", f"state {state.state!r} (seq {state.version} {last.get('type')!r}) is in no "
                           "topic and on no timer: no stage will act on it"))
        return
    checkpoints = snap.consumers.get(topic, {})
    if checkpoints and pos < min(checkpoints.values()):
        j.place = "stuck"  # below the checkpoint with no outcome: reported as no_outcome
        return
    if topic.startswith("await:"):
        ends = aware((last.get("data") or {}).get("expires_at"))
        j.place = "awaiting_receipt"
        if isinstance(ends, datetime) and ends < now - stale:
            j.place = "stuck"
            j.problems.append(("stuck", f"sent, receipt wait ended {ends.isoformat()} but the expirer has not passed "
                               f"{topic}@{pos} (checkpoints {checkpoints or 'none'}): is the scheduler running?"))
        return
    if not snap.lane_readable(topic):
        j.place = "paused"
        return
    at = aware(last.get("at"))
    j.place = "in_backlog"
    if isinstance(at, datetime) and at < now - stale:
        j.place = "stuck"
        j.problems.append(("stuck", f"state {state.state!r} waits in {topic}@{pos} since {at.isoformat()} "
                           f"(checkpoints {checkpoints or 'none'}): is a consumer of that topic running?"))


def judge(snap: LogSnapshot, docs: Sequence[Mapping[str, Any]], timer: Mapping[str, Any] | None, now: datetime,
          stale_after_s: float) -> Judgement:
    """The Mongo-side checks of one message (its event documents sorted by seq, its timer or None)."""
    j = Judgement()
    folded = fold_docs(docs)
    if folded.error is not None:
        j.problems.append(("fold_failed", folded.error))
    _check_sends(j, docs)
    check_billing(j, docs, folded.state)
    _check_outcomes(j, snap, docs, timer)
    if folded.state is not None:
        _check_progress(j, snap, folded.state, docs, timer, now, stale_after_s)
    return j
