"""Campaigns in MongoDB: the campaign documents, their recipients accepted as messages, and the
jobs the scheduler runs (release when due, notice when a canceling campaign is over, notice
completion).

- `campaigns`: one document per campaign: definition, status, and exact upload counters (rows,
  accepted, duplicates, invalid, parts; problems by code), updated in the same transaction as the
  messages they count. State counts of the messages themselves come from the reporting tables.
  A row whose number is on the tenant's suppression list for the campaign's sender (or all senders)
  is refused as `opted_out` (counted with the invalid rows; one query per batch, none while the
  tenant has no entries); in an e-mail campaign, an address suppressed for e-mail as `suppressed`.
- An e-mail campaign (`channel` email) keeps its templates and headers in `email` (subject, text,
  html, from_name, reply_to); its rows (core/domain/email_campaign.py) become e-mail `accepted`
  events with the same fields as a single e-mail's.
- `campaign_problems`: one document per CSV row that was not accepted (row number, code, reason):
  nothing is dropped silently.
- A recipient becomes an `accepted` message in the campaign's lane (`c:<campaign id>`, topic
  `route~c:<id>`), built by core/store/submission.accepted_write, with an id derived from (campaign,
  number): a number appears once per campaign, even across uploads, and an upload repeated after a
  lost answer accepts nothing twice.
- Start, pause and resume are one write to the campaign's lane (which the stages read only while it
  is `active`). Cancel puts the lane in `canceling`: the lane's consumers (router, connector) append
  `canceled` for every entry they read there, so no sweep races a sender. The campaign is `canceled`
  (or `completed`) once its lane is idle: every topic of the lane read up to its counter by its
  consumer, no timer of the lane left, and no upload writing. Backlogs are exact (counter -
  checkpoint): no scan of the messages.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, InsertOne, UpdateOne
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from core.domain.campaign import (
    LANE_STATE,
    UPLOADABLE,
    CampaignAction,
    CampaignStatus,
    apply_action,
)
from core.domain.consent import ALL_SENDERS, rejection_reason
from core.domain.email import EmailContent
from core.domain.email_campaign import EmailRecipient, EmailTemplates
from core.domain.message import campaign_lane, route_topic, send_topics
from core.domain.recipients import Recipient, RowProblem
from core.domain.templates import Template
from core.ids import campaign_message_id, new_campaign_id
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.lanes import LaneStore
from core.store.submission import Submission, accepted
from core.store.suppressions import SuppressionStore
from core.store.timers import Timers
from core.store.topics import Write

log = logging.getLogger(__name__)

UPLOAD_QUIET_S = 15.0  # a campaign is complete only once no upload has written for this long
ROUTER, CONNECTOR = "router", "connector"  # the consumers of a lane's topics (core/workers/router.py, smsc/)


class CampaignNotFound(Exception):
    pass


class CampaignClosed(Exception):
    """Recipients were uploaded to a campaign that no longer takes any (canceled, completed)."""

    def __init__(self, campaign_id: str, status: str) -> None:
        super().__init__(f"campaign {campaign_id} is {status} and takes no more recipients")
        self.status = status


@dataclass
class BatchResult:
    accepted: int = 0
    duplicates: int = 0
    invalid: int = 0
    problems: list[RowProblem] = field(default_factory=list)


class CampaignStore:
    def __init__(self, db: AsyncDatabase) -> None:
        self.db = db
        self.campaigns = db["campaigns"]
        self.problem_rows = db["campaign_problems"]
        self.events = EventStore(db)
        self.lanes = LaneStore(db)
        self.timers = Timers(db)
        self.suppressions = SuppressionStore(db)

    async def ensure_indexes(self) -> None:
        await self.campaigns.create_index([("tenant_id", ASCENDING), ("created_at", DESCENDING)], name="tenant_created")
        await self.campaigns.create_index("status", name="status")
        await self.problem_rows.create_index([("campaign_id", ASCENDING), ("row", ASCENDING)], name="campaign_row")

    # ---- definition and status ------------------------------------------------------------------

    async def create(self, tenant_id: str, *, name: str, sender: str, template: Template | EmailTemplates,
                     transactional: bool, send_at: datetime | None, now: datetime, channel: str = "sms",
                     email: dict[str, Any] | None = None) -> dict[str, Any]:
        """A draft campaign; an e-mail campaign passes its EmailTemplates and `email` (the templates'
        sources, from_name, reply_to)."""
        campaign_id = new_campaign_id()
        doc: dict[str, Any] = {
            "_id": campaign_id, "tenant_id": tenant_id, "name": name, "channel": channel, "sender": sender,
            "template": template.source, "tags": list(template.tags),
            "priority": "transactional" if transactional else "marketing", "send_at": send_at,
            "status": CampaignStatus.DRAFT.value, "lane": campaign_lane(campaign_id),
            "created_at": now, "updated_at": now, "started_at": None, "paused_at": None, "canceled_at": None,
            "completed_at": None, "upload_heartbeat_at": None,
            "recipients": {"rows": 0, "accepted": 0, "duplicates": 0, "invalid": 0, "parts": 0},
            "encodings": {"utf-8": 0} if channel == "email" else {"gsm7": 0, "ucs2": 0}, "problems_by_code": {},
        }
        if email is not None:
            doc["email"] = email
        # The lane first: a campaign document never exists without its lane (the lane alone is harmless).
        await self.lanes.ensure(doc["lane"], tenant_id, transactional=transactional, now=now,
                                state=LANE_STATE[CampaignStatus.DRAFT], campaign_id=campaign_id)
        await self.campaigns.insert_one(doc)
        log.info("campaign=%s tenant=%s created (%s)", campaign_id, tenant_id, doc["priority"])
        return doc

    async def get(self, tenant_id: str, campaign_id: str) -> dict[str, Any]:
        doc = await self.campaigns.find_one({"_id": campaign_id, "tenant_id": tenant_id})
        if doc is None:
            raise CampaignNotFound(campaign_id)
        return doc

    async def list(self, tenant_id: str, *, status: str | None = None, limit: int = 50,
                   before: datetime | None = None) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"tenant_id": tenant_id}
        if status:
            query["status"] = status
        if before is not None:
            query["created_at"] = {"$lt": before}
        cursor = self.campaigns.find(query).sort("created_at", DESCENDING).limit(limit)
        return [d async for d in cursor]

    async def act(self, tenant_id: str, campaign_id: str, action: CampaignAction, now: datetime) -> dict[str, Any]:
        """Apply start/pause/resume/cancel; raises CampaignTransitionError when it does not apply."""
        for _ in range(5):
            doc = await self.get(tenant_id, campaign_id)
            status = apply_action(CampaignStatus(doc["status"]), action, doc.get("send_at"), now)
            if await self._move(doc, status, now, action=action.value):
                return await self.get(tenant_id, campaign_id)
        raise RuntimeError(f"campaign {campaign_id}: status kept changing under {action.value}")

    async def _move(self, doc: dict[str, Any], status: CampaignStatus, now: datetime, action: str) -> bool:
        """Move the campaign from the status read to `status`, and its lane with it, in one transaction."""
        stamp = {CampaignStatus.RUNNING: "started_at", CampaignStatus.PAUSED: "paused_at",
                 CampaignStatus.CANCELING: "canceled_at", CampaignStatus.COMPLETED: "completed_at"}.get(status)
        update: dict[str, Any] = {"status": status.value, "updated_at": now}
        if stamp and not (stamp == "started_at" and doc.get("started_at")):
            update[stamp] = now

        async def body(session: AsyncClientSession) -> bool:
            res = await self.campaigns.update_one({"_id": doc["_id"], "status": doc["status"]}, {"$set": update},
                                                  session=session)
            if res.matched_count == 0:
                return False
            await self.lanes.set_state(doc["lane"], LANE_STATE[status], now, session=session)
            return True

        moved = bool(await self.events.log.transaction(body))
        if moved:
            log.info("campaign=%s tenant=%s %s: %s -> %s", doc["_id"], doc["tenant_id"], action, doc["status"],
                     status.value)
        return moved

    # ---- recipients -----------------------------------------------------------------------------

    async def accept_batch(self, campaign: dict[str, Any], recipients: Sequence[Recipient | EmailRecipient],
                           problems: Sequence[RowProblem], now: datetime) -> BatchResult:
        """Accept `recipients` as messages and record `problems`, with the counters, in one transaction.
        Numbers already in the campaign (earlier batches, other uploads) are reported as duplicates."""
        for _ in range(5):
            try:
                return await self._accept_once(campaign, recipients, problems, now)
            except (DuplicateKeyError, BulkWriteError) as e:
                # Another upload to this campaign accepted one of these numbers meanwhile: look again.
                log.info("campaign=%s: concurrent upload, retrying a batch: %s", campaign["_id"], e)
        raise RuntimeError(f"campaign {campaign['_id']}: a batch kept conflicting with another upload")

    async def _accept_once(self, campaign: dict[str, Any], recipients: Sequence[Recipient | EmailRecipient],
                           problems: Sequence[RowProblem], now: datetime) -> BatchResult:
        cid = campaign["_id"]
        result = BatchResult(invalid=len(problems), problems=list(problems))
        channel = campaign.get("channel", "sms")
        noun = "address" if channel == "email" else "number"
        fresh = _first_of_each(cid, recipients, noun, result.problems)
        existing = await self.events.exists(m for _, m in fresh)
        blocked = await self.suppressions.blocked(campaign["tenant_id"],
                                                  [(channel, r.to, campaign["sender"]) for r, _ in fresh])
        items = []
        parts: dict[str, int] = {}
        total_parts = 0
        for i, (r, mid) in enumerate(fresh):
            if mid in existing:
                result.problems.append(RowProblem(r.row, "duplicate",
                                                  f"{noun} already in this campaign (message {mid})", r.to))
                continue
            if i in blocked:  # a refused row, reported like an invalid one; nothing is written for it
                result.problems.append(_refused(channel, r.row, r.to, blocked[i]))
                result.invalid += 1
                continue
            items.append(self._accepted(campaign, r, mid, now))
            parts[r.encoding] = parts.get(r.encoding, 0) + 1
            total_parts += r.parts
        result.accepted = len(items)
        result.duplicates = len(result.problems) - result.invalid
        by_code: dict[str, int] = {}
        for p in result.problems:
            by_code[p.code] = by_code.get(p.code, 0) + 1
        inc = {"recipients.rows": len(recipients) + len(problems), "recipients.accepted": result.accepted,
               "recipients.duplicates": result.duplicates, "recipients.invalid": result.invalid,
               "recipients.parts": total_parts, **{f"encodings.{k}": v for k, v in parts.items()},
               **{f"problems_by_code.{k}": v for k, v in by_code.items()}}
        counters = UpdateOne({"_id": cid}, {"$inc": inc, "$set": {"upload_heartbeat_at": now, "updated_at": now}})
        problem_rows = [InsertOne({"campaign_id": cid, "tenant_id": campaign["tenant_id"], "row": p.row, "code": p.code,
                                   "reason": p.reason, "phone": p.phone, "at": now}) for p in result.problems]
        side: list[tuple[str, list[Any]]] = [("campaigns", [counters]), ("campaign_problems", problem_rows)]
        await self.events.accept(items, side_writes=side)
        return result

    @staticmethod
    def _accepted(campaign: dict[str, Any], r: Recipient | EmailRecipient, message_id: str, now: datetime) -> Write:
        # No send_at or validity per message: the campaign's lane holds them until it runs.
        email = None
        if isinstance(r, EmailRecipient):
            headers = campaign.get("email") or {}
            email = EmailContent(to=r.to, sender=campaign["sender"], subject=r.subject, text=r.text, html=r.html,
                                 from_name=headers.get("from_name", ""),
                                 reply_to=headers.get("reply_to", "")).accepted_fields()
        return accepted(message_id, campaign["tenant_id"], Submission(
            to=r.to, sender=campaign["sender"], text=r.text, encoding=r.encoding, parts=r.parts,
            transactional=campaign["priority"] == "transactional", campaign_id=campaign["_id"], campaign_row=r.row,
            channel=campaign.get("channel", "sms"), email=email), now)

    async def start_upload(self, campaign_id: str, rows: int, now: datetime) -> None:
        """Note an upload of `rows` data rows starting (for progress bars, and so that the campaign is
        not seen as complete between two of its batches)."""
        await self.campaigns.update_one({"_id": campaign_id}, {
            "$set": {"upload_heartbeat_at": now, "last_upload": {"rows": rows, "started_at": now}},
            "$inc": {"uploads": 1}})

    async def finish_upload(self, campaign_id: str) -> None:
        """The upload is over (done or failed): the campaign may complete or be canceled at once."""
        await self.campaigns.update_one({"_id": campaign_id}, {"$set": {"upload_heartbeat_at": None}})

    async def check_uploadable(self, tenant_id: str, campaign_id: str) -> dict[str, Any]:
        doc = await self.get(tenant_id, campaign_id)
        if CampaignStatus(doc["status"]) not in UPLOADABLE:
            raise CampaignClosed(campaign_id, doc["status"])
        return doc

    async def problems(self, tenant_id: str, campaign_id: str, *, after_row: int = 0,
                       limit: int = 100) -> builtins.list[dict[str, Any]]:
        await self.get(tenant_id, campaign_id)
        cursor = self.problem_rows.find({"campaign_id": campaign_id, "row": {"$gt": after_row}},
                                        {"_id": 0, "row": 1, "code": 1, "reason": 1}).sort("row", ASCENDING)
        return [d async for d in cursor.limit(limit)]

    # ---- the scheduler's jobs -------------------------------------------------------------------

    async def scheduled(self) -> builtins.list[dict[str, Any]]:
        return [d async for d in self.campaigns.find({"status": CampaignStatus.SCHEDULED.value},
                                                     {"send_at": 1, "tenant_id": 1})]

    async def release_due(self, now: datetime) -> builtins.list[str]:
        """Start every scheduled campaign whose send_at has come."""
        released = []
        async for doc in self.campaigns.find({"status": CampaignStatus.SCHEDULED.value, "send_at": {"$lte": now}}):
            if await self._move(doc, CampaignStatus.RUNNING, now, action="release"):
                released.append(doc["_id"])
        return released

    async def lane_topics(self, lane: str) -> dict[str, builtins.list[str]]:
        """The topics of `lane`, by consumer: the router's `route~<lane>` and each route's connector
        `send:<route>~<lane>` (every route, disabled ones too: their topics may still hold work)."""
        try:
            routes = {d["_id"]: int(d.get("partitions") or 1)
                      async for d in self.db["routes"].find({}, {"_id": 1, "partitions": 1})}
        except PyMongoError as e:
            raise StoreUnavailable(str(e)) from e
        return {ROUTER: [route_topic(lane)],
                CONNECTOR: [t for r in sorted(routes) for t in send_topics(r, lane, routes[r])]}

    async def lane_backlog(self, lane: str) -> dict[str, int]:
        """Entries of each topic of `lane` not yet read by its consumer (counter - checkpoint): exact."""
        by_consumer = await self.lane_topics(lane)
        counters = await self.events.log.counters(t for ts in by_consumer.values() for t in ts)
        out = {}
        for consumer, topics in by_consumer.items():
            checkpoints = await self.events.log.load_checkpoints(consumer, topics)
            out.update({t: max(0, counters[t] - checkpoints[t]) for t in topics})
        return out

    async def lane_idle(self, lane: str) -> bool:
        """True when nothing of `lane` waits anywhere: every topic read up to its counter, no timer.

        Work moves in a cycle (route topic -> send topic -> timer -> route topic), so one pass of
        reads could miss a message moving against the order of the reads. Hence: counters first,
        then checkpoints (each at least its counter), then timers, then the counters again,
        unchanged: a message that moved meanwhile either sits in a timer or took a new position."""
        by_consumer = await self.lane_topics(lane)
        topics = [t for ts in by_consumer.values() for t in ts]
        counters = await self.events.log.counters(topics)
        for consumer, ts in by_consumer.items():
            checkpoints = await self.events.log.load_checkpoints(consumer, ts)
            if any(checkpoints[t] < counters[t] for t in ts):
                return False
        if await self.timers.any_for_lane(lane):
            return False
        return await self.events.log.counters(topics) == counters

    def _upload_quiet(self, doc: dict[str, Any], now: datetime) -> bool:
        beat = doc.get("upload_heartbeat_at")
        return beat is None or now - beat >= timedelta(seconds=UPLOAD_QUIET_S)

    async def complete_finished(self, now: datetime) -> builtins.list[str]:
        """Running campaigns with recipients, their lane idle and no upload going on: `completed`."""
        done = []
        async for doc in self.campaigns.find({"status": CampaignStatus.RUNNING.value}):
            finished = (doc["recipients"]["accepted"] > 0 and self._upload_quiet(doc, now)
                        and await self.lane_idle(doc["lane"]))
            if finished and await self._move(doc, CampaignStatus.COMPLETED, now, action="complete"):
                done.append(doc["_id"])
        return done

    async def finish_canceled(self, now: datetime) -> builtins.list[str]:
        """Canceling campaigns whose lane is idle (its consumers canceled everything they read, no
        timer left) and no upload writing: `canceled`."""
        done = []
        async for doc in self.campaigns.find({"status": CampaignStatus.CANCELING.value}):
            if (self._upload_quiet(doc, now) and await self.lane_idle(doc["lane"])
                    and await self._move(doc, CampaignStatus.CANCELED, now, action="canceled")):
                done.append(doc["_id"])
        return done


def _first_of_each(campaign_id: str, recipients: Sequence[Recipient | EmailRecipient], noun: str,
                   problems: list[RowProblem]) -> list[tuple[Recipient | EmailRecipient, str]]:
    """Each recipient with its message id, but for the repeats of an earlier row of the batch (added
    to `problems` as `duplicate`)."""
    first_row: dict[str, int] = {}
    fresh: list[tuple[Recipient | EmailRecipient, str]] = []
    for r in recipients:
        mid = campaign_message_id(campaign_id, r.to)
        if mid in first_row:
            problems.append(RowProblem(r.row, "duplicate", f"same {noun} as row {first_row[mid]}", r.to))
        else:
            first_row[mid] = r.row
            fresh.append((r, mid))
    return fresh


def _refused(channel: str, row: int, to: str, scope: str) -> RowProblem:
    """A row to a recipient on the suppression list: `suppressed` (e-mail) or `opted_out` (SMS)."""
    shown = "every sender" if scope == ALL_SENDERS else f"sender {scope}"
    what = "the address is suppressed" if channel == "email" else "the number opted out"
    return RowProblem(row, rejection_reason(channel), f"{what} ({shown})", to)
