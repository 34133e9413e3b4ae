"""Tenant administration under /v1/admin/tenants, with the admin key (see api/routes/admin.py).

    POST   /v1/admin/tenants                          create; answers its first API key, shown once
    GET    /v1/admin/tenants                          every tenant
    GET    /v1/admin/tenants/{id}                     one tenant
    PATCH  /v1/admin/tenants/{id}                     name, priority, submit_tps, submit_burst
    POST   /v1/admin/tenants/{id}/suspend             {"reason"}: its API calls get 403 `tenant_suspended`
    POST   /v1/admin/tenants/{id}/resume
    GET    /v1/admin/tenants/{id}/keys                key metadata (never the keys or their hashes)
    POST   /v1/admin/tenants/{id}/keys                a new key, shown once; {"revoke_existing": true} rotates
    DELETE /v1/admin/tenants/{id}/keys/{key_id}       revoke (idempotent)
    GET    /v1/admin/tenants/{id}/changes             the audit: who changed what, when

Errors: 404 `tenant_not_found` / `key_not_found`, 409 `tenant_exists`, 422 `validation_error`. Every
change is recorded in `tenant_changes` with actor `admin-api` (core/store/tenants.py).

A change drops the tenant's cached API-key lookups in this process, so it applies here at once;
other API processes see it within their cache's TTL (10 s, api/deps.py). A suspended tenant's
messages already accepted are held by the workers, not lost, and go on when it is resumed.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from pydantic.json_schema import SkipJsonSchema

from api.deps import JsonBody, TenantCacheDep, TenantStoreDep
from api.routes.admin import AdminDep
from api.schemas import ADMIN_ERRORS, JSON_BODY_ERRORS, error_responses
from core.domain.events import utcnow
from core.domain.ratelimit import effective_burst
from core.store.tenants import (
    DEFAULT_PRIORITY,
    KEY_ID_RE,
    MAX_NAME_LEN,
    MAX_PRIORITY,
    MAX_SUBMIT_BURST,
    MAX_SUBMIT_TPS,
    MIN_PRIORITY,
    TENANT_ID_RE,
    TenantNotFound,
    key_prefix,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin/tenants", tags=["admin: tenants"], responses=ADMIN_ERRORS)

TenantIdPath = Annotated[str, Path(pattern=TENANT_ID_RE.pattern, description="Tenant id")]
KeyIdPath = Annotated[str, Path(pattern=KEY_ID_RE.pattern, description="Key id (`key_...`, or an old key's prefix)")]
NOT_FOUND = error_responses(404, described={404: "No such tenant (`tenant_not_found`)"})
KEY_NOT_FOUND = error_responses(404, described={404: "`tenant_not_found` or `key_not_found`"})

Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LEN, pattern=r"\S", description="Display name")]
Priority = Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY, strict=True,
                                description="Weight of the tenant's bulk (marketing) traffic when capacity is "
                                            "shared: 20 gets twice the share of 10. Transactional traffic "
                                            "always goes first.")]
SubmitTps = Annotated[float | None, Field(gt=0, le=MAX_SUBMIT_TPS, allow_inf_nan=False, strict=True,
                                          description="Messages per second the tenant may submit "
                                                      "(per API process); null = unlimited")]
SubmitBurst = Annotated[int | None, Field(ge=1, le=MAX_SUBMIT_BURST, strict=True,
                                          description="Messages it may submit at once; null = "
                                                      "max(1000, ceil(submit_tps))")]


# ---- request bodies --------------------------------------------------------------------------------

class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Annotated[str, Field(pattern=TENANT_ID_RE.pattern,
                             description="1-63 of a-z, 0-9, '_' and '-', starting with a letter or digit")]
    name: Name
    priority: Priority = DEFAULT_PRIORITY
    submit_tps: SubmitTps = None
    submit_burst: SubmitBurst = None


class TenantUpdate(BaseModel):
    """Only the fields sent change; null clears `submit_tps` (unlimited) or `submit_burst` (default)."""

    model_config = ConfigDict(extra="forbid")

    # Left out = unchanged; null is refused (there is no "no name"), so the schema does not offer it.
    name: Name | SkipJsonSchema[None] = None
    priority: Priority | SkipJsonSchema[None] = None
    submit_tps: SubmitTps = None
    submit_burst: SubmitBurst = None

    @field_validator("name", "priority")
    @classmethod
    def _not_null(cls, value: object) -> object:
        if value is None:
            raise ValueError("may be left out, not null")
        return value


class SuspendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=r"\S",
                                 description="Why (recorded; shown to operators, not to the tenant)")]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    revoke_existing: StrictBool = Field(default=False, description="Revoke every other key of the tenant at once "
                                                             "(otherwise they keep working until revoked)")


# ---- response bodies -------------------------------------------------------------------------------

class ApiKeyPublic(BaseModel):
    id: str
    prefix: str | None = Field(default=None, description="The key's first characters, to recognise it")
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    active: bool = Field(description="Not revoked")


class NewApiKey(BaseModel):
    id: str
    key: str = Field(description="The API key: shown this once, only its hash is stored")
    prefix: str


class TenantPublic(BaseModel):
    id: str
    name: str
    status: str = Field(description="active or suspended")
    priority: int
    submit_tps: float | None = Field(description="Messages per second; null = unlimited")
    submit_burst: int | None = Field(description="As set; null = the default")
    effective_burst: int | None = Field(description="The burst in force; null when unlimited")
    created_at: datetime | None = None
    suspended_at: datetime | None = None
    suspend_reason: str | None = None
    spent_minor: int = 0
    api_keys: list[ApiKeyPublic]


class TenantList(BaseModel):
    tenants: list[TenantPublic]


class TenantCreated(BaseModel):
    tenant: TenantPublic
    api_key: NewApiKey


class KeyList(BaseModel):
    tenant_id: str
    keys: list[ApiKeyPublic]


class KeyCreated(BaseModel):
    api_key: NewApiKey
    keys: list[ApiKeyPublic] = Field(description="All the tenant's keys after the change")


class TenantChange(BaseModel):
    actor: str = Field(description="Who: `admin-api`, `cli:<user>`, `system`, ...")
    at: datetime
    change: dict[str, Any] = Field(description="`action` (created, updated, suspended, resumed, key_created, "
                                               "key_revoked) and what changed")


class TenantChanges(BaseModel):
    tenant_id: str
    changes: list[TenantChange]


def _key_out(k: dict[str, Any]) -> ApiKeyPublic:
    return ApiKeyPublic(id=k["id"], prefix=k.get("prefix"), created_at=k.get("created_at"),
                        revoked_at=k.get("revoked_at"), active=k.get("revoked_at") is None)


def _out(doc: dict[str, Any]) -> TenantPublic:
    return TenantPublic(
        id=doc["_id"], name=doc.get("name", doc["_id"]), status=doc["status"], priority=doc["priority"],
        submit_tps=doc["submit_tps"], submit_burst=doc["submit_burst"],
        effective_burst=effective_burst(doc["submit_tps"], doc["submit_burst"]),
        created_at=doc.get("created_at"), suspended_at=doc.get("suspended_at"),
        suspend_reason=doc.get("suspend_reason"), spent_minor=doc.get("spent_minor", 0),
        api_keys=[_key_out(k) for k in doc["api_keys"]])


# ---- endpoints -------------------------------------------------------------------------------------

@router.post("", response_model=TenantCreated, status_code=201, summary="Create a tenant and its first API key",
             responses=JSON_BODY_ERRORS | error_responses(409, described={409: "`tenant_exists`"}),
             dependencies=[JsonBody])
async def create_tenant(body: TenantCreate, actor: AdminDep, tenants: TenantStoreDep) -> TenantCreated:
    key_id, key = await tenants.register(body.id, body.name, utcnow(), priority=body.priority,
                                         submit_tps=body.submit_tps, submit_burst=body.submit_burst, actor=actor)
    doc = await tenants.get(body.id)
    if doc is None:
        raise TenantNotFound(body.id)
    log.info("admin: tenant=%s created by %s (key %s)", body.id, actor, key_id)
    return TenantCreated(tenant=_out(doc), api_key=NewApiKey(id=key_id, key=key, prefix=key_prefix(key)))


@router.get("", response_model=TenantList, summary="List tenants")
async def list_tenants(_: AdminDep, tenants: TenantStoreDep) -> TenantList:
    return TenantList(tenants=[_out(d) for d in await tenants.list()])


@router.get("/{tenant_id}", response_model=TenantPublic, responses=NOT_FOUND, summary="One tenant")
async def get_tenant(tenant_id: TenantIdPath, _: AdminDep, tenants: TenantStoreDep) -> TenantPublic:
    doc = await tenants.get(tenant_id)
    if doc is None:
        raise TenantNotFound(tenant_id)
    return _out(doc)


@router.patch("/{tenant_id}", response_model=TenantPublic, responses=NOT_FOUND | JSON_BODY_ERRORS,
              dependencies=[JsonBody],
              summary="Change a tenant's name, priority or submission limits",
              description="Only the fields sent change. `submit_tps: null` removes the rate limit, "
                          "`submit_burst: null` restores the default burst. Applies at once in this API "
                          "process, within 10 s in the others.")
async def patch_tenant(tenant_id: TenantIdPath, body: TenantUpdate, actor: AdminDep, tenants: TenantStoreDep,
                       cache: TenantCacheDep) -> TenantPublic:
    fields = body.model_dump(include=body.model_fields_set)
    doc = await tenants.update_limits(tenant_id, utcnow(), actor=actor, **fields)
    cache.drop_tenant(tenant_id)
    log.info("admin: tenant=%s updated (%s) by %s", tenant_id, ", ".join(sorted(fields)) or "nothing", actor)
    return _out(doc)


@router.post("/{tenant_id}/suspend", response_model=TenantPublic, responses=NOT_FOUND | JSON_BODY_ERRORS,
             dependencies=[JsonBody],
             summary="Suspend a tenant",
             description="Its API calls are refused with 403 `tenant_suspended`; messages it had submitted are "
                         "held by the workers, not lost. Suspending a suspended tenant changes nothing.")
async def suspend_tenant(tenant_id: TenantIdPath, body: SuspendRequest, actor: AdminDep, tenants: TenantStoreDep,
                         cache: TenantCacheDep) -> TenantPublic:
    doc = await tenants.suspend(tenant_id, body.reason, utcnow(), actor=actor)
    cache.drop_tenant(tenant_id)
    log.warning("admin: tenant=%s suspended by %s: %s", tenant_id, actor, body.reason)
    return _out(doc)


@router.post("/{tenant_id}/resume", response_model=TenantPublic, responses=NOT_FOUND,
             summary="Resume a suspended tenant", description="Its held messages go on; a no-op if it is active.")
async def resume_tenant(tenant_id: TenantIdPath, actor: AdminDep, tenants: TenantStoreDep,
                        cache: TenantCacheDep) -> TenantPublic:
    doc = await tenants.resume(tenant_id, utcnow(), actor=actor)
    cache.drop_tenant(tenant_id)
    log.info("admin: tenant=%s resumed by %s", tenant_id, actor)
    return _out(doc)


@router.get("/{tenant_id}/keys", response_model=KeyList, responses=NOT_FOUND, summary="A tenant's API keys (metadata)")
async def list_keys(tenant_id: TenantIdPath, _: AdminDep, tenants: TenantStoreDep) -> KeyList:
    keys = await tenants.list_keys(tenant_id)
    if keys is None:
        raise TenantNotFound(tenant_id)
    return KeyList(tenant_id=tenant_id, keys=[_key_out(k) for k in keys])


@router.post("/{tenant_id}/keys", response_model=KeyCreated, status_code=201, responses=NOT_FOUND | JSON_BODY_ERRORS,
             dependencies=[JsonBody],
             summary="Issue a new API key (rotation)",
             description="The key is shown once. The tenant's other keys keep working until revoked, unless "
                         "`revoke_existing` is true.")
async def create_key(tenant_id: TenantIdPath, actor: AdminDep, tenants: TenantStoreDep, cache: TenantCacheDep,
                     body: Annotated[KeyCreate | None, Body()] = None) -> KeyCreated:
    revoke_existing = body.revoke_existing if body is not None else False
    key_id, key = await tenants.rotate_key(tenant_id, utcnow(), revoke_existing, actor=actor)
    if revoke_existing:
        cache.drop_tenant(tenant_id)
    log.info("admin: tenant=%s new key %s by %s%s", tenant_id, key_id, actor,
             ", others revoked" if revoke_existing else "")
    keys = await tenants.list_keys(tenant_id) or []
    return KeyCreated(api_key=NewApiKey(id=key_id, key=key, prefix=key_prefix(key)), keys=[_key_out(k) for k in keys])


@router.delete("/{tenant_id}/keys/{key_id}", response_model=ApiKeyPublic, responses=KEY_NOT_FOUND,
               summary="Revoke an API key",
               description="Answers the key's metadata; revoking a revoked key changes nothing. Requests with it get "
                           "401 at once in this API process, within 10 s in the others.")
async def revoke_key(tenant_id: TenantIdPath, key_id: KeyIdPath, actor: AdminDep, tenants: TenantStoreDep,
                     cache: TenantCacheDep) -> ApiKeyPublic:
    key = await tenants.revoke_key(tenant_id, key_id, utcnow(), actor=actor)
    cache.drop_tenant(tenant_id)
    log.info("admin: tenant=%s key %s revoked by %s", tenant_id, key_id, actor)
    return _key_out(key)


@router.get("/{tenant_id}/changes", response_model=TenantChanges, responses=NOT_FOUND,
            summary="Recorded changes of a tenant, oldest first")
async def tenant_changes(tenant_id: TenantIdPath, _: AdminDep, tenants: TenantStoreDep,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> TenantChanges:
    changes = await tenants.history(tenant_id, limit)
    if not changes and await tenants.get(tenant_id) is None:
        raise TenantNotFound(tenant_id)
    return TenantChanges(tenant_id=tenant_id, changes=[TenantChange(**c) for c in changes])
