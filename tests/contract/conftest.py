"""One contract suite, every adapter: each test of tests/contract/ runs once per adapter of the event
log's ports (core/store/ports.py): `mongo` (core/store/topics.py, owners.py, timers.py against the
session's real server, a fresh database per test) and `memory` (core/store/memory.py).

A test sees the adapter only through `Adapter`: the three ports plus two helpers for what the ports
do not read (tenants touched by `extra` writes). Selecting `-k memory` starts no server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from pymongo.asynchronous.database import AsyncDatabase

from core.store.eventstore import EventStore
from core.store.memory import InMemory
from core.store.owners import Owners
from core.store.ports import EventLogPort, OwnersPort, TimersPort
from core.store.timers import Timers
from core.store.topics import EventLog

ADAPTERS = ["memory", "mongo"]


@dataclass
class Adapter:
    name: str
    log: EventLogPort
    owners: OwnersPort
    timers: TimersPort
    add_tenant: Callable[[str], Awaitable[None]]  # a tenant document with spent_minor 0
    spent: Callable[[str], Awaitable[int]]  # a tenant's spent_minor, as `extra` writes left it


@pytest.fixture(params=ADAPTERS)
def backend(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """The adapter's name and its database (MongoDB's only; requested lazily so that the memory
    adapter alone needs no server)."""
    if request.param == "mongo":
        return "mongo", request.getfixturevalue("mongo_db")
    return "memory", InMemory()


@pytest_asyncio.fixture(loop_scope="session")
async def adapter(backend: tuple[str, Any]) -> Adapter:
    name, handle = backend
    if name == "mongo":
        return await _mongo(handle)
    return _memory(handle)


async def _mongo(db: AsyncDatabase[Any]) -> Adapter:
    await EventStore(db).ensure_indexes()

    async def add_tenant(tenant_id: str) -> None:
        await db["tenants"].insert_one({"_id": tenant_id, "spent_minor": 0})

    async def spent(tenant_id: str) -> int:
        doc = await db["tenants"].find_one({"_id": tenant_id})
        return int((doc or {}).get("spent_minor", 0))

    return Adapter("mongo", EventLog(db), Owners(db), Timers(db), add_tenant, spent)


def _memory(mem: InMemory) -> Adapter:
    async def add_tenant(tenant_id: str) -> None:
        mem.data.tenants[tenant_id] = {"_id": tenant_id, "spent_minor": 0}

    async def spent(tenant_id: str) -> int:
        return int(mem.data.tenants.get(tenant_id, {}).get("spent_minor", 0))

    return Adapter("memory", mem.log, mem.owners, mem.timers, add_tenant, spent)
