"""The FastAPI application: composition root of the api process (errors become HTTP in api/errors.py).

Every error answer has the shape `{"error": {"code": "<stable code>", "message": "...", "details": ...}}`:

    400 invalid_json            body is not JSON (or not UTF-8)
    401 unauthorized            API key missing or unknown (with `WWW-Authenticate: Bearer`)
        invalid_signature       a provider's event webhook without its valid signature (nothing written)
    403 tenant_suspended        the tenant is suspended (tenant endpoints)
        forbidden               tenant not active for another reason
        admin_disabled          /v1/admin called while no admin key is configured
        provider_events_not_configured  the e-mail route has no usable events_key
    404 not_found               no such route, or no such message for this tenant
        not_found               also: no such campaign for this tenant, no such number assignment
        tenant_not_found, key_not_found  (admin: tenants and their keys)
    405 method_not_allowed      (with `Allow`)
    409 invalid_campaign_transition  e.g. pausing a campaign that is not running
        campaign_closed         recipients uploaded to a canceled or completed campaign
        suppression_conflict    the same suppression entries kept changing meanwhile (retry)
        tenant_exists, route_exists  (admin: creating what exists)
    413 payload_too_large       body over `max_body_bytes`
    415 unsupported_media_type  body sent with a non-JSON content type (a recipient upload: not CSV)
    422 validation_error        details: [{field, loc, type, message}]
        too_many_parts          details: {field, parts, limit}
        batch_too_large         details: {limit, count}
        invalid_template        a campaign template with an unclosed `{{`, a bad tag name, ...
        invalid_csv, invalid_csv_header, invalid_encoding  a recipient upload that cannot be used at all
        idempotency_key_reused  same Idempotency-Key, different body
        batch_exceeds_rate_limit  more messages in one request than the tenant's burst
        invalid_address, invalid_csv_rows, import_too_large  suppressions: a bad number, bad import rows
        invalid_email, header_injection, subject_too_long, body_too_large  an e-mail (details: {field})
        invalid_events          a provider's signed event webhook body that is not an event array
    429 rate_limited            over the tenant's submission rate (with `Retry-After`)
    503 unavailable             MongoDB unreachable (retry later)
        reporting_unavailable   search: no PostgreSQL configured, unreachable, or no reporting tables yet
    500 internal_error          a bug: logged with its traceback; client input never gets here
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.dashboard import routes as dashboard
from api.deps import TenantCache
from api.errors import ApiError, error_response, install_error_handlers
from api.read_side import reporting_pool
from api.routes import admin, campaigns, health, inbound, messages, numbers_admin, routes_admin, tenants_admin
from api.routes.provider_events import router as provider_events_router
from api.routes.smpp_accounts import router as smpp_accounts_router
from api.routes.suppressions import router as suppressions_router
from api.routes.webhooks import router as webhooks_router
from core import metrics
from core.config import Settings
from core.domain.ratelimit import SubmissionLimiter
from core.store.campaigns import CampaignStore
from core.store.database import Database
from core.store.email_events import ProviderEventStore
from core.store.eventstore import EventStore
from core.store.mongo import connect
from core.store.routes import RouteStore, RouteTable
from core.store.smpp_accounts import SmppAccountStore
from core.store.suppressions import SuppressionStore
from core.store.tenants import TenantStore
from core.store.webhooks import WebhookStore

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # a full batch of 1,000 long UCS-2 texts, \u-escaped, fits

DESCRIPTION = """\
Submit SMS one at a time or in batches, follow their status and read their audit trail.

Authenticate with `Authorization: Bearer <api key>`. Every error is JSON with a stable code:
`{"error": {"code": "...", "message": "...", "details": ...}}`.
"""


def create_app(settings: Settings, db: Database | None = None, *,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The API app. With `db`, it uses that database (tests); without, its lifespan connects to
    `settings.mongo_url` / `settings.mongo_db` and closes the client on shutdown. Either way the
    lifespan creates the stores' indexes."""
    app = FastAPI(title="msgcore API", version="1", description=DESCRIPTION, lifespan=_lifespan)
    app.state.settings = settings
    app.state.db = db
    app.state.pg_pool = None  # opened by the lifespan when settings.pg_url is set (search)
    app.state.tenant_cache = TenantCache()
    app.state.known_lanes = set()  # lanes this process registered (core/submission_service.py)
    app.state.limiter = SubmissionLimiter()  # per-tenant submission rate, per API process
    # Routes and their statuses for routing one-time passwords at acceptance (core/store/submission.py).
    app.state.route_table = RouteTable(RouteStore(db)) if db is not None else None
    app.include_router(health.router)
    app.include_router(messages.router)
    app.include_router(admin.router)  # /v1/admin: admin key, not tenant keys (api/routes/admin.py)
    app.include_router(routes_admin.router)  # /v1/admin/routes (api/routes/routes_admin.py)
    app.include_router(inbound.router)  # /v1/inbound: the tenant's MO messages (api/routes/inbound.py)
    app.include_router(numbers_admin.router)  # /v1/admin/numbers (api/routes/numbers_admin.py)
    app.include_router(tenants_admin.router)  # /v1/admin/tenants (api/routes/tenants_admin.py)
    app.include_router(smpp_accounts_router)  # /v1/admin/smpp-accounts (api/routes/smpp_accounts.py)
    app.include_router(campaigns.router)  # /v1/campaigns (api/routes/campaigns.py)
    app.include_router(suppressions_router)  # /v1/suppressions: opt-outs (api/routes/suppressions.py)
    app.include_router(webhooks_router)  # /v1/webhooks: status webhooks (api/routes/webhooks.py)
    app.include_router(provider_events_router)  # /v1/providers/{route}/events (api/routes/provider_events.py)
    app.include_router(dashboard.router)  # /dashboard: operator web page, not in the OpenAPI document
    install_error_handlers(app)  # api/errors.py: the one place errors become HTTP
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware)  # inside CatchAll: it counts the 500s it turns bugs into
    app.add_middleware(CatchAllMiddleware)  # added last = outermost: also catches the others' bugs
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    client = None
    if app.state.db is None:
        if not settings.mongo_url:
            raise RuntimeError("settings.mongo_url is empty: resolve the MongoDB URL before starting the api")
        client = connect(settings.mongo_url, "api")
        app.state.db = client[settings.mongo_db]
        app.state.route_table = RouteTable(RouteStore(app.state.db))
    pool = None
    if settings.pg_url and app.state.pg_pool is None:
        pool = reporting_pool(settings.pg_url)
        await pool.open(wait=False)  # PostgreSQL may come up later: search answers 503 until then
        app.state.pg_pool = pool
    try:
        await EventStore(app.state.db).ensure_indexes()
        await TenantStore(app.state.db).ensure_indexes()
        await CampaignStore(app.state.db).ensure_indexes()
        await SuppressionStore(app.state.db).ensure_indexes()
        await SmppAccountStore(app.state.db).ensure_indexes()
        await WebhookStore(app.state.db).ensure_indexes()
        await ProviderEventStore(app.state.db).ensure_indexes()
        log.info("api ready on database %s", app.state.db.name)
        yield
    finally:
        if pool is not None:
            app.state.pg_pool = None
            await pool.close()
        if client is not None:
            app.state.db = None
            await client.close()


# ---- middleware (pure ASGI: no buffering of bodies or responses) -----------------------------------

class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes`: at once when Content-Length says so, else (chunked) when the
    route reads past the limit, by raising `payload_too_large` from `receive`. Streamed uploads (a
    campaign's recipient CSV) are exempt: their route spools them to disk under its own limit."""

    STREAMED = re.compile(r"^/v1/campaigns/[^/]+/recipients$")

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.STREAMED.match(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        too_large = ApiError(413, "payload_too_large", f"request body over {self.max_bytes} bytes",
                             {"limit": self.max_bytes})
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(too_large.status, too_large.code, too_large.message, too_large.details,
                                      {"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    """Count requests by method, route TEMPLATE (`/v1/messages/{message_id}`) and status, and time
    them. A path no route matches is `unmatched`: raw paths never become label values."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception with no response: CatchAllMiddleware answers 500
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            method, handler = scope.get("method", ""), _template(scope)
            metrics.API_REQUESTS.labels(method=method, handler=handler, status=str(status)).inc()
            metrics.API_REQUEST_SECONDS.labels(method=method, handler=handler).observe(
                time.perf_counter() - started)


def _template(scope: Scope) -> str:
    """The path template of the route that served the request (set in the scope by the router); for
    a request answered before routing (e.g. 413 by BodyLimitMiddleware), the first route that
    matches it; `unmatched` if none."""
    route = scope.get("route")
    if route is None and "app" in scope:
        route = next((r for r in scope["app"].routes if r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


class CatchAllMiddleware:
    """The last resort: an exception no handler mapped is a bug; log it with the request and answer
    500 `internal_error` (unless the response had already started)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await error_response(500, "internal_error", "internal error")(scope, receive, send)
