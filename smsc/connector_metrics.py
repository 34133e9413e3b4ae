"""The Prometheus series of one route's connector (the catalogue is core/metrics.py; route label =
route id, never a message or SMSC id).

The send path is the connector's hot path: per submit_sm it only bumps a plain counter here
(`responses`, `unanswered`) and notes the loop time of a message's first part on its item; they go
to Prometheus when the batch commits (one `inc(n)` per status, one wall clock read per batch) and
every heartbeat (`flush`). The window in use is computed on scrape; the bind states are set when a
bind changes state (smsc/binds.py).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from datetime import datetime

from core import metrics
from core.domain.routing import Route
from smsc.connector_jobs import Job
from smsc.status import status_name


class RouteMetrics:
    """Counters of one connector, flushed in batches; the gauges of its ownership."""

    def __init__(self, route_id: str) -> None:
        self.route_id = route_id
        self.responses: collections.Counter[int] = collections.Counter()  # command_status -> submit_sm_resp
        self.unanswered = 0  # submit_sm that got no response (timeout, bind lost): they may have been sent
        self._submits = metrics.SMPP_SUBMITS.labels(route=route_id)
        self._to_submit = metrics.ACCEPTED_TO_SUBMIT.labels(route=route_id)
        self._batch_size = metrics.BATCH_SIZE.labels(stage="connector")

    def flush(self) -> None:
        """Hand the submits and responses counted since the last flush to Prometheus."""
        if not self.responses and not self.unanswered:
            return
        responses, self.responses = self.responses, collections.Counter()
        self._submits.inc(sum(responses.values()) + self.unanswered)
        self.unanswered = 0
        for status, n in responses.items():
            metrics.SMPP_RESPONSES.labels(route=self.route_id, status=status_name(status)).inc(n)

    def committed(self, job: Job, conflicts: int, now: datetime, loop_now: float) -> None:
        """One batch of the send topics committed at `now` (wall clock) = `loop_now` (loop time)."""
        self._batch_size.observe(len(job.batch.entries))
        if conflicts:
            metrics.COMMIT_CONFLICTS.labels(stage="connector").inc(conflicts)
        if n := job.counts["possible_duplicates"]:
            metrics.POSSIBLE_DUPLICATES.labels(route=self.route_id).inc(n)
        observe = self._to_submit.observe
        for item in job.items:
            if item.submitted_at:  # seconds from accepted (or send_at) to the first part's submit_sm
                state = item.state
                start = state.accepted_at
                if state.send_at is not None and (start is None or state.send_at > start):
                    start = state.send_at
                if start is not None:
                    observe(max(0.0, (now - start).total_seconds() - (loop_now - item.submitted_at)))
        self.flush()

    def owning(self, route: Route, window_in_use: Callable[[], float]) -> None:
        """This process owns the route (or one partition of it) from now on."""
        _OWNED.setdefault(self.route_id, {})[id(self)] = (route.window * route.binds, window_in_use)
        metrics.SMPP_TPS_LIMIT.labels(route=self.route_id).set(route.tps)
        _publish_owned(self.route_id)

    def standby(self) -> None:
        """No longer the owner (stopped, fenced or lease lapsed): nothing in flight from here."""
        self.flush()
        _OWNED.setdefault(self.route_id, {}).pop(id(self), None)
        _publish_owned(self.route_id)


# The connectors of a partitioned route share its series in one process (one connector, and one bind
# pool, per partition): the gauges are the sums over this process's owners and binds of the route.
_OWNED: dict[str, dict[int, tuple[int, Callable[[], float]]]] = {}  # route -> connector -> (window, in use)
_BINDS: dict[str, dict[tuple[int, int, str], str]] = {}  # route -> (pool, index, kind) -> bind state


def _publish_owned(route_id: str) -> None:
    owned = _OWNED[route_id]
    metrics.CONNECTOR_OWNER.labels(route=route_id).set(len(owned))  # owned partitions (1: the route)
    metrics.SMPP_WINDOW_SIZE.labels(route=route_id).set(sum(window for window, _ in owned.values()))
    # Read on scrape: nothing on the send path.
    metrics.SMPP_WINDOW_IN_USE.labels(route=route_id).set_function(
        lambda: float(sum(in_use() for _, in_use in list(owned.values()))))


def bind_state(route_id: str, bind: tuple[int, int, str], state: str) -> None:
    """One bind (pool id, index, kind) changed state (one of metrics.BIND_STATES)."""
    _BINDS.setdefault(route_id, {})[bind] = state
    _publish_binds(route_id)


def binds_closed(route_id: str, pool: int) -> None:
    """A bind pool closed: its binds are no longer counted."""
    binds = _BINDS.setdefault(route_id, {})
    for bind in [b for b in binds if b[0] == pool]:
        del binds[bind]
    _publish_binds(route_id)


def _publish_binds(route_id: str) -> None:
    counts = collections.Counter(_BINDS[route_id].values())
    for state in metrics.BIND_STATES:
        metrics.SMPP_BINDS.labels(route=route_id, state=state).set(counts[state])
