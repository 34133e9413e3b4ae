"""`msgcore trace <message id | SMSC message id | phone number>`: a message's full history from the log.

Lookups, all tried (an SMSC id may look like anything, even like a number):
- message id: `events` by (message_id, seq), indexed;
- SMSC message id: the `sent` events' `data.smsc_message_ids` index;
- phone number (E.164, `+` optional): `reporting.messages.to_number` in PostgreSQL when configured
  (it may lag the log by the projector's lag); failing that, or with `scan`, the heads in `streams`
  (`msg.to`), which have NO index on the number: that scan reads the whole collection, so it is
  capped in matches and in server time, and the output says so.

The events printed always come from the log itself (MongoDB), never from the reporting copy.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ExecutionTimeout

log = logging.getLogger(__name__)

PHONE = re.compile(r"^\+?[1-9][0-9]{5,14}$")
DEFAULT_MAX_MESSAGES = 20
DEFAULT_SCAN_TIME_S = 30.0
# Data keys worth a glance, in print order; `text` is left out on purpose (content is not audit data).
KEY_DATA = ("to", "sender", "parts", "encoding", "priority", "campaign_id", "client_ref", "strategy",
            "price_per_part", "smsc_message_ids", "smsc_message_id", "stat", "err", "attempt", "error_code",
            "error_name", "reason", "possible_duplicate", "amount", "currency", "actor")


@dataclass
class MessageTrace:
    message_id: str
    found_by: str  # "message id", "SMSC message id", "phone number (...)"
    head: dict[str, Any] | None
    events: list[dict[str, Any]]


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


async def _ids_by_smsc_id(db: AsyncDatabase, smsc_id: str, limit: int) -> list[str]:
    cursor = db["events"].find({"data.smsc_message_ids": smsc_id, "type": "sent"}, {"message_id": 1}).limit(limit)
    return list(dict.fromkeys([d["message_id"] async for d in cursor]))


async def _ids_by_phone_pg(pg_url: str, schema: str, number: str, limit: int) -> list[str]:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(
            sql.SQL("SELECT message_id FROM {}.messages WHERE to_number = %s"
                    " ORDER BY accepted_at DESC NULLS LAST, message_id DESC LIMIT %s").format(sql.Identifier(schema)),
            (number, limit))
        return [r[0] for r in await cur.fetchall()]


async def _ids_by_phone_scan(db: AsyncDatabase, number: str, limit: int, scan_time_s: float,
                             notes: list[str]) -> list[str]:
    notes.append(f"scanned the heads (`streams`, no index on msg.to) for {number}: at most {limit} messages and "
                 f"{scan_time_s:.0f}s of server time")
    cursor = db["streams"].find({"msg.to": number}, {"_id": 1}).limit(limit).max_time_ms(int(scan_time_s * 1000))
    ids: list[str] = []
    try:
        async for d in cursor:
            ids.append(d["_id"])
    except ExecutionTimeout:
        notes.append(f"the scan stopped after {scan_time_s:.0f}s: the list may be incomplete")
    if len(ids) >= limit:
        notes.append(f"stopped at {limit} messages (raise --max-messages for more)")
    return ids


async def _phone_ids(db: AsyncDatabase, number: str, *, pg_url: str | None, schema: str, limit: int,
                     scan: bool, scan_time_s: float, notes: list[str]) -> list[str]:
    ids: list[str] = []
    if pg_url:
        try:
            ids = await _ids_by_phone_pg(pg_url, schema, number, limit)
            notes.append(f"{len(ids)} message(s) to {number} found in PostgreSQL {schema}.messages "
                         "(messages the projector has not reached yet are not among them)")
        except psycopg.Error as e:
            notes.append(f"PostgreSQL lookup failed ({e.__class__.__name__}: {e}); falling back to a scan")
    if scan or not ids:
        ids += [i for i in await _ids_by_phone_scan(db, number, limit, scan_time_s, notes) if i not in ids]
    return ids


async def trace(
    db: AsyncDatabase,
    query: str,
    *,
    pg_url: str | None = None,
    schema: str = "reporting",
    max_messages: int = DEFAULT_MAX_MESSAGES,
    scan: bool = False,
    scan_time_s: float = DEFAULT_SCAN_TIME_S,
) -> TraceResult:
    """The messages `query` names (by message id, SMSC message id or phone number), each with its
    head and every event from the log in seq order."""
    result = TraceResult(query=query)
    found: dict[str, str] = {}
    if await db["events"].find_one({"message_id": query}, {"_id": 1}) is not None:
        found[query] = "message id"
    for mid in await _ids_by_smsc_id(db, query, max_messages):
        found.setdefault(mid, "SMSC message id")
    number = normalise_phone(query)
    if number is not None:
        for mid in await _phone_ids(db, number, pg_url=pg_url, schema=schema, limit=max_messages, scan=scan,
                                    scan_time_s=scan_time_s, notes=result.notes):
            found.setdefault(mid, f"phone number {number}")
    for mid, how in list(found.items())[:max_messages]:
        events = await db["events"].find({"message_id": mid}).sort("seq", ASCENDING).to_list(None)
        result.messages.append(MessageTrace(mid, how, await db["streams"].find_one({"_id": mid}), events))
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
    """`seq  time  type  route=..  key=value ...` for one event document."""
    data = doc.get("data") or {}
    route = doc.get("route_id") or data.get("route_id") or "-"
    details = "  ".join(f"{k}={_value(data[k])}" for k in KEY_DATA if data.get(k) not in (None, "", []))
    return f"{doc.get('seq', '?'):>3}  {_utc(doc.get('at'))}  {doc.get('type', '?'):<13}  route={route}  {details}"


def format_trace(result: TraceResult) -> list[str]:
    lines: list[str] = []
    for m in result.messages:
        head = m.head or {}
        msg = head.get("msg", {})
        tenant = head.get("tenant_id") or (m.events[0].get("tenant_id") if m.events else "-")
        lines.append(f"message {m.message_id}  (found by {m.found_by})  tenant={tenant}  to={msg.get('to', '-')}  "
                     f"state={head.get('state', '-')}  version={head.get('version', '-')}  "
                     f"attempts={head.get('attempts', 0)}  route={head.get('route_id') or '-'}")
        if m.head is None:
            lines.append("  (no head in `streams`: `msgcore heads rebuild` recreates it from the log)")
        lines += [f"  {event_line(e)}" for e in m.events]
    lines += [f"note: {n}" for n in result.notes]
    return lines
