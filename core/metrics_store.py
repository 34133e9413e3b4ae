"""Metrics read from the store on scrape: backlog per topic and route status (core/store/backlog.py).

Every process that serves /metrics may expose them (the api and the scheduler do): they describe the
shared log, not the process, so dashboards aggregate them with `max by (...)`, never `sum`. Reads are
cached for `ttl_s` so that several Prometheus servers, or a scrape storm, cost one read.

prometheus_client collects synchronously; the async `refresh()` runs first in the handler of
/metrics (api/routes/health.py, core/metrics_server.py) and `collect()` yields what it cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from core.metrics import BACKLOG_NAME, ROUTE_STATUS_NAME, STORE_READ_ERRORS_NAME, lane_class
from core.store.backlog import TopicBacklog, route_statuses, topic_backlogs
from core.store.database import Database
from core.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 2.0


def lane_labels(backlogs: list[TopicBacklog], detail: int) -> dict[tuple[str, str, str], int]:
    """Backlog summed by (stage, route, lane label): the lane's class, or its key for the `detail`
    lanes with the most waiting (bounded cardinality: at most `detail` keys ever appear at once)."""
    per_lane: dict[str, int] = {}
    for b in backlogs:
        if b.lane:
            per_lane[b.lane] = per_lane.get(b.lane, 0) + b.waiting
    top = {lane for lane, n in sorted(per_lane.items(), key=lambda kv: -kv[1])[:detail] if n > 0}
    out: dict[tuple[str, str, str], int] = {}
    for b in backlogs:
        label = b.lane if b.lane in top else lane_class(b.lane)
        key = (b.stage, b.route, label)
        out[key] = out.get(key, 0) + b.waiting
    return out


class StoreGauges(Collector):
    def __init__(self, db: Database, clock: Callable[[], datetime], *, ttl_s: float = 5.0,
                 lane_detail: int = 0) -> None:
        self.db = db
        self.clock = clock
        self.ttl_s = ttl_s
        self.lane_detail = lane_detail
        self.errors = 0
        self._backlog: dict[tuple[str, str, str], int] = {}
        self._statuses: dict[str, str] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()
        # Its own registry, rendered after the process-wide catalogue (core.metrics.render).
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    async def refresh(self) -> None:
        """Read the store unless the last read is younger than `ttl_s`. A failed read drops the
        values (a stale backlog would look healthy) and counts an error; it never raises."""
        async with self._lock:
            if time.monotonic() - self._read_at < self.ttl_s:
                return
            self._read_at = time.monotonic()
            try:
                backlogs = await asyncio.wait_for(topic_backlogs(self.db), READ_TIMEOUT_S)
                statuses = await asyncio.wait_for(route_statuses(self.db, self.clock()), READ_TIMEOUT_S)
            except (TimeoutError, StoreUnavailable) as e:
                self.errors += 1
                self._backlog, self._statuses = {}, {}
                log.warning("metrics: store gauges not read: %r", e)
                return
            self._backlog = lane_labels(backlogs, self.lane_detail)
            self._statuses = statuses

    def collect(self) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(BACKLOG_NAME, "Entries waiting in the topics of a stage (counter - "
                                    "checkpoint), by route and lane", labels=["stage", "route", "lane"])
        for (stage, route, lane), n in sorted(self._backlog.items()):
            backlog.add_metric([stage, route, lane], n)
        yield backlog
        status = GaugeMetricFamily(ROUTE_STATUS_NAME, "1 for the route's current status (up, busy, down)",
                                   labels=["route", "status"])
        for route, current in sorted(self._statuses.items()):
            for s in ("up", "busy", "down"):
                status.add_metric([route, s], 1 if s == current else 0)
        yield status
        errors = CounterMetricFamily(STORE_READ_ERRORS_NAME.removesuffix("_total"),
                                     "Scrapes whose store read failed (gauges left empty)")
        errors.add_metric([], self.errors)
        yield errors

