"""Operator endpoints under /v1/admin, authenticated with the admin key (never a tenant's API key).

    GET  /v1/admin/dead-letters?tenant_id=&state=&limit=&after=   list (keyset pagination by id)
    POST /v1/admin/dead-letters/requeue                           {"message_ids": [...], "reason": "..."}

Authentication: `Authorization: Bearer <settings.admin_key>`, compared in constant time. A missing
or wrong key answers 401 `unauthorized`; when no admin key is configured every admin endpoint answers
403 `admin_disabled`. Requeueing appends `requeued` events (see core/store/deadletters.py); it never
edits the log.
"""

from __future__ import annotations

import hmac
import logging
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from api.deps import DbDep, EventStoreDep, JsonBody, SettingsDep
from api.errors import ApiError
from api.schemas import ADMIN_ERRORS, JSON_BODY_ERRORS
from core.domain.events import utcnow
from core.store.deadletters import MAX_PAGE, MAX_REQUEUE, list_dead_letters, requeue

log = logging.getLogger(__name__)

ADMIN_ACTOR = "admin-api"

admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminKey", description="The admin key (MSGCORE_ADMIN_KEY)")

async def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)],
) -> str:
    """The caller holds the admin key; returns the actor name recorded in events.

    403 `admin_disabled` if `settings.admin_key` is empty; 401 `unauthorized` if the key is missing or
    wrong (a tenant's API key is wrong here)."""
    if not settings.admin_key:
        raise ApiError(403, "admin_disabled", "admin endpoints are disabled: no admin key is configured")
    if credentials is None:
        raise ApiError(401, "unauthorized", "missing admin key: send 'Authorization: Bearer <admin key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(credentials.credentials.encode(), settings.admin_key.encode()):
        log.info("admin auth failed: wrong key")
        raise ApiError(401, "unauthorized", "invalid admin key",
                       headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return ADMIN_ACTOR


AdminDep = Annotated[str, Depends(require_admin)]

router = APIRouter(prefix="/v1/admin", tags=["admin"], responses=ADMIN_ERRORS)

RequeueState = Literal["dead_lettered", "failed"]


class DeadLetter(BaseModel):
    id: str
    tenant_id: str
    to: str
    state: str
    attempts: int
    route_id: str | None = None
    reason: str | None = Field(default=None, description="`data.reason` of the event that ended the message")
    at: datetime | None = Field(default=None, description="When that event happened (UTC)")


class DeadLetterPage(BaseModel):
    dead_letters: list[DeadLetter]
    next_after: str | None = Field(default=None, description="Pass as `after` for the next page; null at the end")


class RequeueRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message_ids: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]],
                           Field(min_length=1, max_length=MAX_REQUEUE)]
    reason: Annotated[str, Field(min_length=1, max_length=500)]
    state: RequeueState = Field(default="dead_lettered", description="Requeue messages in this state")


class RequeueResponse(BaseModel):
    requeued: list[str] = Field(description="Got a `requeued` event: back in the router's queue, attempts 0")
    not_found: list[str]
    not_dead: list[str] = Field(description="Not in the state asked for; nothing appended")
    conflicts: list[str] = Field(description="Changed by another writer meanwhile; nothing appended, try again")
    states: dict[str, str] = Field(default_factory=dict, description="Current state of each `not_dead` id")


@router.get("/dead-letters", response_model=DeadLetterPage, summary="List dead-lettered (or failed) messages")
async def get_dead_letters(
    _: AdminDep,
    db: DbDep,
    tenant_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    state: RequeueState = "dead_lettered",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[str | None, Query(max_length=64, description="Id of the last item of the previous page")] = None,
) -> DeadLetterPage:
    items = await list_dead_letters(db, tenant_id, limit, after, state=state)
    return DeadLetterPage(dead_letters=[DeadLetter(**i) for i in items],
                          next_after=items[-1]["id"] if len(items) == limit else None)


@router.post("/dead-letters/requeue", response_model=RequeueResponse, responses=JSON_BODY_ERRORS,
             dependencies=[JsonBody], summary="Requeue messages: appends `requeued`, sends them back to the router")
async def post_requeue(body: RequeueRequest, actor: AdminDep, store: EventStoreDep) -> RequeueResponse:
    result = await requeue(store, body.message_ids, actor, body.reason, utcnow(), state=body.state)
    log.info("admin requeue: %d requeued (first %s), %d not found, %d not %s, %d conflicts",
             len(result.requeued), result.requeued[:1], len(result.not_found), len(result.not_dead), body.state,
             len(result.conflicts))
    return RequeueResponse(requeued=result.requeued, not_found=result.not_found, not_dead=result.not_dead,
                           conflicts=result.conflicts, states=result.states)
