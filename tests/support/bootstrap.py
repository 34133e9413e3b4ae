"""Set up a fresh database for a process-level test: indexes, a route to the simulator, a tenant."""

from __future__ import annotations

from core.domain.events import utcnow
from core.domain.routing import Route
from core.store.mongo import connect
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from ops.components import prepare


async def seed(mongo_url: str, db_name: str, routes: list[Route], tenants: list[str]) -> dict[str, str]:
    """Returns an API key per tenant."""
    client = connect(mongo_url, "test")
    try:
        db = client[db_name]
        await prepare(db)
        now = utcnow()
        for r in routes:
            await RouteStore(db).upsert(r, actor="test", now=now)
        return {t: await TenantStore(db).create(t, t.title(), now) for t in tenants}
    finally:
        await client.close()
