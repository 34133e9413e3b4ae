"""The one place errors become HTTP answers.

Every error answer has the shape `{"error": {"code": "<stable code>", "message": "...", "details": ...}}`
(the codes are listed in api/app.py). Routes raise `ApiError` for what is theirs to say (a bad
cursor, a rate limit) and otherwise let the stores', the read side's and the domain's typed errors
come here: `TYPED_ERRORS` maps each to its answer, and no route catches them itself.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.read_side import ReportingUnavailable
from core.domain.campaign import CampaignTransitionError
from core.domain.consent import InvalidConsentSetting
from core.domain.errors import DomainError
from core.store.campaigns import CampaignClosed, CampaignNotFound
from core.store.database import UNTRANSLATED_UNAVAILABLE
from core.store.errors import RouteNotDrained, StoreUnavailable
from core.store.suppressions import SuppressionConflict
from core.store.tenants import InvalidTenantSetting, KeyNotFound, TenantExists, TenantNotFound
from core.submission_service import IdempotencyKeyReused

log = logging.getLogger(__name__)

HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
              405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
              415: "unsupported_media_type", 429: "too_many_requests"}
HTTP_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"})


class ApiError(Exception):
    """An error answered as `{"error": {"code", "message", "details"}}`."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def error_response(status: int, code: str, message: str, details: Any = None,
                   headers: dict[str, str] | None = None) -> Response:
    # ensure_ascii: a client's stray lone surrogate echoed in a field path must not break rendering.
    body = json.dumps({"error": {"code": code, "message": message, "details": details}},
                      ensure_ascii=True, separators=(",", ":"), default=str)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _render(e: ApiError) -> Response:
    return error_response(e.status, e.code, e.message, e.details, e.headers)


def _unavailable(e: Exception) -> ApiError:
    return ApiError(503, "unavailable", "the message store is unavailable, retry later", headers={"Retry-After": "1"})


def _reporting_unavailable(e: ReportingUnavailable) -> ApiError:
    headers = None if e.retry_after_s is None else {"Retry-After": str(e.retry_after_s)}
    return ApiError(503, "reporting_unavailable", str(e), headers=headers)


# The typed errors of the stores, the read side, the submission service and the domain, and their
# answers. Looked up in order: a subclass must come before its base.
TYPED_ERRORS: dict[type[Exception], Callable[[Any], ApiError]] = {
    StoreUnavailable: _unavailable,
    **dict.fromkeys(UNTRANSLATED_UNAVAILABLE, _unavailable),
    ReportingUnavailable: _reporting_unavailable,
    IdempotencyKeyReused: lambda e: ApiError(422, "idempotency_key_reused", "this Idempotency-Key was used before "
                                             "with a different request body", {"idempotency_key": e.key}),
    CampaignNotFound: lambda e: ApiError(404, "not_found", f"no campaign {e}", {"campaign_id": str(e)}),
    CampaignClosed: lambda e: ApiError(409, "campaign_closed", str(e), {"status": e.status}),
    CampaignTransitionError: lambda e: ApiError(409, "invalid_campaign_transition", str(e),
                                                {"status": e.status, "action": e.action}),
    TenantNotFound: lambda e: ApiError(404, "tenant_not_found", str(e), {"tenant_id": e.tenant_id}),
    KeyNotFound: lambda e: ApiError(404, "key_not_found", str(e), {"tenant_id": e.tenant_id, "key_id": e.key_id}),
    TenantExists: lambda e: ApiError(409, "tenant_exists", f"tenant {e.tenant_id} exists: change it with PATCH "
                                     f"/v1/admin/tenants/{e.tenant_id}", {"tenant_id": e.tenant_id}),
    InvalidTenantSetting: lambda e: ApiError(422, "validation_error", str(e), [
        {"field": f"body.{e.field}", "loc": ["body", e.field], "type": "value_error", "message": str(e)}]),
    InvalidConsentSetting: lambda e: ApiError(422, "validation_error", str(e), [
        {"field": f"body.{e.field}", "loc": ["body", e.field], "type": "value_error", "message": str(e)}]),
    SuppressionConflict: lambda e: ApiError(409, "suppression_conflict", str(e)),
    DomainError: lambda e: ApiError(422, e.code, str(e)),
    RouteNotDrained: lambda e: ApiError(409, "route_not_drained", str(e), {"route_id": e.route_id, "why": e.why}),
}


async def typed_error(request: Request, e: Exception) -> Response:
    answer = next(to_api(e) for error_type, to_api in TYPED_ERRORS.items() if isinstance(e, error_type))
    if answer.status >= 500:
        log.warning("%s during %s %s: %r", answer.code, request.method, request.url.path, e)
    return _render(answer)


async def api_error(_: Request, e: Exception) -> Response:
    assert isinstance(e, ApiError)
    return _render(e)


async def validation_error(_: Request, e: Exception) -> Response:
    assert isinstance(e, RequestValidationError)
    errors = list(e.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        return error_response(400, "invalid_json", "request body is not valid JSON")
    return error_response(422, "validation_error", "the request is invalid", _field_errors(errors))


async def http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, StarletteHTTPException)
    if isinstance(e.__cause__, ApiError):  # raised while FastAPI read the body (BodyLimitMiddleware)
        return _render(e.__cause__)
    if e.status_code == 400:  # FastAPI could not read the body (not UTF-8, ...): the JSON is unusable
        return error_response(400, "invalid_json", "request body is not valid JSON (or not UTF-8)")
    headers = dict(e.headers or {})
    if e.status_code == 405:  # Starlette names only the first route's methods of a path
        headers["Allow"] = ", ".join(_allowed_methods(request))
    code = HTTP_CODES.get(e.status_code, "internal_error" if e.status_code >= 500 else "http_error")
    return error_response(e.status_code, code, str(e.detail), None, headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    for error_type in TYPED_ERRORS:
        app.add_exception_handler(error_type, typed_error)


def _field_errors(errors: Any) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        loc = [p if isinstance(p, int) else str(p) for p in err.get("loc", ())]
        item: dict[str, Any] = {"field": ".".join(str(p) for p in loc), "loc": loc,
                                "type": err.get("type", "value_error"), "message": err.get("msg", "")}
        ctx = {k: v for k, v in (err.get("ctx") or {}).items() if isinstance(v, str | int | float | bool)}
        if ctx:
            item["ctx"] = ctx
        out.append(item)
    return out


def _allowed_methods(request: Request) -> list[str]:
    """The methods the OpenAPI document gives the request's path (the `Allow` of a 405)."""
    methods: set[str] = set()
    matched = [(path, item) for path, item in request.app.openapi()["paths"].items()
               if re.fullmatch(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)), request.url.path)]
    # The most specific paths win: `/v1/suppressions/export` over `/v1/suppressions/{address}`, whose
    # route leaves the literal words to them (api/routes/suppressions.py).
    fewest = min((path.count("{") for path, _ in matched), default=0)
    for path, item in matched:
        if path.count("{") == fewest:
            methods |= {m.upper() for m in item if m.upper() in HTTP_METHODS}
    return sorted(methods)
