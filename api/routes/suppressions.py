"""The calling tenant's suppression list (opt-outs) and its keyword settings: `/v1/suppressions`.

Entries are `(channel, address, scope)`: `scope` is a sender id, or "*" for every sender. Every
change is an `opted_out` / `opted_in` event (core/store/suppressions.py); a message to a suppressed
number is `rejected` (`opted_out`) at acceptance. Adding an entry that is already active, or removing
one that is not, changes nothing and writes nothing. A request is all or nothing: one bad address
or row refuses it whole (422) before anything is written.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, model_validator
from starlette.convertors import Convertor, register_url_convertor

from api.deps import DbDep, JsonBody, TenantDep
from api.email_submission import normal_address
from api.errors import ApiError
from api.schemas import JSON_BODY_ERRORS, TENANT_ERRORS, error_responses
from api.suppression_csv import MAX_IMPORT_ROWS, parse_import
from core.domain.consent import (
    ALL_SENDERS,
    MAX_CONFIRM_TEXT,
    MAX_KEYWORD_LEN,
    MAX_TENANT_KEYWORDS,
    Change,
    ConsentSettings,
    normalize_address,
    parse_settings,
)
from core.domain.events import utcnow
from core.domain.submission_rules import E164, SENDER_ID
from core.store.suppressions import SuppressionStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/suppressions", tags=["suppressions"])

MAX_BATCH = 1000
MAX_LIMIT = 1000
Scope = Annotated[str, Field(pattern=rf"^(?:\*|{SENDER_ID[1:-1]})$", max_length=17,
                             description='The sender id it applies to, or "*" for every sender')]


Channel = Literal["sms", "email"]
ChannelQuery = Annotated[Channel, Query(description="The list of this channel")]
AddressText = Annotated[str, Field(max_length=320)]


class SuppressionCreate(BaseModel):
    address: Annotated[AddressText, Field(description="The recipient: an E.164 number (sms) or an e-mail "
                                                      "address (email)")]
    scope: Scope = ALL_SENDERS
    channel: Channel = "sms"
    reason: Annotated[str, Field(max_length=500)] = ""

    @model_validator(mode="after")
    def _address_of_its_channel(self) -> SuppressionCreate:
        if self.channel == "email":
            if self.scope != ALL_SENDERS:
                raise ValueError('an e-mail entry applies to every sender: scope "*"')
            self.address = normal_address(self.address)
        elif not re.fullmatch(E164, self.address):
            raise ValueError(f"{self.address!r} is not an E.164 number")
        return self


class SuppressionBatch(BaseModel):
    suppressions: Annotated[list[SuppressionCreate], Field(min_length=1, max_length=MAX_BATCH)]


class Suppression(BaseModel):
    address: str
    scope: str
    channel: str
    since: datetime | None = Field(default=None, description="When it was opted out (UTC)")
    source: str = Field(description="keyword, api, import or cli")
    actor: str
    reason: str = ""


class SuppressionPage(BaseModel):
    suppressions: list[Suppression]
    next_after: str | None = Field(default=None, description="Pass as `after` for the next page; null at the end")


class ChangeResult(BaseModel):
    changed: int = Field(description="Entries that changed (those already so are not counted)")
    unchanged: int


Action = Literal["stop", "stop_all", "start"]


class Keyword(BaseModel):
    keyword: Annotated[str, Field(min_length=1, max_length=MAX_KEYWORD_LEN, description="One word, any case")]
    action: Action


class ConfirmTexts(BaseModel):
    stop: Annotated[str | None, Field(max_length=MAX_CONFIRM_TEXT)] = None
    stop_all: Annotated[str | None, Field(max_length=MAX_CONFIRM_TEXT)] = None
    start: Annotated[str | None, Field(max_length=MAX_CONFIRM_TEXT)] = None


class ConsentSettingsBody(BaseModel):
    languages: Annotated[list[Literal["de", "es", "fr", "it", "nl"]], Field(max_length=5)] = Field(
        default_factory=list, description="Keyword languages on top of English")
    keywords: Annotated[list[Keyword], Field(max_length=MAX_TENANT_KEYWORDS)] = Field(
        default_factory=list, description="The tenant's own keywords (they win over the built-in ones)")
    confirm: bool = Field(default=False, description="Answer a keyword that changed the list with a message")
    confirm_texts: ConfirmTexts = Field(default_factory=ConfirmTexts,
                                        description="The confirmation per action (null: the default text)")

    def raw(self) -> dict[str, Any]:
        return {"languages": self.languages, "keywords": {k.keyword: k.action for k in self.keywords},
                "confirm": self.confirm, "confirm_texts": self.confirm_texts.model_dump(exclude_none=True)}

    @classmethod
    def of(cls, settings: ConsentSettings) -> ConsentSettingsBody:
        texts = {a.value: t for a, t in settings.confirm_texts.items()}
        keywords = [{"keyword": k, "action": a.value} for k, a in settings.keywords.items()]
        return cls.model_validate({"languages": list(settings.languages), "confirm": settings.confirm,
                                   "keywords": keywords, "confirm_texts": texts})


class _AddressConvertor(Convertor[str]):
    """`{address}` of DELETE: anything but the words of the other routes under /v1/suppressions, so
    that `DELETE /v1/suppressions/export` is a 405, not an attempt to remove a number "export"."""

    regex = r"(?!(?:import|export|settings)$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("suppression_address", _AddressConvertor())

ERRORS = TENANT_ERRORS
WRITE_ERRORS = TENANT_ERRORS | JSON_BODY_ERRORS | error_responses(409, described={
    409: "`suppression_conflict`: the same entries kept changing meanwhile; retry"})


def _store(db: Any) -> SuppressionStore:
    return SuppressionStore(db)


def _encode_after(address: str, scope: str) -> str:
    raw = json.dumps([address, scope], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_after(after: str) -> tuple[str, str]:
    try:
        value = json.loads(base64.urlsafe_b64decode(after + "=" * (-len(after) % 4)))
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            return value[0], value[1]
    except (binascii.Error, ValueError):
        pass
    raise ApiError(422, "validation_error", "`after` is not a cursor this API returned",
                   [{"field": "query.after", "loc": ["query", "after"], "type": "value_error",
                     "message": "invalid cursor"}])


def _address(address: str, channel: str = "sms") -> str:
    if channel == "email":
        try:
            return normal_address(address)
        except ValueError as e:
            raise ApiError(422, "invalid_address", f"{address!r} is not an e-mail address: {e}",
                           {"address": address}) from e
    normalized = normalize_address(address)
    if not normalized.startswith("+") or not normalized[1:].isdigit() or not 7 <= len(normalized) - 1 <= 15:
        raise ApiError(422, "invalid_address", f"{address!r} is not an E.164 number", {"address": address})
    return normalized


@router.get("", response_model=SuppressionPage, responses=ERRORS, summary="List the suppression list",
            description="Active entries by address, then scope. Keyset pages: pass `next_after` as `after`.")
async def list_suppressions(
    tenant: TenantDep, db: DbDep,
    address: Annotated[str | None, Query(max_length=320, description="Only this number (or address)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    after: Annotated[str | None, Query(min_length=1, max_length=700)] = None,
    channel: ChannelQuery = "sms",
) -> SuppressionPage:
    wanted = _address(address, channel) if address is not None else None
    rows = await _store(db).list(tenant.id, channel=channel, address=wanted,
                                 after=_decode_after(after) if after else None, limit=limit)
    items = [Suppression.model_validate({k: r.get(k) for k in Suppression.model_fields}) for r in rows]
    nxt = _encode_after(items[-1].address, items[-1].scope) if len(items) == limit else None
    return SuppressionPage(suppressions=items, next_after=nxt)


@router.post("", status_code=200, response_model=ChangeResult, responses=WRITE_ERRORS, dependencies=[JsonBody],
             summary="Opt numbers out", description=f"Body: one entry, or `{{\"suppressions\": [...]}}` with 1.."
                                                    f"{MAX_BATCH}. All or nothing.")
async def add_suppressions(tenant: TenantDep, db: DbDep, body: SuppressionCreate | SuppressionBatch) -> ChangeResult:
    entries = body.suppressions if isinstance(body, SuppressionBatch) else [body]
    changes = [Change(e.channel, e.address, normalize_address(e.scope), True, "api", f"api:{tenant.id}", e.reason)
               for e in entries]
    applied = await _store(db).apply(tenant.id, changes, utcnow())
    return ChangeResult(changed=len(applied), unchanged=len(changes) - len(applied))


@router.delete("/{address:suppression_address}", response_model=ChangeResult,
               responses=ERRORS | error_responses(404, 409),
               summary="Opt a number back in",
               description="Removes the number's entry for `scope`, or every entry of the number without one. "
                           "404 `not_found` when nothing matched.")
async def remove_suppression(
    tenant: TenantDep, db: DbDep, address: Annotated[str, Path(max_length=320)],
    scope: Annotated[str | None, Query(max_length=16)] = None,
    reason: Annotated[str, Query(max_length=500)] = "",
    channel: ChannelQuery = "sms",
) -> ChangeResult:
    number = _address(address, channel)
    store = _store(db)
    scopes = [normalize_address(scope)] if scope is not None else await store.active_scopes(tenant.id, channel,
                                                                                            number)
    changes = [Change(channel, number, s, False, "api", f"api:{tenant.id}", reason) for s in scopes]
    applied = await store.apply(tenant.id, changes, utcnow()) if changes else []
    if not applied:
        raise ApiError(404, "not_found", f"{number} is not suppressed" + (f" for {scope!r}" if scope else ""),
                       {"address": number, "scope": scope})
    return ChangeResult(changed=len(applied), unchanged=len(changes) - len(applied))


@router.post("/import", response_model=ChangeResult, responses=WRITE_ERRORS, summary="Import opt-outs from CSV",
             description="Body: CSV (`text/csv`, UTF-8) with a header: an address column (`address`, `phone`, "
                         "`number`, `msisdn` or `to`), optional `scope` and `reason`. At most "
                         f"{MAX_IMPORT_ROWS} rows; any bad row refuses the file whole (422 `invalid_csv_rows`).",
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"text/csv": {"schema": {"type": "string"}}}}})
async def import_suppressions(request: Request, tenant: TenantDep, db: DbDep) -> ChangeResult:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in ("text/csv", "application/csv", "text/plain"):
        raise ApiError(415, "unsupported_media_type", "send the file as text/csv")
    rows = parse_import(await request.body())
    changes = [Change("sms", address, scope, True, "import", f"api:{tenant.id}", reason)
               for address, scope, reason in rows]
    applied = await _store(db).apply(tenant.id, changes, utcnow()) if changes else []
    log.info("tenant=%s: suppression import of %d rows, %d changed", tenant.id, len(rows), len(applied))
    return ChangeResult(changed=len(applied), unchanged=len(changes) - len(applied))


@router.get("/export", responses=ERRORS, summary="Export the suppression list as CSV",
            response_class=StreamingResponse,
            description="`address,scope,channel,since,source,reason`, one active entry per line.")
async def export_suppressions(tenant: TenantDep, db: DbDep, channel: ChannelQuery = "sms") -> StreamingResponse:
    store = _store(db)

    async def lines() -> AsyncIterator[str]:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["address", "scope", "channel", "since", "source", "reason"])
        async for d in store.export(tenant.id, channel):
            since = d.get("since")
            writer.writerow([d["address"], d["scope"], d["channel"], since.isoformat() if since else "",
                             d.get("source", ""), d.get("reason", "")])
            if out.tell() > 64_000:
                yield out.getvalue()
                out.seek(0)
                out.truncate()
        yield out.getvalue()

    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": 'attachment; filename="suppressions.csv"'})


@router.get("/settings", response_model=ConsentSettingsBody, responses=ERRORS, summary="Keyword settings")
async def get_settings(tenant: TenantDep, db: DbDep) -> ConsentSettingsBody:
    return ConsentSettingsBody.of((await _store(db).settings([tenant.id]))[tenant.id])


@router.put("/settings", response_model=ConsentSettingsBody, responses=WRITE_ERRORS, dependencies=[JsonBody],
            summary="Change the keyword settings",
            description="Extra languages and keywords (English STOP, STOPALL, UNSUBSCRIBE, CANCEL, END, QUIT, "
                        "START, UNSTOP are always on) and the optional confirmation reply.")
async def put_settings(tenant: TenantDep, db: DbDep, body: ConsentSettingsBody) -> ConsentSettingsBody:
    settings = parse_settings(body.raw())
    await _store(db).put_settings(tenant.id, settings, f"api:{tenant.id}", utcnow())
    return ConsentSettingsBody.of(settings)
