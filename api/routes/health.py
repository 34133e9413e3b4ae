"""Health, readiness and metrics of the api process.

    /healthz  200 `{"status": "ok"}` while the process and its event loop answer: liveness only, no
              store round trip (a MongoDB outage must not get every api copy restarted).
    /readyz   200 or 503 with each store's check: MongoDB, and PostgreSQL when search is configured.
    /metrics  the Prometheus text exposition: the catalogue (core/metrics.py, incl. the request
              counters of api.app.MetricsMiddleware) and the store gauges (backlog, route status).

/readyz and /metrics are for probes and Prometheus, not clients: they are left out of the OpenAPI
document (no auth, no error shape of the public API).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import psycopg
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from api.deps import DbDep, SettingsDep
from core.domain.events import utcnow
from core.metrics import CONTENT_TYPE_LATEST, render
from core.metrics_store import StoreGauges
from core.readiness import CHECK_TIMEOUT_S, Check, all_ok, mongo_check, run_checks
from core.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


class Alive(BaseModel):
    status: Literal["ok"] = "ok"


@router.get("/healthz", response_model=Alive, summary="Liveness check (no auth, no store round trip)")
async def healthz() -> Alive:
    """200 whenever the process answers. Whether its stores answer is /readyz's question."""
    return Alive()


def _pg_check(pool: AsyncConnectionPool) -> Check:
    async def check() -> None:
        try:
            async with pool.connection(timeout=CHECK_TIMEOUT_S) as conn:
                await conn.execute("SELECT 1")
        except psycopg.Error as e:  # PoolTimeout included
            raise StoreUnavailable(f"postgres: {e!r}") from e

    return check


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request, db: DbDep) -> JSONResponse:
    """200 `{"status": "ok", "checks": {...}}` when every store answers, else 503 with
    `"status": "unavailable"` and which check failed."""
    checks = {"mongo": mongo_check(db)}
    pool = request.app.state.pg_pool
    if pool is not None:
        checks["postgres"] = _pg_check(pool)
    results = await run_checks(checks)
    ok = all_ok(results)
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": results}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, db: DbDep, settings: SettingsDep) -> Response:
    gauges: StoreGauges | None = getattr(request.app.state, "store_gauges", None)
    if gauges is None or gauges.db is not db:
        gauges = StoreGauges(db, utcnow, lane_detail=settings.metrics_lane_detail)
        request.app.state.store_gauges = gauges
    await gauges.refresh()
    return Response(render(gauges.registry), media_type=CONTENT_TYPE_LATEST)
