"""Campaigns: a template, a recipient list uploaded as CSV, a start time; pause, resume, cancel.

The campaign document and its upload counters are read from MongoDB (exact); the messages' states
(counts, progress, ETA) from the reporting tables, which follow the log with the projector's lag.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.campaign_schemas import (
    Campaign,
    CampaignCreate,
    CampaignList,
    EmailCampaignCreate,
    EmailTemplatesOut,
    ProblemPage,
    Progress,
    RecipientCounts,
    RowProblemOut,
    UploadReport,
    campaign_create_json_schema,
)
from api.campaign_upload import accept_upload, spool_body
from api.deps import CampaignStoreDep, JsonBody, OptionalReportingPoolDep, SettingsDep, TenantDep
from api.email_submission import normal_address
from api.errors import ApiError
from api.read_side import campaign_states
from api.routes.messages import read_json
from api.schemas import JSON_BODY_ERRORS, TENANT_ERRORS, UtcDatetime, error_responses
from core.domain.campaign import CampaignAction
from core.domain.email import EMAIL, EmailRefused, check_email
from core.domain.email_campaign import EmailTemplates
from core.domain.events import utcnow
from core.domain.templates import Template, TemplateError, parse_template
from core.store.campaigns import CampaignStore

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/campaigns", tags=["campaigns"])

MAX_SCHEDULE_AHEAD = timedelta(days=90)
MAX_UPLOAD_BYTES = 2 * 1024 ** 3
MAX_ROW = 2 ** 53  # a CSV row number; far beyond any upload (MAX_UPLOAD_BYTES), within MongoDB's 64-bit ints
WAITING_STATES = ("accepted", "routed", "retry")

ERRORS = TENANT_ERRORS | error_responses(404, described={404: "No such campaign for this tenant (`not_found`)"})
ACTION_ERRORS = ERRORS | error_responses(409, described={
    409: "The action does not apply in the campaign's status (`invalid_campaign_transition`)"})
# The upload is streamed, not JSON: no 400; 413 is this route's own limit (MAX_UPLOAD_BYTES).
UPLOAD_ERRORS = ERRORS | error_responses(413, 415, 503, described={
    409: "The campaign takes no more recipients (`campaign_closed`)",
    413: "Upload too large (`payload_too_large`)",
    415: "Not CSV (`unsupported_media_type`)",
    422: "`invalid_csv`, `invalid_csv_header` (no phone column, a tag without a column, ...), "
         "`invalid_encoding` (not UTF-8); nothing written",
    503: "The store became unavailable (`unavailable`); the rows before `details.stopped_at_row` are "
         "accepted: upload the same file again"})
CampaignId = Annotated[str, Path(min_length=1, max_length=64)]
CampaignStatusName = Literal["draft", "scheduled", "running", "paused", "canceling", "canceled", "completed"]


@router.post("", status_code=201, response_model=Campaign, dependencies=[JsonBody],
             responses=TENANT_ERRORS | JSON_BODY_ERRORS | error_responses(
                 422, described={422: "`validation_error`, `invalid_template`; e-mail: `invalid_email`, "
                                      "`header_injection`"}),
             summary="Create a campaign (draft)",
             description="An SMS campaign (`channel` sms, the default: `from`, `template`) or an e-mail campaign "
                         "(`channel` email: `from` address, `from_name`, `reply_to`, and the templates `subject`, "
                         "`text` and/or `html`; tag values are HTML-escaped in `html`).",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": campaign_create_json_schema()}}}})
async def create_campaign(request: Request, tenant: TenantDep, campaigns: CampaignStoreDep,
                          settings: SettingsDep) -> Campaign:
    body = _campaign_body(await read_json(request))
    now = utcnow()
    if body.send_at is not None and body.send_at - now > MAX_SCHEDULE_AHEAD:
        raise ApiError(422, "validation_error", "send_at is more than 90 days ahead",
                       [{"field": "body.send_at", "loc": ["body", "send_at"], "type": "too_far_ahead",
                         "message": "send_at is more than 90 days ahead"}])
    transactional = body.priority == "transactional"
    if isinstance(body, EmailCampaignCreate):
        templates, email = _email_definition(body, settings.email_max_body_bytes)
        doc = await campaigns.create(tenant.id, name=body.name, sender=email.pop("from"), template=templates,
                                      transactional=transactional, send_at=body.send_at, now=now, channel=EMAIL,
                                      email=email)
        return _campaign(doc)
    try:
        template = parse_template(body.template)
    except TemplateError as e:
        raise _invalid_template("template", e) from e
    doc = await campaigns.create(tenant.id, name=body.name, sender=body.sender, template=template,
                                  transactional=transactional, send_at=body.send_at, now=now)
    return _campaign(doc)


def _campaign_body(raw: Any) -> CampaignCreate | EmailCampaignCreate:
    """The body as the model its `channel` names (`sms` by default); errors carry body paths."""
    try:
        if isinstance(raw, dict) and raw.get("channel") == EMAIL:
            return EmailCampaignCreate.model_validate(raw)
        return CampaignCreate.model_validate(raw)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False, include_input=False)]
        raise RequestValidationError(errors) from e


def _invalid_template(field: str, e: TemplateError) -> ApiError:
    message = str(e) if field == "template" else f"{field}: {e}"
    return ApiError(422, "invalid_template", message, {"field": f"body.{field}", "offset": e.offset,
                                                               "problem": e.problem})


def _email_definition(body: EmailCampaignCreate, max_body_bytes: int) -> tuple[EmailTemplates, dict[str, Any]]:
    """The campaign's templates and its `email` fields (with `from`), its addresses normalised; 422 on
    an invalid address, a line break in a header field or template."""
    fields = {"to": body.sender, "from": body.sender, "from_name": body.from_name or "",
              "reply_to": body.reply_to or "", "subject": body.subject, "text": body.text or "",
              "html": body.html or ""}
    try:
        content = check_email(fields, max_body_bytes=max_body_bytes, address=normal_address)
    except EmailRefused as e:
        raise ApiError(422, e.code, str(e), {"field": f"body.{'from' if e.field == 'to' else e.field}"}) from e
    parsed: dict[str, Template] = {}
    for name, source in (("subject", body.subject), ("text", body.text), ("html", body.html)):
        if source:
            try:
                parsed[name] = parse_template(source)
            except TemplateError as e:
                raise _invalid_template(name, e) from e
    templates = EmailTemplates(subject=parsed["subject"], text=parsed.get("text"), html=parsed.get("html"))
    return templates, {"from": content.sender, **templates.sources(), "from_name": content.from_name,
                       "reply_to": content.reply_to}


@router.get("", response_model=CampaignList, responses=TENANT_ERRORS, summary="List campaigns, newest first")
async def list_campaigns(tenant: TenantDep, campaigns: CampaignStoreDep,
                         status: Annotated[CampaignStatusName | None, Query()] = None,
                         limit: Annotated[int, Query(ge=1, le=200)] = 50,
                         before: Annotated[UtcDatetime | None, Query(description="Created before (ISO 8601 "
                                                                                 "with a zone): the `next` of the "
                                                                                 "previous page")] = None,
                         ) -> CampaignList:
    docs = await campaigns.list(tenant.id, status=status, limit=limit, before=before)
    return CampaignList(campaigns=[_campaign(d) for d in docs],
                        next=docs[-1]["created_at"] if len(docs) == limit else None)


@router.get("/{campaign_id}", response_model=Campaign, responses=ERRORS,
            summary="A campaign: status, upload counters, messages by state, progress and ETA")
async def get_campaign(campaign_id: CampaignId, tenant: TenantDep, campaigns: CampaignStoreDep,
                       pool: OptionalReportingPoolDep, settings: SettingsDep) -> Campaign:
    doc = await campaigns.get(tenant.id, campaign_id)
    campaign = _campaign(doc)
    states = await campaign_states(pool, settings.reporting_schema, tenant.id, campaign_id)
    if states is not None:
        counts, sent_last_minute = states.counts, states.sent_last_minute
        total = doc["recipients"]["accepted"]
        counts["accepted"] = counts.get("accepted", 0) + max(0, total - sum(counts.values()))  # not projected yet
        waiting = sum(counts.get(s, 0) for s in WAITING_STATES)
        rate = sent_last_minute / 60.0
        campaign.counts = counts
        campaign.progress = Progress(total=total, waiting=waiting,
                                     done_percent=round(100.0 * (total - waiting) / total, 2) if total else 0.0,
                                     rate_per_s=round(rate, 2), eta_s=round(waiting / rate, 1) if rate else None)
    return campaign


@router.post("/{campaign_id}/recipients", response_model=UploadReport, responses=UPLOAD_ERRORS,
             summary="Upload recipients as CSV (streamed)",
             description="Body: CSV (`Content-Type: text/csv`), UTF-8 (a BOM is fine), `,` `;` or tab separated, "
                         "with a header row naming a phone column (`phone`, `to`, `msisdn`, `mobile` or "
                         "`number`; E.164 with `+` or `00`) and a column for each tag of the template. Each valid "
                         "row is rendered and accepted as a message; each other row is reported with its row "
                         "number (the header is row 1) and reason, and skipped. A number already in the campaign "
                         "is reported as a duplicate. Uploading the same file twice accepts nothing twice. An e-mail "
                         "campaign's CSV has an address column instead (`email`, `e-mail`, `mail` or `address`); a "
                         "bad one is `invalid_email`, a subject with a line break once filled `header_injection`.",
             openapi_extra={"requestBody": {"required": True,
                                            "content": {"text/csv": {"schema": {"type": "string"}}}}})
async def upload_recipients(campaign_id: CampaignId, request: Request, tenant: TenantDep,
                            campaigns: CampaignStoreDep, settings: SettingsDep) -> UploadReport:
    campaign = await campaigns.check_uploadable(tenant.id, campaign_id)
    upload = await spool_body(request, MAX_UPLOAD_BYTES)
    with upload.file:
        return await accept_upload(campaigns, campaign, upload, settings.max_parts,
                                   max_body_bytes=settings.email_max_body_bytes)


@router.get("/{campaign_id}/problems", response_model=ProblemPage, responses=ERRORS,
            summary="Rows that were not accepted, by row number")
async def list_problems(campaign_id: CampaignId, tenant: TenantDep, campaigns: CampaignStoreDep,
                        after_row: Annotated[int, Query(ge=0, le=MAX_ROW)] = 0,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ProblemPage:
    rows = await campaigns.problems(tenant.id, campaign_id, after_row=after_row, limit=limit)
    return ProblemPage(problems=[RowProblemOut(**r) for r in rows],
                       next_after_row=rows[-1]["row"] if len(rows) == limit else None)


async def _act(action: CampaignAction, campaign_id: str, tenant_id: str, campaigns: CampaignStore) -> Campaign:
    """The campaign after `action`; the store's CampaignNotFound (404) and the domain's
    CampaignTransitionError (409) are answered by api/app.py."""
    return _campaign(await campaigns.act(tenant_id, campaign_id, action, utcnow()))


@router.post("/{campaign_id}/start", response_model=Campaign, responses=ACTION_ERRORS,
             summary="Start sending (at send_at, if it is ahead)")
async def start_campaign(campaign_id: CampaignId, tenant: TenantDep, campaigns: CampaignStoreDep) -> Campaign:
    return await _act(CampaignAction.START, campaign_id, tenant.id, campaigns)


@router.post("/{campaign_id}/pause", response_model=Campaign, responses=ACTION_ERRORS,
             summary="Stop claiming its messages (within about a second); they keep their place")
async def pause_campaign(campaign_id: CampaignId, tenant: TenantDep, campaigns: CampaignStoreDep) -> Campaign:
    return await _act(CampaignAction.PAUSE, campaign_id, tenant.id, campaigns)


@router.post("/{campaign_id}/resume", response_model=Campaign, responses=ACTION_ERRORS,
             summary="Carry on where it was paused")
async def resume_campaign(campaign_id: CampaignId, tenant: TenantDep, campaigns: CampaignStoreDep) -> Campaign:
    return await _act(CampaignAction.RESUME, campaign_id, tenant.id, campaigns)


@router.post("/{campaign_id}/cancel", response_model=Campaign, responses=ACTION_ERRORS,
             summary="Cancel: messages not yet handed to an SMSC end as `canceled`")
async def cancel_campaign(campaign_id: CampaignId, tenant: TenantDep, campaigns: CampaignStoreDep) -> Campaign:
    return await _act(CampaignAction.CANCEL, campaign_id, tenant.id, campaigns)


def _campaign(doc: dict[str, Any]) -> Campaign:
    return Campaign(id=doc["_id"], name=doc["name"], status=doc["status"], channel=doc["channel"],
                    sender=doc["sender"], template=doc["template"], tags=doc["tags"], priority=doc["priority"],
                    send_at=doc.get("send_at"), created_at=doc["created_at"], started_at=doc.get("started_at"),
                    paused_at=doc.get("paused_at"), canceled_at=doc.get("canceled_at"),
                    completed_at=doc.get("completed_at"), recipients=RecipientCounts(**doc["recipients"]),
                    email=EmailTemplatesOut(**doc["email"]) if doc.get("email") else None,
                    encodings=doc.get("encodings", {}), problems_by_code=doc.get("problems_by_code", {}))
