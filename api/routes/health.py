"""Liveness and readiness: is MongoDB reachable?"""

from __future__ import annotations

import logging

from fastapi import APIRouter

from api.deps import DbDep
from api.schemas import ErrorResponse, Health
from core.store.database import ping

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

PING_TIMEOUT_S = 2.0


@router.get("/healthz", response_model=Health, summary="Health check (no auth)",
            responses={503: {"model": ErrorResponse, "description": "MongoDB unreachable (`unavailable`)"}})
async def healthz(db: DbDep) -> Health:
    """200 when MongoDB answers a ping within PING_TIMEOUT_S; else StoreUnavailable, answered 503
    `unavailable` by api/errors.py."""
    await ping(db, PING_TIMEOUT_S)
    return Health()
