"""The submission service: the one way a new message enters msgcore.

Every entry point (the messages API, a campaign's recipient upload, any later one) describes each new
message as a `Submission` (validated and measured, encoding and parts, by the entry point) and
leaves the rest here: the message's `accepted` event (seq 1) is built by `accepted` and handed to
the router's topic of its lane, or to a timer when it is scheduled (core/store/submission.py);
`SubmissionService.submit` adds fresh ids, idempotency and the registration of a tenant's marketing
lane, routes transactional messages whose route is UP at once (`routed_at_acceptance`), and commits
the batch as one transaction.

Consent: the batch's recipients are looked up on the tenant's suppression list (one query for the
batch, none while the tenant has no entries: core/store/suppressions.py); a suppressed message is
`accepted` and `rejected` with reason `opted_out` (an e-mail: `suppressed`) in the same transaction,
never routed, sent or billed (core/store/submission.py `rejected_at_acceptance`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from core.domain.consent import REJECTION_REASONS, rejection_reason
from core.domain.message import tenant_lane
from core.ids import new_message_id
from core.store.eventstore import EventStore, IdempotencyRecord, IdempotencyReplay
from core.store.lanes import ACTIVE, LaneStore
from core.store.routes import RouteTable
from core.store.submission import Submission, accepted, rejected_at_acceptance, routed_at_acceptance
from core.store.suppressions import SuppressionStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Idempotency:
    """A client's retry-safety key (unique per tenant) and the hash of the request it came with."""

    key: str
    request_hash: str


class IdempotencyKeyReused(Exception):
    """The key was used before with a different request: nothing was written."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r} was used before with a different request")
        self.key = key


@dataclass(frozen=True)
class Submitted:
    """The ids of the messages, in submission order; `replayed`: an earlier request with the same
    idempotency key created them, and this one created nothing."""

    ids: list[str]
    replayed: bool = False
    rejected: dict[str, str] = field(default_factory=dict)  # id -> reason, for those rejected at acceptance


class SubmissionService:
    """Accepts new messages for a tenant. `known_lanes` remembers, per process, the lanes already
    registered (the stages claim only registered lanes, core/store/lanes.py). With `routes` (the
    process's RouteTable), transactional messages whose route is UP are routed in the same
    transaction; without, every message goes through the router."""

    def __init__(self, events: EventStore, lanes: LaneStore, known_lanes: set[str],
                 routes: RouteTable | None = None, rng: random.Random | None = None,
                 suppressions: SuppressionStore | None = None) -> None:
        self.events = events
        self.suppressions = suppressions or SuppressionStore(events.db)
        self.lanes = lanes
        self.known_lanes = known_lanes
        self.routes = routes
        self.rng = rng or random.Random()

    async def submit(self, tenant_id: str, submissions: Sequence[Submission], now: datetime,
                     idempotency: Idempotency | None = None) -> Submitted:
        """Accept `submissions` as one transaction (all or nothing) under fresh ids.

        With `idempotency`: a key seen before with the same request hash answers the earlier ids and
        writes nothing (`replayed`); with another hash raises IdempotencyKeyReused. Raises the store's
        errors (StoreUnavailable: nothing was written)."""
        ids = [new_message_id() for _ in submissions]
        record = None
        if idempotency is not None:
            record = IdempotencyRecord(key=f"{tenant_id}:{idempotency.key}", request_hash=idempotency.request_hash,
                                       message_ids=ids)
        if any(not s.transactional and s.campaign_id is None for s in submissions):
            await self._ensure_marketing_lane(tenant_id, now)
        writes = [accepted(mid, tenant_id, s, now) for mid, s in zip(ids, submissions, strict=True)]
        blocked = await self.suppressions.blocked(tenant_id, [(s.channel, s.to, s.sender) for s in submissions])
        if self.routes is not None:
            await self.routes.refresh(now)
            writes = [w if i in blocked else routed_at_acceptance(w, self.routes.routes, self.routes.status,
                                                                  self.rng, now) for i, w in enumerate(writes)]
        reasons = {i: rejection_reason(submissions[i].channel) for i in blocked}
        for i, scope in blocked.items():
            writes[i] = rejected_at_acceptance(writes[i], now, reasons[i], {"scope": scope})
        rejected = {ids[i]: reasons[i] for i in blocked}
        try:
            await self.events.accept(writes, record)
        except IdempotencyReplay as replay:
            assert idempotency is not None and record is not None  # only a keyed request can replay
            ids = _replayed_ids(replay, record, idempotency.key, len(submissions))
            log.info("tenant %s: idempotent replay of key %r, %d message(s), first %s",
                     tenant_id, idempotency.key, len(ids), ids[0])
            return Submitted(ids, replayed=True, rejected=await self._rejected_at_acceptance(ids))
        log.info("tenant %s: accepted %d message(s), first %s%s%s", tenant_id, len(ids), ids[0],
                 f", idempotency key {idempotency.key!r}" if idempotency else "",
                 f", {len(rejected)} rejected (suppressed), first {next(iter(rejected))}" if rejected else "")
        return Submitted(ids, rejected=rejected)

    async def _rejected_at_acceptance(self, ids: Sequence[str]) -> dict[str, str]:
        """For a replay: which of the earlier ids were rejected at acceptance (one query)."""
        states = await self.events.states(ids)
        return {mid: str(st.extra.get("reason")) for mid, st in states.items()
                if st.state == "rejected" and st.version == 2 and st.extra.get("reason") in REJECTION_REASONS}

    async def _ensure_marketing_lane(self, tenant_id: str, now: datetime) -> None:
        """Register the tenant's marketing lane before its first marketing message is accepted."""
        lane = tenant_lane(tenant_id)
        if lane not in self.known_lanes:
            await self.lanes.ensure(lane, tenant_id, transactional=False, state=ACTIVE, now=now)
            self.known_lanes.add(lane)


def _replayed_ids(replay: IdempotencyReplay, record: IdempotencyRecord, key: str, count: int) -> list[str]:
    """The ids of the earlier request with this key; IdempotencyKeyReused if its body differed."""
    earlier = replay.record
    if earlier.get("request_hash") != record.request_hash:
        raise IdempotencyKeyReused(key)
    ids: list[str] = list(earlier["message_ids"])
    if len(ids) != count:  # same hash means same body: only a store bug gets here
        raise RuntimeError(f"idempotency record {earlier['_id']} holds {len(ids)} ids, request has {count}")
    return ids
