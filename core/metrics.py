"""The Prometheus metric catalogue: every metric msgcore exports, defined once, in one place.

Conventions (https://prometheus.io/docs/practices/naming/): names start with `msgcore_`, counters end
in `_total`, durations are `_seconds` histograms, sizes are plain numbers. Labels are bounded:

    type     an event type (core/domain/events.py: ~16 values)
    route    a route id (configured by operators: tens), "" when an event has none
    stage    route | send | await (the topics' stages)
    lane     shared | campaign | marketing; a lane key (campaign or tenant id) only for the top
             MSGCORE_METRICS_LANE_DETAIL lanes by backlog (default 0: never)
    state    an SMPP bind state (BIND_STATES)
    status   an SMPP command_status name, or an HTTP status code
    method, handler   an HTTP method and the route TEMPLATE (`/v1/messages/{message_id}`), never a path

Never a message id, an SMSC id or a phone number; tenants only behind the lane-detail setting.

Instrumenting a component is a few lines with the helpers below:

    metrics.count_committed(writes, result.committed)      # after EventLog.commit
    metrics.BATCH_SIZE.labels(stage="router").observe(len(batch.entries))
    metrics.observe_since(metrics.ACCEPTED_TO_SUBMIT, route_id, state.accepted_at, now)

Store-derived values (backlog per topic) are read on scrape by core/metrics_store.py, not here.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, ParamSpec, Protocol, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "render"]

# accepted -> submit_sm: milliseconds when routes are UP, minutes under backlog or retries.
SUBMIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
# submit_sm -> receipt: about a second on a simulator, up to the 48 h validity on a real network.
RECEIPT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 48 * 3600)
# One HTTP request or one batch commit.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)

BIND_STATES = ("bound", "binding", "down")
LANE_CLASSES = ("shared", "campaign", "marketing")


# ---- the log -----------------------------------------------------------------------------------

EVENTS_APPENDED = Counter("msgcore_events_appended", "Events committed to the log, by type and route",
                          ["type", "route"])
BATCH_SIZE = Histogram("msgcore_batch_size", "Entries read per batch by a stage (one transaction each)",
                       ["stage"], buckets=BATCH_BUCKETS)
COMMIT_CONFLICTS = Counter("msgcore_commit_conflicts", "Messages dropped from a batch: another writer "
                           "took their next seq (a receipt racing an expiry, ...)", ["stage"])
CHECKPOINT_MOVED = Counter("msgcore_checkpoint_moved", "Batches given up because another consumer moved "
                           "the checkpoint first (read again)", ["stage"])

# ---- latencies ---------------------------------------------------------------------------------

ACCEPTED_TO_SUBMIT = Histogram("msgcore_accepted_to_submit_seconds", "From `accepted` (or send_at) to the "
                               "submit_sm of the message's first part", ["route"], buckets=SUBMIT_BUCKETS)
SUBMIT_TO_RECEIPT = Histogram("msgcore_submit_to_receipt_seconds", "From `sent` to its delivery receipt "
                              "(delivered or undelivered)", ["route"], buckets=RECEIPT_BUCKETS)

# ---- SMPP (connector) --------------------------------------------------------------------------

SMPP_BINDS = Gauge("msgcore_smpp_binds", "SMPP binds of this process by state", ["route", "state"])
SMPP_WINDOW_IN_USE = Gauge("msgcore_smpp_window_in_use", "submit_sm awaiting their response", ["route"])
SMPP_WINDOW_SIZE = Gauge("msgcore_smpp_window_size", "Configured window (all binds of the route)", ["route"])
SMPP_TPS_LIMIT = Gauge("msgcore_smpp_tps_limit", "Configured submit_sm per second of the route", ["route"])
SMPP_SUBMITS = Counter("msgcore_smpp_submits", "submit_sm sent (rate() = TPS used)", ["route"])
SMPP_RESPONSES = Counter("msgcore_smpp_submit_responses", "submit_sm_resp by command_status name",
                         ["route", "status"])
SMPP_THROTTLED = Counter("msgcore_smpp_throttled", "ESME_RTHROTTLED answers of the SMSC",
                         ["route"])
SMPP_RECONNECTS = Counter("msgcore_smpp_reconnects", "Binds lost and re-established", ["route"])
ORPHAN_RECEIPTS = Counter("msgcore_orphan_receipts", "Receipts whose SMSC id matched no `sent` event",
                          ["route"])
POSSIBLE_DUPLICATES = Counter("msgcore_possible_duplicates", "Messages resent after an unknown outcome "
                              "(the route's `resend` policy marks them)", ["route"])
CONNECTOR_OWNER = Gauge("msgcore_connector_owner",
                        "Partitions of the route this process owns (1 unpartitioned; 0: standby)",
                        ["route"])

# ---- projector ---------------------------------------------------------------------------------

PROJECTOR_EVENTS = Counter("msgcore_projector_events", "Events applied to the reporting tables")
PROJECTOR_LAG_SECONDS = Gauge("msgcore_projector_lag_seconds", "Wall clock minus the `at` of the newest "
                              "event applied (0 when caught up and idle)")
PROJECTOR_LAG_EVENTS = Gauge("msgcore_projector_lag_events", "Events in the log not yet applied (estimate: "
                              "those whose _id is from a later second than the newest event seen; read on scrape)")
PROJECTOR_BATCH_SECONDS = Histogram("msgcore_projector_batch_seconds", "One PostgreSQL transaction of a batch "
                                    "(change stream or catch-up page)", buckets=REQUEST_BUCKETS)
PROJECTOR_ACTIVE = Gauge("msgcore_projector_active", "1 while this process holds the projection lock")


# The stats of the projector this process runs (at most one), for the readers that need the store
# on scrape (PROJECTOR_LAG_EVENTS: core/metrics_server.py ProjectorLagEvents).
_WATCHED: dict[str, Any] = {}


def watch_projector(stats: Any, clock: Callable[[], datetime]) -> None:
    """Read the projector's gauges from its stats (projections.writer.ProjectorStats) when Prometheus
    scrapes: nothing on its hot path. Lag: wall clock minus the newest event received, 0 when no
    event arrived since the previous scrape (caught up and idle: the stream delivers within a
    second). The lag in events needs a count in the log: `watched_projector()` hands the stats to
    the metrics server, which counts on scrape."""
    _WATCHED["projector"] = stats
    PROJECTOR_ACTIVE.set_function(lambda: 1.0 if stats.active else 0.0)
    seen = [-1]

    def lag() -> float:
        newest, received = stats.last_event_at, stats.received
        idle = received == seen[0]
        seen[0] = received
        if newest is None or not stats.active or idle:
            return 0.0
        return max(0.0, (clock() - newest).total_seconds())

    PROJECTOR_LAG_SECONDS.set_function(lag)


def watched_projector() -> Any | None:
    """The stats given to the last `watch_projector` of this process (None: it runs no projector)."""
    return _WATCHED.get("projector")

# ---- scheduler ---------------------------------------------------------------------------------

TIMERS_RELEASED = Counter("msgcore_timers_released", "Due timers handed back to their topic")
TIMERS_POSTPONED = Counter("msgcore_timers_postponed", "Due timers of a suspended tenant, postponed")
CAMPAIGN_TRANSITIONS = Counter("msgcore_campaign_transitions", "Campaign status changes by the scheduler",
                               ["to"])

# ---- api ---------------------------------------------------------------------------------------

API_REQUESTS = Counter("msgcore_api_requests", "HTTP requests by method, route template and status",
                       ["method", "handler", "status"])
API_REQUEST_SECONDS = Histogram("msgcore_api_request_duration_seconds", "HTTP request duration",
                                ["method", "handler"], buckets=REQUEST_BUCKETS)

# ---- store-derived (read on scrape: core/metrics_store.py) -------------------------------------

BACKLOG_NAME = "msgcore_backlog_messages"  # gauge {stage, route, lane}: topic counter - checkpoint
STORE_READ_ERRORS_NAME = "msgcore_store_gauge_errors_total"  # scrapes whose store read failed
ROUTE_STATUS_NAME = "msgcore_route_status"  # gauge {route, status}: 1 for the route's current status
STORE_GAUGE_NAMES = (BACKLOG_NAME, ROUTE_STATUS_NAME, STORE_READ_ERRORS_NAME)


class _Committed(Protocol):
    message_id: str
    events: list[dict[str, Any]]


def count_committed(writes: Sequence[_Committed], committed: Iterable[str]) -> int:
    """Count the events of the committed writes by type and route; returns how many. Call once per
    commit with `CommitResult.committed` (a dropped write's events never reached the log)."""
    done = set(committed)
    per_label: dict[tuple[str, str], int] = {}
    for w in writes:
        if w.message_id in done:
            for e in w.events:
                key = (e["type"], e.get("route_id") or "")
                per_label[key] = per_label.get(key, 0) + 1
    # One labels() lookup per (type, route), not per event: this runs on every stage's hot path.
    for (event_type, route), n in per_label.items():
        EVENTS_APPENDED.labels(type=event_type, route=route).inc(n)
    return sum(per_label.values())


def observe_since(histogram: Histogram, route_id: str | None, start: datetime | None, end: datetime) -> None:
    """Observe `end - start` in seconds for a route (nothing when `start` is unknown; a negative
    difference, a clock step between hosts, counts as 0)."""
    if start is None:
        return
    histogram.labels(route=route_id or "").observe(max(0.0, (end - start).total_seconds()))


P = ParamSpec("P")
T = TypeVar("T")


def timed(histogram: Histogram, call: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """`call` with each await's duration observed in `histogram`, also when it raises (a transaction
    rolled back took its time too). For calls made once per batch, not per event."""

    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        started = time.perf_counter()
        try:
            return await call(*args, **kwargs)
        finally:
            histogram.observe(time.perf_counter() - started)

    return wrapper


def lane_class(lane: str) -> str:
    """The bounded class of a lane key: "" -> shared, "c:<id>" -> campaign, else marketing."""
    if not lane:
        return "shared"
    return "campaign" if lane.startswith("c:") else "marketing"


def render(*registries: CollectorRegistry) -> bytes:
    """The text exposition of the process-wide catalogue followed by `registries` (per-server
    collectors, e.g. the store gauges): metric families never repeat across them."""
    return b"".join(generate_latest(r) for r in (REGISTRY, *registries))


# ---- SMPP server for ESMEs (smsc/esme_server/) -------------------------------------------------

ESME_BINDS = Counter("msgcore_esme_binds", "Bind attempts of ESMEs by outcome (an SMPP status name)", ["status"])
ESME_PDUS = Counter("msgcore_esme_pdus", "PDUs received from ESMEs by command", ["command"])
ESME_SUBMITS_REFUSED = Counter("msgcore_esme_submits_refused", "submit_sm refused, by SMPP status", ["status"])
ESME_SUBMITS_ACCEPTED = Counter("msgcore_esme_submits_accepted", "Messages accepted from ESMEs")
ESME_GROUP_COMMITS = Counter("msgcore_esme_group_commits", "Transactions committing ESME submits (group commit)")
ESME_RECEIPTS_SENT = Counter("msgcore_esme_receipts_sent", "deliver_sm receipts sent to ESMEs (first sends)")
ESME_RECEIPTS_REDELIVERED = Counter("msgcore_esme_receipts_redelivered", "deliver_sm receipts sent again after "
                                    "a time-out, a refusal or a lost bind")

# ---- status webhooks (core/workers/webhooks_*.py) -------------------------------------------------

WEBHOOK_DELIVERIES = Counter("msgcore_webhook_deliveries", "Webhook POSTs by outcome: delivered (2xx), "
                             "failed (will retry: non-2xx, timeout, refused address), webhook_failed (given up)",
                             ["outcome"])
WEBHOOK_LATENCY = Histogram("msgcore_webhook_delivery_seconds", "One webhook POST, answered or not",
                            buckets=REQUEST_BUCKETS)
WEBHOOK_BACKLOG = Gauge("msgcore_webhook_backlog_jobs", "Delivery jobs not yet dispatched, summed over the hook "
                        "topics this process owns (counter - checkpoint)")
WEBHOOK_TOPICS_OWNED = Gauge("msgcore_webhook_topics_owned", "Hook topics (endpoints) this process dispatches")
WEBHOOK_REDELIVERED = Counter("msgcore_webhook_redelivered", "Events sent again by a new owner: an earlier "
                              "owner's attempt reached past its checkpoint (at least once)")
WEBHOOK_FANOUT_EVENTS = Counter("msgcore_webhook_fanout_events", "Events copied into delivery jobs")
