"""`msgcore trace` as a real process against a real MongoDB-wire server: the history and the state come
from the log alone (the fold of the events), a phone number is found through the `accepted` events."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from core.store.eventstore import EventStore
from core.store.numbers import ensure_inbound_indexes
from core.store.timers import timer_doc

ROOT = Path(__file__).resolve().parents[2]
BASE = datetime(2026, 6, 1, 8, 30, tzinfo=UTC)


def history(mid: str, to: str, smsc_id: str) -> list[dict[str, Any]]:
    kinds: list[tuple[str, str | None, dict[str, Any]]] = [
        ("accepted", None, {"to": to, "sender": "Acme", "text": "secret code 1234", "encoding": "gsm7", "parts": 1,
                            "priority": 10, "validity_s": 3600, "send_at": None, "campaign_id": None,
                            "client_ref": "order-9"}),
        ("routed", "sim", {"route_id": "sim", "price_per_part": 5, "currency": "EUR", "strategy": "smart"}),
        ("retry", "sim", {"route_id": "sim", "attempt": 1, "error_code": 88, "error_name": "ESME_RTHROTTLED"}),
        ("released", None, {"reason": "retry", "topic": "route"}),
        ("routed", "sim", {"route_id": "sim", "price_per_part": 5, "currency": "EUR", "strategy": "smart"}),
        ("sent", "sim", {"route_id": "sim", "smsc_message_ids": [smsc_id], "attempt": 2, "parts": 1}),
        ("delivered", "sim", {"route_id": "sim", "smsc_message_id": smsc_id, "stat": "DELIVRD", "err": "000"}),
        ("billed", "sim", {"route_id": "sim", "parts": 1, "price_per_part": 5, "amount": 5, "currency": "EUR"}),
    ]
    return [{"message_id": mid, "seq": seq, "type": kind, "at": BASE + timedelta(seconds=seq), "tenant_id": "acme",
             "route_id": route, "channel": "sms", "v": 1, "data": data}
            for seq, (kind, route, data) in enumerate(kinds, start=1)]


TOPICS = {2: "send:sim", 4: "route", 5: "send:sim", 6: "await:sim"}  # seq -> the topic the event went to


async def seed(db: AsyncDatabase, mid: str, to: str, smsc_id: str, indexed: bool = True) -> list[dict[str, Any]]:
    await EventStore(db).ensure_indexes()
    if indexed:
        await ensure_inbound_indexes(db)
    docs = history(mid, to, smsc_id)
    base = await db["events"].count_documents({})
    await db["events"].insert_many([{**d, "topic": TOPICS[d["seq"]], "pos": base + d["seq"]} if d["seq"] in TOPICS
                                    else dict(d) for d in docs])
    return docs
async def run_trace(db: AsyncDatabase, mongo_url: str, query: str, tmp_path: Path) -> tuple[int, str, str]:
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": db.name, "MSGCORE_PG_URL": "",
           "MSGCORE_DATA_DIR": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "trace", query, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_full_history(out: str, mid: str, smsc_id: str, found_by: str) -> None:
    assert f"message {mid}  (found by {found_by})" in out, out
    header = next(line for line in out.splitlines() if line.startswith(f"message {mid}"))
    # The state is the fold of the events: no other document is read for it.
    assert "tenant=acme" in header and "state=delivered" in header and "version=8" in header
    assert "attempts=2" in header and "route=sim" in header and "billed=yes" in header
    lines = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert [line.split()[0] for line in lines] == ["1", "2", "3", "4", "5", "6", "7", "8"], out
    assert [line.split()[2] for line in lines] == ["accepted", "routed", "retry", "released", "routed", "sent",
                                                   "delivered", "billed"]
    assert lines[0].split()[1] == "2026-06-01T08:30:01.000+00:00"
    assert all("route=sim" in line for i, line in enumerate(lines[1:], start=2) if i != 4)
    assert f"smsc_message_ids={smsc_id}" in lines[5] and "attempt=2" in lines[5]
    assert lines[5].endswith("-> await:sim@" + lines[5].rsplit("@", 1)[1]) and "-> send:sim@" in lines[1]
    assert "stat=DELIVRD" in lines[6] and "err=000" in lines[6]
    assert "error_code=88" in lines[2] and "amount=5" in lines[7] and "reason=retry" in lines[3]
    assert "secret code" not in out  # message text is not audit data


async def test_trace_by_message_id_and_smsc_id(mongo_db: AsyncDatabase, mongo_url: str, tmp_path: Path) -> None:
    mid, smsc_id = f"01TRACE{uuid.uuid4().hex[:12].upper()}", f"smsc-{uuid.uuid4().hex[:8]}"
    await seed(mongo_db, mid, "+4915155500001", smsc_id)

    code, out, err = await run_trace(mongo_db, mongo_url, mid, tmp_path)
    assert code == 0, err
    assert_full_history(out, mid, smsc_id, "message id")

    code, out, err = await run_trace(mongo_db, mongo_url, smsc_id, tmp_path)
    assert code == 0, err
    assert_full_history(out, mid, smsc_id, "SMSC message id")

    code, out, err = await run_trace(mongo_db, mongo_url, "no-such-thing", tmp_path)
    assert code == 1 and "no message found" in err


async def test_trace_by_phone_number_through_the_accepted_events(mongo_db: AsyncDatabase, mongo_url: str,
                                                                  tmp_path: Path) -> None:
    mid, smsc_id = f"01PHONE{uuid.uuid4().hex[:12].upper()}", "77001"
    await seed(mongo_db, mid, "+4915155500002", smsc_id)
    await seed(mongo_db, f"{mid}-other", "+4915155500009", "77009")

    code, out, err = await run_trace(mongo_db, mongo_url, "4915155500002", tmp_path)
    assert code == 0, err
    assert_full_history(out, mid, smsc_id, "phone number +4915155500002")
    assert f"{mid}-other" not in out
    assert "scanned" not in out  # through the accepted_to index


async def test_trace_by_phone_number_without_the_index_says_it_scanned(mongo_db: AsyncDatabase, mongo_url: str,
                                                                        tmp_path: Path) -> None:
    mid, smsc_id = f"01PGTRC{uuid.uuid4().hex[:12].upper()}", "88001"
    await seed(mongo_db, mid, "+4915155500003", smsc_id, indexed=False)

    code, out, err = await run_trace(mongo_db, mongo_url, "+4915155500003", tmp_path)
    assert code == 0, err
    assert_full_history(out, mid, smsc_id, "phone number +4915155500003")
    assert "no index accepted_to" in out  # the operator is told the lookup scanned and was capped


async def test_trace_shows_the_timer_a_message_waits_on(mongo_db: AsyncDatabase, mongo_url: str,
                                                        tmp_path: Path) -> None:
    mid = f"01WAIT{uuid.uuid4().hex[:12].upper()}"
    docs = history(mid, "+4915155500004", "99001")[:3]  # accepted, routed, retry
    await EventStore(mongo_db).ensure_indexes()
    await mongo_db["events"].insert_many(docs)
    await mongo_db["timers"].insert_one({"_id": mid, **timer_doc(
        message_id=mid, tenant_id="acme", topic="route", seq=3, due_at=BASE + timedelta(minutes=1), reason="retry")})

    code, out, err = await run_trace(mongo_db, mongo_url, mid, tmp_path)
    assert code == 0, err
    assert "state=retry  version=3" in out and "billed=no" in out
    assert "waiting: retry timer due 2026-06-01T08:31:00.000+00:00, then back into route" in out
