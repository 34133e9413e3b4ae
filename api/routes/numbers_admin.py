"""Numbers assigned to tenants, under /v1/admin/numbers (admin key): an MO message to a number is
recorded for the tenant that owns it.

    GET    /v1/admin/numbers?tenant_id=&limit=&after=   list, ordered by number (keyset pagination)
    PUT    /v1/admin/numbers/{number}  {"tenant_id"}    assign (or move) a number to a tenant
    DELETE /v1/admin/numbers/{number}                   unassign; MO to it is then kept as an orphan

A number is E.164 ("+4915112345678"; write the "+" as %2B or as is) or a short code ("12345").
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field

from api.deps import JsonBody, NumberStoreDep, TenantStoreDep
from api.errors import ApiError
from api.routes.admin import AdminDep
from api.schemas import ADMIN_ERRORS, JSON_BODY_ERRORS, error_responses
from core.domain.events import utcnow
from core.store.numbers import MAX_PAGE, NUMBER_RE, Assignment
from core.store.tenants import TENANT_ID_RE

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin/numbers", tags=["admin"], responses=ADMIN_ERRORS)

NumberPath = Annotated[str, Path(pattern=NUMBER_RE.pattern, description="E.164 number or short code")]
NOT_FOUND = error_responses(404, described={404: "No such tenant / number not assigned (`not_found`)"})


class NumberAssign(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant_id: Annotated[str, Field(pattern=TENANT_ID_RE.pattern)]


class NumberPublic(BaseModel):
    number: str
    tenant_id: str
    assigned_at: datetime
    actor: str


class NumberAssigned(NumberPublic):
    previous_tenant_id: str | None = Field(default=None, description="Who owned the number before, if anyone")


class NumberPage(BaseModel):
    numbers: list[NumberPublic]
    next_after: str | None = Field(default=None, description="Pass as `after` for the next page; null at the end")


def _public(a: Assignment) -> NumberPublic:
    return NumberPublic(number=a.number, tenant_id=a.tenant_id, assigned_at=a.assigned_at, actor=a.actor)


@router.get("", response_model=NumberPage, summary="List numbers assigned to tenants")
async def list_numbers(
    _: AdminDep,
    numbers: NumberStoreDep,
    tenant_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    after: Annotated[str | None, Query(max_length=32, description="Last number of the previous page")] = None,
) -> NumberPage:
    if after is not None:  # an unencoded "+" in a query string arrives as a space; numbers have none
        after = after.replace(" ", "+")
    items = await numbers.list(tenant_id, limit, after)
    return NumberPage(numbers=[_public(a) for a in items],
                      next_after=items[-1].number if len(items) == limit else None)


@router.put("/{number}", response_model=NumberAssigned, responses=NOT_FOUND | JSON_BODY_ERRORS, dependencies=[JsonBody],
            summary="Assign a number to a tenant (moves it if another tenant had it)")
async def assign_number(number: NumberPath, body: NumberAssign, actor: AdminDep, numbers: NumberStoreDep,
                        tenants: TenantStoreDep) -> NumberAssigned:
    if await tenants.get(body.tenant_id) is None:
        raise ApiError(404, "not_found", "no such tenant", {"tenant_id": body.tenant_id})
    now = utcnow()
    previous = await numbers.assign(number, body.tenant_id, actor, now)
    if previous is not None and previous.tenant_id != body.tenant_id:
        log.warning("number %s moved from tenant %s to tenant %s by %s", number, previous.tenant_id, body.tenant_id,
                    actor)
    else:
        log.info("number %s assigned to tenant %s by %s", number, body.tenant_id, actor)
    return NumberAssigned(number=number, tenant_id=body.tenant_id, assigned_at=now, actor=actor,
                          previous_tenant_id=previous.tenant_id if previous else None)


@router.delete("/{number}", status_code=204, responses=NOT_FOUND, summary="Unassign a number")
async def unassign_number(number: NumberPath, actor: AdminDep, numbers: NumberStoreDep) -> Response:
    removed = await numbers.unassign(number)
    if removed is None:
        raise ApiError(404, "not_found", "number not assigned", {"number": number})
    log.info("number %s unassigned from tenant %s by %s", number, removed.tenant_id, actor)
    return Response(status_code=204)
