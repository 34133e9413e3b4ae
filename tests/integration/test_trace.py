"""`msgcore trace` as a real process against a real MongoDB-wire server (and PostgreSQL for numbers)."""

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
from projections.projector import apply_events
from projections.schema import migrate

ROOT = Path(__file__).resolve().parents[2]
BASE = datetime(2026, 6, 1, 8, 30, tzinfo=UTC)


def history(mid: str, to: str, smsc_id: str) -> list[dict[str, Any]]:
    kinds: list[tuple[str, str | None, dict[str, Any]]] = [
        ("accepted", None, {"to": to, "sender": "Acme", "text": "secret code 1234", "encoding": "gsm7", "parts": 1,
                            "priority": 10, "validity_s": 3600, "send_at": None, "campaign_id": None,
                            "client_ref": "order-9"}),
        ("routed", "sim", {"route_id": "sim", "price_per_part": 5, "currency": "EUR", "strategy": "smart"}),
        ("retry", "sim", {"route_id": "sim", "attempt": 1, "error_code": 88, "error_name": "ESME_RTHROTTLED"}),
        ("sent", "sim", {"route_id": "sim", "smsc_message_ids": [smsc_id], "attempt": 2, "parts": 1}),
        ("delivered", "sim", {"route_id": "sim", "smsc_message_id": smsc_id, "stat": "DELIVRD", "err": "000"}),
        ("billed", "sim", {"route_id": "sim", "parts": 1, "price_per_part": 5, "amount": 5, "currency": "EUR"}),
    ]
    return [{"message_id": mid, "seq": seq, "type": kind, "at": BASE + timedelta(seconds=seq), "tenant_id": "acme",
             "route_id": route, "channel": "sms", "v": 1, "data": data}
            for seq, (kind, route, data) in enumerate(kinds, start=1)]


async def seed(db: AsyncDatabase, mid: str, to: str, smsc_id: str) -> list[dict[str, Any]]:
    await EventStore(db).ensure_indexes()
    docs = history(mid, to, smsc_id)
    await db["events"].insert_many([dict(d) for d in docs])
    await db["streams"].insert_one({"_id": mid, "tenant_id": "acme", "state": "delivered", "version": len(docs),
                                    "route_id": "sim", "attempts": 2, "msg": {"to": to, "sender": "Acme"}})
    return docs


async def run_trace(db: AsyncDatabase, mongo_url: str, query: str, tmp_path: Path, pg_url: str = "",
                    schema: str = "reporting") -> tuple[int, str, str]:
    env = {**os.environ, "MSGCORE_MONGO_URL": mongo_url, "MSGCORE_MONGO_DB": db.name,
           "MSGCORE_PG_URL": pg_url, "MSGCORE_REPORTING_SCHEMA": schema, "MSGCORE_DATA_DIR": str(tmp_path)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "trace", query, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def assert_full_history(out: str, mid: str, smsc_id: str, found_by: str) -> None:
    assert f"message {mid}  (found by {found_by})" in out, out
    lines = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert [line.split()[0] for line in lines] == ["1", "2", "3", "4", "5", "6"], out
    assert [line.split()[2] for line in lines] == ["accepted", "routed", "retry", "sent", "delivered", "billed"]
    assert lines[0].split()[1] == "2026-06-01T08:30:01.000+00:00"
    assert all("route=sim" in line for line in lines[1:])
    assert f"smsc_message_ids={smsc_id}" in lines[3] and "attempt=2" in lines[3]
    assert "stat=DELIVRD" in lines[4] and "err=000" in lines[4]
    assert "error_code=88" in lines[2] and "amount=5" in lines[5]
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


async def test_trace_by_phone_number_scans_heads_without_postgres(mongo_db: AsyncDatabase, mongo_url: str,
                                                                  tmp_path: Path) -> None:
    mid, smsc_id = f"01PHONE{uuid.uuid4().hex[:12].upper()}", "77001"
    await seed(mongo_db, mid, "+4915155500002", smsc_id)
    await seed(mongo_db, f"{mid}-other", "+4915155500009", "77009")

    code, out, err = await run_trace(mongo_db, mongo_url, "4915155500002", tmp_path)
    assert code == 0, err
    assert_full_history(out, mid, smsc_id, "phone number +4915155500002")
    assert f"{mid}-other" not in out
    assert "no index on msg.to" in out  # the operator is told the scan is unindexed and capped


async def test_trace_by_phone_number_through_postgres(mongo_db: AsyncDatabase, mongo_url: str, pg_url: str,
                                                      pg_schema: str, tmp_path: Path) -> None:
    mid, smsc_id = f"01PGTRC{uuid.uuid4().hex[:12].upper()}", "88001"
    docs = await seed(mongo_db, mid, "+4915155500003", smsc_id)
    await migrate(pg_url, pg_schema)
    await apply_events(pg_url, pg_schema, docs)

    code, out, err = await run_trace(mongo_db, mongo_url, "+4915155500003", tmp_path, pg_url=pg_url, schema=pg_schema)
    assert code == 0, err
    assert_full_history(out, mid, smsc_id, "phone number +4915155500003")
    assert f"found in PostgreSQL {pg_schema}.messages" in out and "no index on msg.to" not in out
