"""Status webhooks of the calling tenant: `/v1/webhooks` (registrations, deliveries, replay).

Errors of their own (besides the common ones of api/app.py):

    404 not_found               no such webhook for this tenant
    422 webhook_url_invalid     not an http(s) URL, credentials in it, or its host does not resolve
        webhook_url_forbidden   the host resolves to a private, loopback, link-local or metadata
                                address (details: {addresses}); loopback only if the server allows it
        too_many_webhooks       the tenant has the most registrations allowed
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response

from api.deps import DbDep, JsonBody, SettingsDep, TenantDep
from api.errors import ApiError
from api.schemas import JSON_BODY_ERRORS, NOT_FOUND, TENANT_ERRORS, UtcDatetime, error_responses
from api.webhook_schemas import (
    DeliveryAttempt,
    DeliveryList,
    ReplayResult,
    WebhookCreate,
    WebhookCreated,
    WebhookList,
    WebhookPublic,
    WebhookSecret,
    WebhookUpdate,
)
from core.domain.events import utcnow
from core.domain.webhooks import InvalidWebhookUrl
from core.store.database import Database
from core.store.webhook_queue import NewJob, WebhookQueue
from core.store.webhooks import TooManyWebhooks, Webhook, WebhookNotFound, WebhookStore
from core.workers.webhooks_send import AddressForbidden, check_target

log = logging.getLogger(__name__)

WebhookIdPath = Annotated[str, Path(max_length=64, description="The endpoint's id (`wh_...`)")]

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

URL_ERRORS = error_responses(422, described={
    422: "`validation_error`, `webhook_url_invalid`, `webhook_url_forbidden` (SSRF guard), `too_many_webhooks`"})
ERRORS = TENANT_ERRORS | NOT_FOUND
MAX_REPLAY_EVENTS = 5000  # per call; `more` says when to call again
REPLAY_JOB_EVENTS = 500


async def _stores(request: Request, db: Database) -> tuple[WebhookStore, WebhookQueue]:
    """The stores, their indexes created once per app."""
    store, queue = WebhookStore(db), WebhookQueue(db)
    if not getattr(request.app.state, "webhook_indexes", False):
        await store.ensure_indexes()
        await queue.ensure_indexes()
        request.app.state.webhook_indexes = True
    return store, queue


async def _checked_url(url: str, allow_loopback: bool) -> str:
    try:
        await check_target(url, allow_loopback)
    except InvalidWebhookUrl as e:
        raise ApiError(422, "webhook_url_invalid", str(e), {"field": "body.url"}) from e
    except AddressForbidden as e:
        raise ApiError(422, "webhook_url_forbidden", f"the URL's host resolves to an address webhooks may not "
                       f"call: {e}", {"field": "body.url", "addresses": str(e)}) from e
    return url


def _public(h: Webhook) -> WebhookPublic:
    return WebhookPublic(id=h.id, url=h.url, events=list(h.events), enabled=h.enabled, created_at=h.created_at,
                         updated_at=h.updated_at)


def _not_found(e: WebhookNotFound) -> ApiError:
    return ApiError(404, "not_found", str(e), {"webhook_id": e.webhook_id})


@router.post("", status_code=201, response_model=WebhookCreated, dependencies=[JsonBody],
             responses=ERRORS | JSON_BODY_ERRORS | URL_ERRORS, summary="Register a webhook endpoint")
async def create_webhook(body: WebhookCreate, request: Request, tenant: TenantDep, db: DbDep,
                         settings: SettingsDep) -> WebhookCreated:
    store, _ = await _stores(request, db)
    url = await _checked_url(body.url, settings.webhooks_allow_loopback)
    try:
        hook = await store.create(tenant.id, url, body.events, utcnow())
    except TooManyWebhooks as e:
        raise ApiError(422, "too_many_webhooks", str(e), {"limit": e.limit}) from e
    return WebhookCreated(**_public(hook).model_dump(), secret=hook.secret)


@router.get("", response_model=WebhookList, responses=TENANT_ERRORS, summary="List your webhook endpoints")
async def list_webhooks(request: Request, tenant: TenantDep, db: DbDep) -> WebhookList:
    store, _ = await _stores(request, db)
    return WebhookList(webhooks=[_public(h) for h in await store.list_for(tenant.id)])


@router.get("/deliveries", response_model=DeliveryList, responses=TENANT_ERRORS,
            summary="Every delivery attempt of a message's events, with status and latency")
async def list_deliveries(request: Request, tenant: TenantDep, db: DbDep,
                          message_id: Annotated[str, Query(min_length=1, max_length=64)]) -> DeliveryList:
    _, queue = await _stores(request, db)
    attempts = await queue.deliveries_of(tenant.id, message_id)
    items = [DeliveryAttempt.model_validate({k: a.get(k) for k in DeliveryAttempt.model_fields}) for a in attempts]
    items.sort(key=lambda a: (a.at, a.seq, a.attempt))
    return DeliveryList(message_id=message_id, attempts=items)


@router.get("/{webhook_id}", response_model=WebhookPublic, responses=ERRORS, summary="One webhook endpoint")
async def get_webhook(webhook_id: WebhookIdPath, request: Request, tenant: TenantDep, db: DbDep) -> WebhookPublic:
    store, _ = await _stores(request, db)
    try:
        return _public(await store.get(tenant.id, webhook_id))
    except WebhookNotFound as e:
        raise _not_found(e) from e


@router.patch("/{webhook_id}", response_model=WebhookPublic, dependencies=[JsonBody],
              responses=ERRORS | JSON_BODY_ERRORS | URL_ERRORS, summary="Change a webhook's URL, events or enabled")
async def update_webhook(webhook_id: WebhookIdPath, body: WebhookUpdate, request: Request, tenant: TenantDep, db: DbDep,
                         settings: SettingsDep) -> WebhookPublic:
    store, _ = await _stores(request, db)
    changes = body.model_dump(exclude_none=True)
    try:
        await store.get(tenant.id, webhook_id)  # 404 before the URL is looked at
        if "url" in changes:
            await _checked_url(changes["url"], settings.webhooks_allow_loopback)
        return _public(await store.update(tenant.id, webhook_id, changes, utcnow()))
    except WebhookNotFound as e:
        raise _not_found(e) from e


@router.delete("/{webhook_id}", status_code=204, responses=ERRORS, summary="Delete a webhook endpoint")
async def delete_webhook(webhook_id: WebhookIdPath, request: Request, tenant: TenantDep, db: DbDep) -> Response:
    store, _ = await _stores(request, db)
    try:
        await store.delete(tenant.id, webhook_id)
    except WebhookNotFound as e:
        raise _not_found(e) from e
    return Response(status_code=204)


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookSecret, responses=ERRORS,
             summary="Issue a new signing secret (used from the dispatcher's next refresh, within seconds)")
async def rotate_secret(webhook_id: WebhookIdPath, request: Request, tenant: TenantDep, db: DbDep) -> WebhookSecret:
    store, _ = await _stores(request, db)
    try:
        hook = await store.rotate_secret(tenant.id, webhook_id, utcnow())
    except WebhookNotFound as e:
        raise _not_found(e) from e
    return WebhookSecret(id=hook.id, secret=hook.secret)


@router.post("/{webhook_id}/replay", response_model=ReplayResult, responses=ERRORS,
             summary="Send the endpoint's events since a time again (as new delivery jobs)")
async def replay(webhook_id: WebhookIdPath, request: Request, tenant: TenantDep, db: DbDep,
                 since: Annotated[UtcDatetime, Query(description="ISO 8601 with a zone")]) -> ReplayResult:
    store, queue = await _stores(request, db)
    try:
        hook = await store.get(tenant.id, webhook_id)
    except WebhookNotFound as e:
        raise _not_found(e) from e
    if since > utcnow():
        raise ApiError(422, "validation_error", "`since` is in the future", [
            {"field": "query.since", "loc": ["query", "since"], "type": "value_error", "message": "in the future"}])
    events, until, more = await _replay_events(queue, hook.id, since)
    jobs = [NewJob(hook.id, tenant.id, events[i:i + REPLAY_JOB_EVENTS], replayed=True)
            for i in range(0, len(events), REPLAY_JOB_EVENTS)]
    if jobs:
        await queue.enqueue(jobs, utcnow())
    log.info("webhook %s tenant=%s: replay since %s: %d event(s) in %d job(s)%s", hook.id, tenant.id,
             since.isoformat(), len(events), len(jobs), ", more to come" if more else "")
    return ReplayResult(webhook_id=hook.id, events=len(events), jobs=len(jobs), more=more, until=until)


async def _replay_events(queue: WebhookQueue, webhook_id: str,
                         since: datetime) -> tuple[list[dict[str, object]], datetime | None, bool]:
    """The events of the endpoint's jobs since `since`, up to MAX_REPLAY_EVENTS (whole jobs, at least
    one): (events, creation time of the last job taken, whether more remain)."""
    source = await queue.jobs_since(webhook_id, since, limit=MAX_REPLAY_EVENTS + 1)
    events: list[dict[str, object]] = []
    until = None
    for job in source:
        if events and len(events) + len(job["events"]) > MAX_REPLAY_EVENTS:
            return events, until, True
        events += job["events"]
        until = job["created_at"]
    return events, until, False
