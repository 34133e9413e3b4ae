"""SMPP accounts under /v1/admin/smpp-accounts, with the admin key (see api/routes/admin.py).

    POST /v1/admin/smpp-accounts                               create; answers its password, shown once
    GET  /v1/admin/smpp-accounts?tenant_id=                    every account (of a tenant)
    GET  /v1/admin/smpp-accounts/{system_id}                   one account
    PATCH /v1/admin/smpp-accounts/{system_id}                  change settings (e.g. `receive_mo`)
    POST /v1/admin/smpp-accounts/{system_id}/disable           it can no longer bind
    POST /v1/admin/smpp-accounts/{system_id}/enable
    POST /v1/admin/smpp-accounts/{system_id}/rotate-password   a new password, shown once

Errors: 404 `smpp_account_not_found` / `tenant_not_found`, 409 `smpp_account_exists`, 422
`validation_error`. Passwords are stored as scrypt hashes (core/store/smpp_accounts.py).

`receive_mo`: MO for the tenant's numbers go to this account as deliver_sm; with several such
accounts per tenant, the oldest gets them (core/store/smpp_accounts.py `mo_topics`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import DbDep, JsonBody, TenantStoreDep
from api.errors import ApiError
from api.routes.admin import AdminDep
from api.schemas import ADMIN_ERRORS, JSON_BODY_ERRORS, error_responses
from core.domain.events import utcnow
from core.store.smpp_accounts import (
    MAX_BINDS_LIMIT,
    MAX_TPS,
    MAX_WINDOW,
    SYSTEM_ID_RE,
    InvalidSmppAccount,
    SmppAccountExists,
    SmppAccountNotFound,
    SmppAccountStore,
)
from core.store.tenants import TENANT_ID_RE

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin/smpp-accounts", tags=["admin: smpp accounts"], responses=ADMIN_ERRORS)

SystemIdPath = Annotated[str, Path(pattern=SYSTEM_ID_RE.pattern, description="The account's system_id")]
NOT_FOUND = error_responses(404, described={404: "No such account (`smpp_account_not_found`)"})


def get_accounts(db: DbDep) -> SmppAccountStore:
    return SmppAccountStore(db)


AccountsDep = Annotated[SmppAccountStore, Depends(get_accounts)]


class SmppAccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    system_id: Annotated[str, Field(pattern=SYSTEM_ID_RE.pattern, description="The login: 1-15 of A-Z a-z 0-9 _ . -")]
    tenant_id: Annotated[str, Field(pattern=TENANT_ID_RE.pattern, description="The tenant its messages belong to")]
    allowed_ips: Annotated[list[Annotated[str, Field(max_length=50)]], Field(
        max_length=100, description="CIDR ranges it may bind from; empty = any")] = []
    max_binds: Annotated[int, Field(ge=1, le=MAX_BINDS_LIMIT, strict=True)] = 4
    window: Annotated[int, Field(ge=1, le=MAX_WINDOW, strict=True, description="Outstanding PDUs per bind")] = 100
    tps: Annotated[float | None, Field(gt=0, le=MAX_TPS, allow_inf_nan=False, strict=True,
                                       description="submit_sm per second; null = unlimited")] = None
    transactional: Annotated[bool, Field(strict=True, description="Its messages' lane by default: transactional "
                                                                  "(true) or the tenant's marketing lane")] = True
    alphabet: Annotated[Literal["gsm", "latin1"], Field(description="What data_coding 0 means")] = "gsm"
    receive_mo: Annotated[bool, Field(strict=True, description="MO for the tenant's numbers go to this account "
                                                               "(the tenant's oldest such account gets them)")] = False


class SmppAccountUpdate(BaseModel):
    """Only the fields given change; `tps: null` means unlimited."""

    model_config = ConfigDict(extra="forbid")

    allowed_ips: Annotated[list[Annotated[str, Field(max_length=50)]] | None, Field(max_length=100)] = None
    max_binds: Annotated[int | None, Field(ge=1, le=MAX_BINDS_LIMIT, strict=True)] = None
    window: Annotated[int | None, Field(ge=1, le=MAX_WINDOW, strict=True)] = None
    tps: Annotated[float | None, Field(gt=0, le=MAX_TPS, allow_inf_nan=False, strict=True)] = None
    transactional: Annotated[bool | None, Field(strict=True)] = None
    alphabet: Literal["gsm", "latin1"] | None = None
    receive_mo: Annotated[bool | None, Field(strict=True)] = None

    def changes(self) -> dict[str, Any]:
        """The fields set in the request; null is a value only for `tps`."""
        return {k: getattr(self, k) for k in self.model_fields_set if getattr(self, k) is not None or k == "tps"}


class SmppAccountPublic(BaseModel):
    system_id: str
    tenant_id: str
    allowed_ips: list[str]
    max_binds: int
    window: int
    tps: float | None
    transactional: bool
    alphabet: str
    receive_mo: bool = False
    enabled: bool
    created_at: datetime | None = None
    changed_at: datetime | None = None


class SmppAccountList(BaseModel):
    accounts: list[SmppAccountPublic]


class SmppAccountWithPassword(BaseModel):
    account: SmppAccountPublic
    password: str = Field(description="The SMPP password: shown this once, only its hash is stored")


def _out(doc: dict[str, Any]) -> SmppAccountPublic:
    return SmppAccountPublic(**{k: doc[k] for k in SmppAccountPublic.model_fields if k in doc})


def _not_found(e: SmppAccountNotFound) -> ApiError:
    return ApiError(404, "smpp_account_not_found", str(e), {"system_id": e.system_id})


@router.post("", response_model=SmppAccountWithPassword, status_code=201, dependencies=[JsonBody],
             summary="Create an SMPP account", responses=JSON_BODY_ERRORS | error_responses(404, 409, described={
                 404: "No such tenant (`tenant_not_found`)", 409: "`smpp_account_exists`"}))
async def create_account(body: SmppAccountCreate, actor: AdminDep, accounts: AccountsDep,
                         tenants: TenantStoreDep) -> SmppAccountWithPassword:
    if await tenants.get(body.tenant_id) is None:
        raise ApiError(404, "tenant_not_found", f"no tenant {body.tenant_id!r}", {"tenant_id": body.tenant_id})
    try:
        doc, password = await accounts.create(
            body.system_id, body.tenant_id, utcnow(), allowed_ips=body.allowed_ips, max_binds=body.max_binds,
            window=body.window, tps=body.tps, transactional=body.transactional, alphabet=body.alphabet,
            receive_mo=body.receive_mo)
    except SmppAccountExists as e:
        raise ApiError(409, "smpp_account_exists", str(e), {"system_id": e.system_id}) from e
    except InvalidSmppAccount as e:
        raise ApiError(422, "validation_error", str(e), [{"field": e.field, "message": str(e)}]) from e
    log.info("admin: smpp account %s (tenant %s) created by %s", body.system_id, body.tenant_id, actor)
    return SmppAccountWithPassword(account=_out(doc), password=password)


@router.get("", response_model=SmppAccountList, summary="List SMPP accounts")
async def list_accounts(_: AdminDep, accounts: AccountsDep, tenant_id: Annotated[
        str | None, Query(pattern=TENANT_ID_RE.pattern, description="Only this tenant's")] = None) -> SmppAccountList:
    return SmppAccountList(accounts=[_out(d) for d in await accounts.list(tenant_id)])


@router.get("/{system_id}", response_model=SmppAccountPublic, responses=NOT_FOUND, summary="One SMPP account")
async def get_account(system_id: SystemIdPath, _: AdminDep, accounts: AccountsDep) -> SmppAccountPublic:
    doc = await accounts.get(system_id)
    if doc is None:
        raise _not_found(SmppAccountNotFound(system_id))
    return _out(doc)


@router.patch("/{system_id}", response_model=SmppAccountPublic, dependencies=[JsonBody],
              responses=NOT_FOUND | JSON_BODY_ERRORS, summary="Change an SMPP account's settings",
              description="Open binds keep the settings they bound with; `receive_mo` applies to the next MO.")
async def update_account(system_id: SystemIdPath, body: SmppAccountUpdate, actor: AdminDep,
                         accounts: AccountsDep) -> SmppAccountPublic:
    changes = body.changes()
    try:
        doc = await accounts.update(system_id, changes, utcnow())
    except SmppAccountNotFound as e:
        raise _not_found(e) from e
    except InvalidSmppAccount as e:
        raise ApiError(422, "validation_error", str(e), [{"field": e.field, "message": str(e)}]) from e
    log.info("admin: smpp account %s changed by %s: %s", system_id, actor, sorted(changes))
    return _out(doc)


async def _set_enabled(system_id: str, enabled: bool, actor: str, accounts: SmppAccountStore) -> SmppAccountPublic:
    try:
        doc = await accounts.set_enabled(system_id, enabled, utcnow())
    except SmppAccountNotFound as e:
        raise _not_found(e) from e
    log.info("admin: smpp account %s %s by %s", system_id, "enabled" if enabled else "disabled", actor)
    return _out(doc)


@router.post("/{system_id}/disable", response_model=SmppAccountPublic, responses=NOT_FOUND,
             summary="Disable an SMPP account", description="New binds are refused; open binds stay until they end.")
async def disable_account(system_id: SystemIdPath, actor: AdminDep, accounts: AccountsDep) -> SmppAccountPublic:
    return await _set_enabled(system_id, False, actor, accounts)


@router.post("/{system_id}/enable", response_model=SmppAccountPublic, responses=NOT_FOUND,
             summary="Enable an SMPP account")
async def enable_account(system_id: SystemIdPath, actor: AdminDep, accounts: AccountsDep) -> SmppAccountPublic:
    return await _set_enabled(system_id, True, actor, accounts)


@router.post("/{system_id}/rotate-password", response_model=SmppAccountWithPassword, responses=NOT_FOUND,
             summary="Give an SMPP account a new password", description="Shown once; the old one stops working.")
async def rotate_password(system_id: SystemIdPath, actor: AdminDep, accounts: AccountsDep) -> SmppAccountWithPassword:
    try:
        doc, password = await accounts.rotate_password(system_id, utcnow())
    except SmppAccountNotFound as e:
        raise _not_found(e) from e
    log.info("admin: smpp account %s password rotated by %s", system_id, actor)
    return SmppAccountWithPassword(account=_out(doc), password=password)
