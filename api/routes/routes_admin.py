"""Route administration under /v1/admin/routes, with the admin key (see api/routes/admin.py).

    GET   /v1/admin/routes                  every route, with its live status (up / busy / down)
    GET   /v1/admin/routes/{id}             one route
    POST  /v1/admin/routes                  create (409 `route_exists` if the id is taken)
    PUT   /v1/admin/routes/{id}             replace the definition (fields left out take their defaults,
                                            except `password`: left out, the current one is kept)
    PATCH /v1/admin/routes/{id}             change only the fields given
    POST  /v1/admin/routes/{id}/disable     stop using it (the router skips it, its connector unbinds)
    POST  /v1/admin/routes/{id}/enable
    GET   /v1/admin/routes/{id}/history     every recorded change: who (actor), when, the definition after

Every change is validated by the Route model (422 `validation_error` naming the fields) and recorded
in `route_changes` with actor `admin-api`. Changes take effect without a restart: the router reloads
routes every second, the connectors' route manager reconciles every two. Passwords are never
returned (`"password": "***"`).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from api.deps import JsonBody, RouteStoreDep
from api.errors import ApiError
from api.routes.admin import AdminDep
from api.schemas import ADMIN_ERRORS, JSON_BODY_ERRORS, error_responses, inline_json_schema
from core.domain.circuit_breaker import BreakerSettings
from core.domain.events import utcnow
from core.domain.routing import Route
from core.store.routes import RouteStore

log = logging.getLogger(__name__)

MASK = "***"

router = APIRouter(prefix="/v1/admin/routes", tags=["admin: routes"], responses=ADMIN_ERRORS)

RouteId = Annotated[str, Path(pattern=Route.model_fields["id"].metadata[0].pattern, description="Route id")]
NOT_FOUND = error_responses(404, described={404: "No such route (`not_found`)"})
BODY_NOT_FOUND = NOT_FOUND | JSON_BODY_ERRORS
CHANGE_ERRORS = BODY_NOT_FOUND | error_responses(409, described={
    409: "`route_not_drained`: `partitions` changes only while the route is disabled and drained"})
Count = Annotated[int, Field(strict=True)]  # a JSON integer: not "5", not 5.0, not true
Number = Annotated[float, Field(strict=True)]  # a JSON number: not "0.5", not true


class BreakerDefinition(BreakerSettings):
    """A route's circuit breaker as the API takes it: numbers as JSON numbers, not strings or booleans."""

    max_failures: Annotated[Count, Field(ge=1, le=10_000, description="Failures within the window that open it")] = 5
    failure_ratio: Annotated[Number, Field(gt=0, le=1, description="Share of failed calls that opens it")] = 0.5
    min_calls: Annotated[Count, Field(ge=1, le=10_000, description="Calls in the window before the ratio counts")] = 10
    window_s: Annotated[Number, Field(gt=0, le=86_400, description="Seconds of calls the breaker looks at")] = 60.0
    cool_down_s: Annotated[Number, Field(ge=0, le=86_400, description="Open this long before a probe")] = 30.0
    probes: Annotated[Count, Field(ge=1, le=100, description="Calls let through while half-open")] = 1


class RouteDefinition(Route):
    """A route as the API takes it: the domain's Route with the bounds a request must keep (every
    integer far within MongoDB's 64 bits, every string and list bounded), integers and `enabled` as
    JSON integers and booleans, not strings. Converted to a Route (`as_route`) before it is stored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Annotated[str, Field(min_length=1, max_length=16)] = "smpp"
    host: Annotated[str, Field(min_length=1, max_length=253)] = "127.0.0.1"
    port: Annotated[Count, Field(ge=1, le=65535)] = 2775
    system_id: Annotated[str, Field(max_length=64)] = "msgcore"
    password: Annotated[str, Field(max_length=64)] = "secret"
    system_type: Annotated[str, Field(max_length=13)] = ""
    priority: Annotated[Count, Field(ge=1, le=1000)] = 1
    weight: Annotated[Count, Field(ge=1, le=1000)] = 1
    prefixes: Annotated[tuple[Annotated[str, Field(pattern=r"^\+?[0-9]{0,15}$")], ...],
                        Field(min_length=1, max_length=1000, description="Destination prefixes; \"\" = any")] = ("",)
    tps: Annotated[Count, Field(ge=0, le=1_000_000, description="0 = no limit")] = 0
    binds: Annotated[Count, Field(ge=1, le=32)] = 1
    source_ton: Annotated[Count | None, Field(ge=0, le=6)] = None
    source_npi: Annotated[Count | None, Field(ge=0, le=18)] = None
    dest_ton: Annotated[Count, Field(ge=0, le=6)] = 1
    dest_npi: Annotated[Count, Field(ge=0, le=18)] = 1
    window: Annotated[Count, Field(ge=1, le=1000)] = 20
    partitions: Annotated[Count, Field(ge=1, le=64, description=(
        "Send topics split by hash of message id, each owned by one connector process; changes only while "
        "the route is disabled and drained (409 route_not_drained)"))] = 1
    price_per_part: Annotated[Count, Field(ge=0, le=10**12, description="Minor units")] = 0
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "EUR"
    group: Annotated[str, Field(min_length=1, max_length=64)] = "default"
    enabled: StrictBool = True
    # E-mail routes (kind "smtp" or "http"): see core.domain.routing.Route.
    username: Annotated[str, Field(max_length=256)] = ""
    pool: Annotated[Count, Field(ge=1, le=64, description="SMTP connections / HTTP requests in flight")] = 2
    provider: Annotated[str, Field(max_length=20, pattern=r"^(sendgrid)?$", description="kind http: sendgrid")] = ""
    base_url: Annotated[str, Field(max_length=2048, pattern=r"^(https?://.*)?$")] = ""
    api_key: Annotated[str, Field(max_length=512)] = ""
    breaker: BreakerDefinition = BreakerDefinition()

    def as_route(self) -> Route:
        return Route.model_validate(self.model_dump())


def _body_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenAPI schemas of the PUT body (a definition whose id may be left out) and the PATCH body (any
    of its fields). Both routes parse their body themselves, to answer 404 before validating it."""
    put = inline_json_schema(RouteDefinition)
    put["required"] = [f for f in put.get("required", []) if f != "id"]
    patch = {**put, "title": "RoutePatch", "required": []}
    patch["properties"] = {name: {k: v for k, v in prop.items() if k != "default"}
                           for name, prop in put["properties"].items()}
    return put, patch


PUT_SCHEMA, PATCH_SCHEMA = _body_schemas()


class RouteOut(BaseModel):
    """A route as stored, with the password masked, and its live status (heartbeat of its connector;
    `down` when no connector reports it)."""

    route: dict[str, Any] = Field(description="The definition (see the Route fields); password is masked")
    status: str = Field(description="up, busy or down")


class RouteList(BaseModel):
    routes: list[RouteOut]


class RouteChange(BaseModel):
    actor: str = Field(description="Who: `admin-api`, `cli:<user>`, `routes-file`, ...")
    at: datetime = Field(description="When (UTC)")
    changed: list[str] = Field(description="Fields that differ from the previous record (all, for the first)")
    route: dict[str, Any] = Field(description="The definition after the change; password masked")


class RouteHistory(BaseModel):
    route_id: str
    changes: list[RouteChange]


SECRETS = ("password", "api_key")  # never returned; an echoed MASK keeps the stored value


def masked(doc: dict[str, Any]) -> dict[str, Any]:
    # The password is always masked; an empty api_key shows as empty (not set).
    return {**doc, **{k: MASK for k in SECRETS if k in doc and (k == "password" or doc[k])}}


def _out(route: Route, status: dict[str, Any]) -> RouteOut:
    return RouteOut(route=masked(route.model_dump(mode="json")), status=str(status.get(route.id, "down")))


def _validation_error(e: ValidationError) -> ApiError:
    details: list[dict[str, Any]] = [
        {"field": ".".join(str(p) for p in err["loc"]), "loc": list(err["loc"]), "type": err["type"],
         "message": err["msg"]} for err in e.errors(include_url=False, include_input=False)]
    fields = ", ".join(str(d["field"] or "body") for d in details)
    return ApiError(422, "validation_error", f"invalid route: {fields}", details)


def _validate(data: dict[str, Any]) -> Route:
    try:
        return RouteDefinition.model_validate(data).as_route()
    except ValidationError as e:
        raise _validation_error(e) from e


async def _existing(store: RouteStore, route_id: str) -> Route:
    route = await store.get(route_id)
    if route is None:
        raise ApiError(404, "not_found", f"no route {route_id}")
    return route


def _check_id(route_id: str, body: dict[str, Any]) -> None:
    if "id" in body and body["id"] != route_id:
        raise ApiError(422, "validation_error", "a route's id cannot be changed (create a new route instead)",
                       [{"field": "id", "loc": ["id"], "type": "value_error",
                         "message": f"must be {route_id!r} (the id in the path) or left out"}])


async def _save(store: RouteStore, route: Route, actor: str, what: str) -> RouteOut:
    await store.upsert(route, actor=actor, now=utcnow())
    log.info("admin: route=%s %s by %s", route.id, what, actor)
    return _out(route, await store.statuses(utcnow()))


@router.get("", response_model=RouteList, summary="List routes with their live status")
async def list_routes(_: AdminDep, store: RouteStoreDep) -> RouteList:
    routes, status = await store.list(), await store.statuses(utcnow())
    return RouteList(routes=[_out(r, status) for r in routes])


@router.get("/{route_id}", response_model=RouteOut, responses=NOT_FOUND, summary="One route")
async def get_route(route_id: RouteId, _: AdminDep, store: RouteStoreDep) -> RouteOut:
    return _out(await _existing(store, route_id), await store.statuses(utcnow()))


@router.post("", response_model=RouteOut, status_code=201, summary="Create a route", dependencies=[JsonBody],
             responses=JSON_BODY_ERRORS | error_responses(409, described={409: "`route_exists`"}))
async def create_route(body: RouteDefinition, actor: AdminDep, store: RouteStoreDep) -> RouteOut:
    if await store.get(body.id) is not None:
        raise ApiError(409, "route_exists", f"route {body.id} exists: change it with PUT or PATCH "
                                            f"/v1/admin/routes/{body.id}")
    return await _save(store, body.as_route(), actor, "created")


@router.put("/{route_id}", response_model=RouteOut, responses=CHANGE_ERRORS, dependencies=[JsonBody],
            summary="Replace a route's definition",
            openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": PUT_SCHEMA}}}})
async def replace_route(route_id: RouteId, body: Annotated[dict[str, Any], Body()], actor: AdminDep,
                        store: RouteStoreDep) -> RouteOut:
    current = await _existing(store, route_id)
    _check_id(route_id, body)
    data = {**body, "id": route_id}
    if data.get("password", MASK) == MASK:  # clients never see the password, so they cannot echo it
        data["password"] = current.password
    if data.get("api_key", MASK) == MASK:
        data["api_key"] = current.api_key
    return await _save(store, _validate(data), actor, "replaced")


@router.patch("/{route_id}", response_model=RouteOut, responses=CHANGE_ERRORS, dependencies=[JsonBody],
              summary="Change some fields of a route",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": PATCH_SCHEMA}}}})
async def patch_route(route_id: RouteId, body: Annotated[dict[str, Any], Body()], actor: AdminDep,
                      store: RouteStoreDep) -> RouteOut:
    current = await _existing(store, route_id)
    _check_id(route_id, body)
    if body.get("password") == MASK:
        body = {k: v for k, v in body.items() if k != "password"}
    if body.get("api_key") == MASK:
        body = {k: v for k, v in body.items() if k != "api_key"}
    route = _validate({**current.model_dump(), **body})
    if route == current:
        return _out(route, await store.statuses(utcnow()))  # nothing changed: nothing to record
    return await _save(store, route, actor, f"updated ({', '.join(sorted(body))})")


async def _set_enabled(store: RouteStore, route_id: str, enabled: bool, actor: str) -> RouteOut:
    route = await store.set_enabled(route_id, enabled, actor=actor, now=utcnow())
    if route is None:
        raise ApiError(404, "not_found", f"no route {route_id}")
    log.info("admin: route=%s %s by %s", route_id, "enabled" if enabled else "disabled", actor)
    return _out(route, await store.statuses(utcnow()))


@router.post("/{route_id}/disable", response_model=RouteOut, responses=NOT_FOUND, summary="Disable a route")
async def disable_route(route_id: RouteId, actor: AdminDep, store: RouteStoreDep) -> RouteOut:
    return await _set_enabled(store, route_id, False, actor)


@router.post("/{route_id}/enable", response_model=RouteOut, responses=NOT_FOUND, summary="Enable a route")
async def enable_route(route_id: RouteId, actor: AdminDep, store: RouteStoreDep) -> RouteOut:
    return await _set_enabled(store, route_id, True, actor)


@router.get("/{route_id}/history", response_model=RouteHistory, responses=NOT_FOUND,
            summary="Recorded changes of a route, oldest first")
async def route_history(route_id: RouteId, _: AdminDep, store: RouteStoreDep,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> RouteHistory:
    changes = await store.history(route_id, limit)
    if not changes and await store.get(route_id) is None:
        raise ApiError(404, "not_found", f"no route {route_id}")
    return RouteHistory(route_id=route_id, changes=[RouteChange(actor=c["actor"], at=c["at"], changed=c["changed"],
                                                                route=masked(c["route"])) for c in changes])
