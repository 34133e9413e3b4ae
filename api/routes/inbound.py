"""MO (mobile-originated) messages of the calling tenant: `GET /v1/inbound`.

Read from the log in MongoDB (core/store/inbound_reads.py), so an MO is listed as soon as the
connector committed it, without the projector's lag. Oldest first, keyset pagination by message id
(ids are time-ordered): poll with `after` = the last id seen to get what arrived since. The listing's
index is created by the connector, and by this module on first use.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import InboundReadsDep, TenantDep
from api.schemas import TENANT_ERRORS, UtcDatetime
from core.store.inbound_reads import InboundReads, InboundRecord

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/inbound", tags=["inbound"])

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_ID_LEN = 64

ERRORS = TENANT_ERRORS


class UdhInfo(BaseModel):
    ref: int
    total: int
    index: int


class InboundMessage(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)

    id: str
    sender: str = Field(serialization_alias="from", description="The handset's number (E.164)")
    to: str = Field(description="Your number (E.164) or short code it was sent to")
    text: str
    received_at: datetime = Field(description="When msgcore recorded it (UTC)")
    reply_to: str | None = Field(default=None, description="Id of the newest message you sent to `from`, if any")
    smsc_message_id: str | None = None
    route_id: str | None = None
    udh: UdhInfo | None = Field(default=None, description="Concatenation info when this is one part of a long MO")


class InboundPage(BaseModel):
    inbound: list[InboundMessage]
    next_after: str | None = Field(default=None, description="Pass as `after` for the next page; null at the end")


async def _indexes_once(request: Request, reads: InboundReads) -> None:
    """Create the index the listing needs, once per app; without it the listing is slower, not wrong."""
    if getattr(request.app.state, "inbound_indexes", False):
        return
    await reads.ensure_indexes()
    request.app.state.inbound_indexes = True


@router.get("", response_model=InboundPage, responses=ERRORS, summary="List MO messages sent to your numbers",
            description="Oldest first. `since` (ISO 8601 with a zone) keeps those received at or after it; "
                        "`after` (a message id, e.g. the previous page's `next_after`) those after that id.")
async def list_inbound(
    request: Request,
    tenant: TenantDep,
    reads: InboundReadsDep,
    since: Annotated[UtcDatetime | None, Query(description="Received at or after")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    after: Annotated[str | None, Query(min_length=1, max_length=MAX_ID_LEN,
                                       description="Message id of the last item already seen")] = None,
) -> InboundPage:
    await _indexes_once(request, reads)
    records = await reads.list(tenant.id, since=since, after=after, limit=limit)
    items = [_item(r) for r in records]
    log.debug("tenant %s: %d inbound message(s) listed", tenant.id, len(items))
    return InboundPage(inbound=items, next_after=items[-1].id if len(items) == limit else None)


def _item(r: InboundRecord) -> InboundMessage:
    return InboundMessage(id=r.id, sender=r.sender, to=r.to, text=r.text, received_at=r.received_at,
                          reply_to=r.reply_to, smsc_message_id=r.smsc_message_id, route_id=r.route_id,
                          udh=UdhInfo(**r.udh) if r.udh else None)
