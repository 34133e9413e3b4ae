"""HTTP side of the operator dashboard: login/logout, the page, its panels (htmx fragments) and the
campaign and dead-letter actions. None of it is in the OpenAPI document (`include_in_schema=False`):
it is a web page, not part of the API contract.

    GET  /dashboard                          the page (or the login form without a session)
    POST /dashboard/login                    form `key`: the admin key -> session cookie, 303 to the page
    POST /dashboard/logout                   form `csrf` -> cookie cleared, 303 to the login form
    GET  /dashboard/panel/{name}             one panel's HTML (polled every 2 s by htmx)
    POST /dashboard/campaigns/{id}/{action}  form `csrf`: start/pause/resume/cancel -> the campaigns panel
    POST /dashboard/dead-letters/{id}/requeue  form `csrf` -> the dead letters panel
    GET  /dashboard/static/{file}            htmx and the stylesheet

Answers: 401 (login form, or `HX-Redirect` to it for a panel) without a valid session; 403 on a bad
CSRF token or when no admin key is configured; 404 for an unknown panel, action, campaign; 409 when a
campaign action does not apply to its status; 503 (panel text) when the store is unreachable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from api.dashboard import session as sessions
from api.dashboard import views
from api.dashboard.reporting import ReportingReads
from api.deps import get_db
from core.config import Settings
from core.domain.campaign import CampaignAction, CampaignTransitionError
from core.domain.events import utcnow
from core.store.campaigns import CampaignNotFound, CampaignStore
from core.store.dashboard_reads import campaign_tenant
from core.store.deadletters import REQUEUABLE_STATES, requeue
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore

log = logging.getLogger(__name__)

ACTOR = "admin-dashboard"
HERE = Path(__file__).parent
STATIC = {"htmx.min.js": "text/javascript", "dashboard.css": "text/css"}
PANELS = ("throughput", "routes", "backlog", "campaigns", "deadletters", "lag")
HEADERS = {"Cache-Control": "no-store", "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
           "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'"}

templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)
router = APIRouter(prefix="/dashboard", include_in_schema=False)

Csrf = Annotated[str, Form(max_length=200)]


def _html(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status, headers=HEADERS)


def _settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def _secret(request: Request) -> bytes:
    return sessions.session_secret(_settings(request).admin_key)


def _session(request: Request) -> sessions.Session | None:
    if not _settings(request).admin_key:
        return None
    return sessions.verify(_secret(request), request.cookies.get(sessions.COOKIE))


def _reporting(request: Request) -> ReportingReads:
    """One cache per api process (the per-minute series is the costly read)."""
    reads = getattr(request.app.state, "dashboard_reporting", None)
    if reads is None or reads.pool is not request.app.state.pg_pool:
        reads = ReportingReads(request.app.state.pg_pool, _settings(request).reporting_schema)
        request.app.state.dashboard_reporting = reads
    return reads


def _disabled() -> HTMLResponse:
    return _html("login.html", 403, error="The dashboard is disabled: no admin key is configured "
                                          "(MSGCORE_ADMIN_KEY).", disabled=True)


@router.get("")
async def page(request: Request) -> Response:
    if not _settings(request).admin_key:
        return _disabled()
    session = _session(request)
    if session is None:
        return _html("login.html")
    return _html("dashboard.html", csrf=sessions.csrf_token(_secret(request), session), panels=PANELS)


@router.post("/login")
async def login(request: Request, key: Annotated[str, Form(max_length=1000)] = "") -> Response:
    settings = _settings(request)
    if not settings.admin_key:
        return _disabled()
    if not sessions.key_ok(settings.admin_key, key):
        log.info("dashboard login failed from %s", request.client.host if request.client else "?")
        return _html("login.html", 401, error="Wrong admin key.")
    cookie, session = sessions.issue(_secret(request))
    response = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    response.set_cookie(sessions.COOKIE, cookie, max_age=sessions.SESSION_TTL_S, path="/dashboard", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")
    log.info("dashboard login, session expires at %d", session.expires_at)
    return response


@router.post("/logout")
async def logout(request: Request, csrf: Csrf = "") -> Response:
    session = _session(request)
    if session is not None and not sessions.csrf_ok(_secret(request), session, csrf):
        return _html("message.html", 403, message="Invalid form token: reload the page.")
    response = RedirectResponse("/dashboard", status_code=303, headers=HEADERS)
    response.delete_cookie(sessions.COOKIE, path="/dashboard", httponly=True, samesite="strict")
    return response


def _unauthenticated() -> HTMLResponse:
    """For htmx requests: send the browser back to the login form."""
    response = _html("message.html", 401, message="Session expired: log in again.")
    response.headers["HX-Redirect"] = "/dashboard"
    return response


@router.get("/panel/{name}")
async def panel(request: Request, name: str) -> Response:
    if name not in PANELS:
        return _html("message.html", 404, message=f"No panel {name[:40]!r}.")
    session = _session(request)
    if session is None:
        return _unauthenticated()
    return await _render_panel(request, name, sessions.csrf_token(_secret(request), session))


async def _render_panel(request: Request, name: str, csrf: str, notice: str = "", status: int = 200) -> Response:
    db, reporting = get_db(request), _reporting(request)
    try:
        match name:
            case "throughput":
                data: Any = await views.throughput(db, reporting)
            case "routes":
                data = await views.routes(db, utcnow())
            case "backlog":
                data = await views.backlog(db)
            case "campaigns":
                data = await views.campaigns(db, reporting)
            case "deadletters":
                data = await views.dead_letters(db)
            case _:
                data = await views.lag(db, reporting)
    except StoreUnavailable as e:
        log.warning("dashboard panel %s: store unavailable: %s", name, e)
        return _html("message.html", 503, message="The store is unreachable; retrying.")
    return _html(f"panel_{name}.html", status, data=data, csrf=csrf, notice=notice)


def _checked(request: Request, csrf: str) -> tuple[str, Response | None]:
    """The CSRF token to render, or the refusal to answer (no session, bad token)."""
    session = _session(request)
    if session is None:
        return "", _unauthenticated()
    if not sessions.csrf_ok(_secret(request), session, csrf):
        return "", _html("message.html", 403, message="Invalid form token: reload the page.")
    return sessions.csrf_token(_secret(request), session), None


@router.post("/campaigns/{campaign_id}/{action}")
async def campaign_action(request: Request, campaign_id: str, action: str, csrf: Csrf = "") -> Response:
    token, refused = _checked(request, csrf)
    if refused is not None:
        return refused
    if action not in {a.value for a in CampaignAction}:
        return _html("message.html", 404, message=f"No campaign action {action[:40]!r}.")
    db = get_db(request)
    try:
        tenant = await campaign_tenant(db, campaign_id)
        if tenant is None:
            raise CampaignNotFound(campaign_id)
        doc = await CampaignStore(db).act(tenant, campaign_id, CampaignAction(action), utcnow())
    except CampaignNotFound:
        return await _render_panel(request, "campaigns", token, f"No campaign {campaign_id[:64]}.", 404)
    except CampaignTransitionError as e:
        return await _render_panel(request, "campaigns", token, f"Campaign {campaign_id}: {e}", 409)
    log.info("dashboard: campaign=%s tenant=%s %s -> %s", campaign_id, tenant, action, doc["status"])
    return await _render_panel(request, "campaigns", token, f"Campaign {doc['name']}: {action} done ({doc['status']}).")


@router.post("/dead-letters/{message_id}/requeue")
async def requeue_dead_letter(request: Request, message_id: str, csrf: Csrf = "",
                              state: Annotated[str, Form(max_length=40)] = "dead_lettered") -> Response:
    token, refused = _checked(request, csrf)
    if refused is not None:
        return refused
    if state not in REQUEUABLE_STATES or len(message_id) > 128:
        return _html("message.html", 422, message="Not a requeueable message.")
    result = await requeue(EventStore(get_db(request)), [message_id], ACTOR, "requeued from the dashboard", utcnow(),
                           state=state)
    log.info("dashboard: requeue message=%s -> %s", message_id, "ok" if result.ok else result)
    if result.ok:
        return await _render_panel(request, "deadletters", token, f"Message {message_id} requeued.")
    why = "not found" if result.not_found else "no longer " + state if result.not_dead else "changed meanwhile"
    return await _render_panel(request, "deadletters", token, f"Message {message_id} not requeued: {why}.", 409)


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        return _html("message.html", 404, message="Not found.")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})
