"""The e-mail providers' event webhooks: `POST /v1/providers/{route_id}/events`.

The provider of e-mail route `route_id` posts what became of the mails it took (SendGrid's Event
Webhook format, core/domain/email_events.py), signed with its Signed Event Webhook key (ECDSA P-256,
core/email_signatures.py); the route's `events_key` holds the verification key. No API key: the
signature is the authentication. What is applied, exactly once per provider event id, and how the
batch commits: core/store/email_events.py.

Answers: 200 with counts (also for events that changed nothing: duplicates, orphans, stale, ignored,
so the provider does not retry them); 401 `invalid_signature` (missing or wrong signature: nothing is
read or written); 403 `provider_events_not_configured` (the route has no usable `events_key`); 404 no
such e-mail route; 400 `invalid_json` / 422 `invalid_events` (a signed body that is not an event
array); 503 when the store is unavailable (the provider retries).
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from api.deps import DbDep, JsonBody
from api.errors import ApiError
from api.schemas import error_responses
from core.domain.email_events import MAX_EVENTS, SIGNATURE_HEADER, TIMESTAMP_HEADER, InvalidEvents, parse_sendgrid
from core.domain.events import utcnow
from core.domain.routing import Route
from core.email_signatures import BadKey, verify
from core.store.email_events import ProviderEventStore
from core.store.routes import RouteStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/providers", tags=["providers"])

RouteId = Annotated[str, Path(pattern=Route.model_fields["id"].metadata[0].pattern, description="E-mail route id")]
ERRORS = error_responses(400, 401, 403, 404, 413, 415, 422, 503, described={
    401: f"Missing or wrong `{SIGNATURE_HEADER}` / `{TIMESTAMP_HEADER}` (`invalid_signature`): nothing written",
    403: "The route has no usable `events_key` (`provider_events_not_configured`)",
    404: "No such e-mail route (`not_found`)",
    422: "Signed, but not a JSON array of at most 5,000 events (`invalid_events`)"})
BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "array", "items": {"type": "object"}, "maxItems": MAX_EVENTS,
    "description": "SendGrid Event Webhook events: event, sg_event_id, sg_message_id, email, timestamp, "
                   "type, status, reason, response"}}}}}


class EventsApplied(BaseModel):
    received: int = Field(description="Events in the body")
    applied: dict[str, int] = Field(description="Events recorded, by msgcore event type (delivered, bounced, "
                                                "complained)")
    duplicates: int = Field(description="Provider event ids applied before (or twice in this body): nothing written")
    stale: int = Field(description="Events the message's state no longer takes (e.g. delivered after a bounce)")
    orphans: int = Field(description="Events for no e-mail sent on this route: kept aside, counted")
    ignored: int = Field(description="Event kinds msgcore does not record (processed, deferred, open, click, ...)")
    malformed: int = Field(description="Items without sg_event_id or sg_message_id: skipped")
    suppressed: int = Field(description="Addresses put on their tenant's e-mail suppression list by this body")


@router.post("/{route_id}/events", response_model=EventsApplied, responses=ERRORS, dependencies=[JsonBody],
             openapi_extra=BODY, summary="An e-mail provider's delivery, bounce and complaint events (signed)")
async def provider_events(route_id: RouteId, request: Request, db: DbDep) -> EventsApplied:
    route = await RouteStore(db).get(route_id)
    if route is None or route.channel != "email":
        raise ApiError(404, "not_found", f"no e-mail route {route_id}", {"route_id": route_id})
    body = await request.body()
    _check_signature(route, request, body)
    try:
        batch = parse_sendgrid(body)
    except InvalidEvents as e:
        raise ApiError(400 if e.code == "invalid_json" else 422, e.code, str(e)) from e
    for why in batch.malformed[:5]:
        log.warning("provider events route=%s: skipped %s", route_id, why)
    outcome = await ProviderEventStore(db).apply(route.id, batch.events, utcnow())
    log.info("provider events route=%s: %d received, %s, %d malformed", route_id, len(batch.events) +
             len(batch.malformed), outcome.to_dict(), len(batch.malformed))
    return EventsApplied(received=len(batch.events) + len(batch.malformed), malformed=len(batch.malformed),
                         **outcome.to_dict())


def _check_signature(route: Route, request: Request, body: bytes) -> None:
    """Raise 403 without a usable key, 401 unless the body carries the provider's signature."""
    if not route.events_key:
        raise ApiError(403, "provider_events_not_configured", f"route {route.id} has no events_key: set the "
                       "provider's event webhook verification key on the route", {"route_id": route.id})
    signature = request.headers.get(SIGNATURE_HEADER, "")
    timestamp = request.headers.get(TIMESTAMP_HEADER, "")
    try:
        good = bool(signature and timestamp) and verify(route.events_key, timestamp, body, signature)
    except BadKey as e:
        log.warning("provider events route=%s: its events_key is unusable: %s", route.id, e)
        raise ApiError(403, "provider_events_not_configured", f"route {route.id}: events_key is not an ECDSA "
                       "P-256 public key (base64 DER or PEM)", {"route_id": route.id}) from e
    if not good:
        log.warning("provider events route=%s: refused a body of %d bytes with %s signature", route.id, len(body),
                    "a wrong" if signature and timestamp else "no")
        raise ApiError(401, "invalid_signature", f"the body is not signed with route {route.id}'s events key "
                       f"({SIGNATURE_HEADER}, {TIMESTAMP_HEADER})", {"route_id": route.id})
