"""Liveness and readiness: is MongoDB reachable?"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from pymongo.errors import PyMongoError

from api.deps import ApiError, DbDep
from api.schemas import ErrorResponse, Health

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

PING_TIMEOUT_S = 2.0


@router.get("/healthz", response_model=Health, summary="Health check (no auth)",
            responses={503: {"model": ErrorResponse, "description": "MongoDB unreachable (`unavailable`)"}})
async def healthz(db: DbDep) -> Health:
    # Bounded: the driver would otherwise wait its whole server selection timeout (30 s by default),
    # longer than any probe.
    try:
        await asyncio.wait_for(db.command("ping"), PING_TIMEOUT_S)
    except (TimeoutError, PyMongoError) as e:
        log.warning("healthz: MongoDB ping failed: %r", e)
        raise ApiError(503, "unavailable", "MongoDB is unreachable") from e
    return Health()
