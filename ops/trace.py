"""`msgcore trace <message id | SMSC message id | phone number>`: a message's full history from the log.

Lookups, all tried (an SMSC id may look like anything, even like a number):
- message id: `events` by (message_id, seq), indexed;
- SMSC message id: the `sent` events' `data.smsc_message_ids` index;
- phone number (E.164, `+` optional): the `accepted` events' `data.to`, through the partial index
  `accepted_to` (created by the API and the connector on start). Without that index the lookup is a
  scan of `events`, capped in server time, and the output says so.

A message's state is the fold of its events (`core.domain.message.fold`); nothing else is read for
it, except its timer when it waits for one (retry back-off, `send_at`, a suspended tenant's hold).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pydantic

from core.domain.errors import InvalidTransition
from core.domain.events import Event
from core.domain.message import MessageState, fold

if TYPE_CHECKING:
    from core.store.database import Database

log = logging.getLogger(__name__)

PHONE = re.compile(r"^\+?[1-9][0-9]{5,14}$")
DEFAULT_MAX_MESSAGES = 20
DEFAULT_SCAN_TIME_S = 30.0
PHONE_INDEX = "accepted_to"  # core/store/numbers.py: events (data.to, tenant_id, at) where type = accepted
MAX_TIME_EXPIRED = 50  # the server's error code when a query runs past its maxTimeMS
# Data keys worth a glance, in print order; `text` is left out on purpose (content is not audit data).
KEY_DATA = ("to", "sender", "parts", "encoding", "priority", "campaign_id", "client_ref", "strategy",
            "price_per_part", "smsc_message_ids", "smsc_message_id", "stat", "err", "attempt", "error_code",
            "error_name", "reason", "possible_duplicate", "amount", "currency", "actor", "expires_at")


@dataclass
class MessageTrace:
    message_id: str
    found_by: str  # "message id", "SMSC message id", "phone number (...)"
    events: list[dict[str, Any]]
    state: MessageState | None = None  # the fold of the events; None if they do not fold
    fold_error: str | None = None
    timer: dict[str, Any] | None = None


@dataclass
class TraceResult:
    query: str
    messages: list[MessageTrace] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def normalise_phone(query: str) -> str | None:
    """`+<digits>` if `query` looks like an E.164 number (spaces, dashes and dots ignored), else None."""
    compact = re.sub(r"[\s\-.()]", "", query)
    if not PHONE.match(compact):
        return None
    return compact if compact.startswith("+") else f"+{compact}"


async def _ids_by_smsc_id(db: Database, smsc_id: str, limit: int) -> list[str]:
    cursor = db["events"].find({"data.smsc_message_ids": smsc_id, "type": "sent"}, {"message_id": 1}).limit(limit)
    return list(dict.fromkeys([d["message_id"] async for d in cursor]))


async def _ids_by_phone(db: Database, number: str, limit: int, scan_time_s: float, notes: list[str]) -> list[str]:
    """Messages to `number`, newest first, from their `accepted` events."""
    indexed = PHONE_INDEX in await db["events"].index_information()
    query = {"type": "accepted", "data.to": number}
    cursor = db["events"].find(query, {"message_id": 1}).sort("at", -1).limit(limit)
    if not indexed:
        notes.append(f"scanned `events` for {number} (no index {PHONE_INDEX}: it is created when the API or a "
                     f"connector starts): at most {limit} messages and {scan_time_s:.0f}s of server time")
        cursor = cursor.max_time_ms(int(scan_time_s * 1000))
    ids: list[str] = []
    try:
        async for d in cursor:
            ids.append(d["message_id"])
    except Exception as e:  # the driver's ExecutionTimeout; its classes are core/store's business
        if getattr(e, "code", None) != MAX_TIME_EXPIRED:
            raise
        notes.append(f"the scan stopped after {scan_time_s:.0f}s: the list may be incomplete")
    if len(ids) >= limit:
        notes.append(f"stopped at {limit} messages (raise --max-messages for more)")
    return list(dict.fromkeys(ids))


def fold_docs(docs: list[dict[str, Any]]) -> tuple[MessageState | None, str | None]:
    """The fold of one message's event documents, or the reason it fails."""
    try:
        return fold([Event.from_doc(d) for d in docs]), None
    except (pydantic.ValidationError, InvalidTransition, KeyError, TypeError, ValueError) as e:
        return None, str(e).splitlines()[0]


async def trace(
    db: Database,
    query: str,
    *,
    max_messages: int = DEFAULT_MAX_MESSAGES,
    scan_time_s: float = DEFAULT_SCAN_TIME_S,
) -> TraceResult:
    """The messages `query` names (by message id, SMSC message id or phone number), each with every
    event from the log in seq order, their fold, and the message's timer if it waits for one."""
    result = TraceResult(query=query)
    found: dict[str, str] = {}
    if await db["events"].find_one({"message_id": query}, {"_id": 1}) is not None:
        found[query] = "message id"
    for mid in await _ids_by_smsc_id(db, query, max_messages):
        found.setdefault(mid, "SMSC message id")
    number = normalise_phone(query)
    if number is not None:
        for mid in await _ids_by_phone(db, number, max_messages, scan_time_s, result.notes):
            found.setdefault(mid, f"phone number {number}")
    for mid, how in list(found.items())[:max_messages]:
        events = await db["events"].find({"message_id": mid}, {"_id": 0}).sort("seq", 1).to_list(None)
        state, error = fold_docs(events)
        result.messages.append(MessageTrace(mid, how, events, state, error, await db["timers"].find_one({"_id": mid})))
    if len(found) > max_messages:
        result.notes.append(f"{len(found)} messages matched; showing the first {max_messages}")
    log.info("trace %r: %d message(s)", query, len(result.messages))
    return result


def _utc(value: Any) -> str:
    if not isinstance(value, datetime):
        return "-" if value is None else str(value)
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="milliseconds")


def _value(value: Any) -> str:
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


def event_line(doc: dict[str, Any]) -> str:
    """`seq  time  type  route=..  key=value ...  [topic@pos]` for one event document."""
    data = doc.get("data") or {}
    route = doc.get("route_id") or data.get("route_id") or "-"
    details = "  ".join(f"{k}={_value(data[k])}" for k in KEY_DATA if data.get(k) not in (None, "", []))
    where = f"  -> {doc['topic']}@{doc.get('pos')}" if doc.get("topic") else ""
    head = f"{doc.get('seq', '?'):>3}  {_utc(doc.get('at'))}  {doc.get('type', '?'):<13}  route={route}"
    return f"{head}  {details}{where}"


def format_trace(result: TraceResult) -> list[str]:
    lines: list[str] = []
    for m in result.messages:
        s = m.state
        tenant = s.tenant_id if s else (m.events[0].get("tenant_id") if m.events else "-")
        if s is not None:
            lines.append(f"message {m.message_id}  (found by {m.found_by})  tenant={tenant}  to={s.to or '-'}  "
                         f"state={s.state}  version={s.version}  attempts={s.attempts}  route={s.route_id or '-'}"
                         f"  billed={'yes' if s.billed else 'no'}")
        else:
            lines.append(f"message {m.message_id}  (found by {m.found_by})  tenant={tenant}  "
                         f"state=?  (the events do not fold: {m.fold_error})")
        if m.timer is not None:
            lines.append(f"waiting: {m.timer.get('reason')} timer due {_utc(m.timer.get('due_at'))}, then back "
                         f"into {m.timer.get('topic')}")
        lines += [f"  {event_line(e)}" for e in m.events]
    lines += [f"note: {n}" for n in result.notes]
    return lines
