"""What routes depend on: settings, the stores, the submission service, the reporting pool, the
calling tenant and the submission rate limit.

The app keeps its ports on `app.state` (set by `create_app`); dependencies only read them, so a test
can build an app around any database.

Tenants are cached per process (`TenantCache`, 10 s): the admin endpoints drop a tenant's entries in
the process that served them, so a suspension, a revoked key or a new limit applies there at once;
other API processes see the change within the cache's TTL.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool

from api.errors import ApiError
from api.read_side import ReportingUnavailable
from core.config import Settings
from core.domain.ratelimit import SubmissionLimiter
from core.store.campaigns import CampaignStore
from core.store.database import Database
from core.store.eventstore import EventStore
from core.store.inbound_reads import InboundReads
from core.store.lanes import LaneStore
from core.store.numbers import NumberStore
from core.store.routes import RouteStore
from core.store.tenants import SUSPENDED, Tenant, TenantStore, hash_key
from core.submission_service import SubmissionService

log = logging.getLogger(__name__)


@dataclass
class TenantCache:
    """Successful API-key lookups, kept `ttl_s` seconds so that a busy client costs no DB round trip
    per request. Keyed by the key's hash, so no plaintext key sits in memory longer than a request.
    A revoked key (or a suspended tenant, or a changed limit) takes effect at once in the process
    that called `drop_tenant`, and in the others within `ttl_s`."""

    ttl_s: float = 10.0
    max_entries: int = 10_000
    _entries: dict[str, tuple[Tenant, float]] = field(default_factory=dict)

    def get(self, key_hash: str) -> Tenant | None:
        hit = self._entries.get(key_hash)
        if hit is None:
            return None
        if hit[1] <= time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return hit[0]

    def put(self, key_hash: str, tenant: Tenant) -> None:
        now = time.monotonic()
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[key_hash] = (tenant, now + self.ttl_s)

    def drop_tenant(self, tenant_id: str) -> int:
        """Forget every cached key of `tenant_id` (after a change to it); returns how many. A scan:
        changes are rare and the cache is bounded."""
        stale = [k for k, (tenant, _) in self._entries.items() if tenant.id == tenant_id]
        for k in stale:
            del self._entries[k]
        return len(stale)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_db(request: Request) -> Database:
    db = request.app.state.db
    if db is None:  # only before the lifespan connected
        raise ApiError(503, "unavailable", "the service is starting")
    return db  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[Database, Depends(get_db)]


def get_reporting_pool(request: Request) -> AsyncConnectionPool:
    """The reporting pool; ReportingUnavailable when no PostgreSQL is configured."""
    pool = getattr(request.app.state, "pg_pool", None)
    if pool is None:
        raise ReportingUnavailable("search reads the reporting database (PostgreSQL), which is not configured")
    return pool  # type: ignore[no-any-return]


def get_optional_reporting_pool(request: Request) -> AsyncConnectionPool | None:
    """The reporting pool, or None when no PostgreSQL is configured (for answers it only enriches)."""
    return getattr(request.app.state, "pg_pool", None)


ReportingPoolDep = Annotated[AsyncConnectionPool, Depends(get_reporting_pool)]
OptionalReportingPoolDep = Annotated[AsyncConnectionPool | None, Depends(get_optional_reporting_pool)]


def get_event_store(db: DbDep) -> EventStore:
    return EventStore(db)


def get_tenant_store(db: DbDep) -> TenantStore:
    return TenantStore(db)


def get_campaign_store(db: DbDep) -> CampaignStore:
    return CampaignStore(db)


def get_route_store(db: DbDep) -> RouteStore:
    return RouteStore(db)


def get_number_store(db: DbDep) -> NumberStore:
    return NumberStore(db)


def get_inbound_reads(db: DbDep) -> InboundReads:
    return InboundReads(db)


def get_submission_service(request: Request, db: DbDep) -> SubmissionService:
    return SubmissionService(EventStore(db), LaneStore(db), request.app.state.known_lanes,
                             routes=request.app.state.route_table)


EventStoreDep = Annotated[EventStore, Depends(get_event_store)]
TenantStoreDep = Annotated[TenantStore, Depends(get_tenant_store)]
CampaignStoreDep = Annotated[CampaignStore, Depends(get_campaign_store)]
RouteStoreDep = Annotated[RouteStore, Depends(get_route_store)]
NumberStoreDep = Annotated[NumberStore, Depends(get_number_store)]
InboundReadsDep = Annotated[InboundReads, Depends(get_inbound_reads)]
SubmissionDep = Annotated[SubmissionService, Depends(get_submission_service)]

# auto_error=False: we answer a missing key ourselves, in our error shape (and FastAPI still
# documents the bearer scheme in OpenAPI).
bearer_scheme = HTTPBearer(auto_error=False, description="The tenant's API key")


def _unauthorized(message: str, error: str | None = None) -> ApiError:
    challenge = "Bearer" if error is None else f'Bearer error="{error}"'
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


async def get_tenant(
    request: Request,
    tenants: TenantStoreDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Tenant:
    """The tenant owning the bearer key; 401 `unauthorized` if the key is missing or unknown,
    403 `tenant_suspended` if the tenant is suspended (`forbidden` for any other inactive status)."""
    if credentials is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key_hash = hash_key(credentials.credentials)
    cache: TenantCache = request.app.state.tenant_cache
    tenant = cache.get(key_hash)
    if tenant is None:
        tenant = await tenants.authenticate(credentials.credentials)
        if tenant is None:
            log.info("auth failed: unknown API key (hash %s...)", key_hash[:8])
            raise _unauthorized("invalid API key", "invalid_token")
        cache.put(key_hash, tenant)
    if tenant.status == SUSPENDED:
        raise ApiError(403, "tenant_suspended",
                       f"tenant {tenant.id} is suspended: its requests are refused until the operator resumes it; "
                       "messages accepted before are held, not lost", {"tenant_id": tenant.id})
    if tenant.status != "active":
        raise ApiError(403, "forbidden", f"tenant {tenant.id} is {tenant.status}")
    return tenant


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def get_tenant_cache(request: Request) -> TenantCache:
    return request.app.state.tenant_cache  # type: ignore[no-any-return]


TenantCacheDep = Annotated[TenantCache, Depends(get_tenant_cache)]


def charge_submission(request: Request, tenant: Tenant, cost: int) -> None:
    """Charge `cost` messages to the tenant's submission rate limit (a no-op without one).

    422 `batch_exceeds_rate_limit` if `cost` exceeds the tenant's burst (it could never pass);
    429 `rate_limited` with `Retry-After` (whole seconds, at least 1) if it does not fit now, charging
    nothing. The limiter is per API process (see core/domain/ratelimit.py)."""
    burst = tenant.burst
    if tenant.submit_tps is None or burst is None:
        return
    if cost > burst:
        raise ApiError(422, "batch_exceeds_rate_limit",
                       f"{cost} messages exceed the tenant's burst of {burst}: send at most {burst} per request",
                       {"burst": burst, "count": cost, "limit_tps": tenant.submit_tps})
    limiter: SubmissionLimiter = request.app.state.limiter
    wait = limiter.check(tenant.id, cost, tenant.submit_tps, burst, limiter.clock())
    if wait is None:
        return
    retry_after = max(1, math.ceil(wait))
    log.info("tenant %s: rate limited, %d message(s) over %g/s (burst %d), retry in %.3f s",
             tenant.id, cost, tenant.submit_tps, burst, wait)
    raise ApiError(429, "rate_limited",
                   f"tenant {tenant.id} may submit {tenant.submit_tps:g} messages/s (burst {burst}): "
                   f"retry after {retry_after} s",
                   {"limit_tps": tenant.submit_tps, "burst": burst, "retry_after_s": round(wait, 3)},
                   headers={"Retry-After": str(retry_after)})


def require_json_body(request: Request) -> None:
    """415 `unsupported_media_type` when a body is sent with a content type other than JSON (FastAPI
    would otherwise read it as bytes and answer a puzzling `validation_error`). A request without a
    Content-Type is left to FastAPI."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media_type = content_type.split(";")[0].strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/") and
                                                 media_type.endswith("+json")):
        raise ApiError(415, "unsupported_media_type", f"send the body as application/json, not {media_type!r}")


# For the `dependencies=` of every operation that takes a JSON body (declared with JSON_BODY_ERRORS).
JsonBody = Depends(require_json_body)
