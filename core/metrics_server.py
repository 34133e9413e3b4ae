"""A worker process's HTTP endpoint for Prometheus and probes: /metrics, /healthz, /readyz.

A tiny asyncio server in the worker's own event loop (not prometheus_client's thread): /healthz is
answered by the loop that runs the worker, so a blocked loop fails the liveness probe, and /readyz can
await the store checks. One request per connection, GET only, nothing else served.

    /healthz   200 {"status": "ok"}: the process and its loop are alive (liveness: no store round trip)
    /readyz    200 or 503 {"status": "ok" | "unavailable", "checks": {"mongo": "ok", ...}}: MongoDB;
               PostgreSQL for the projector; the connector's SMPP binds (core/readiness.py)
    /metrics   the Prometheus text exposition (core/metrics.py, plus the store gauges if given, plus
               what the `refreshers` read on scrape: the projector's lag in events)

The port comes from `metrics_port_for(settings, component)`; 0 = no server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from core import metrics
from core.config import Settings
from core.domain.events import utcnow
from core.metrics import CONTENT_TYPE_LATEST, render
from core.metrics_store import StoreGauges
from core.readiness import Check, all_ok, mongo_check, pg_check, run_checks, smpp_check
from core.store.change_feed import ChangeFeed
from core.store.database import Database
from core.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

# `metrics_port_base + offset` when a component has no port of its own (`msgcore up` on one host).
PORT_OFFSETS = {"api": 0, "router": 1, "scheduler": 2, "connector": 3, "projector": 4, "webhooks": 5,
                "smpp-server": 6, "mailer": 7}
MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_S = 5.0
LAG_COUNT_LIMIT = 100_000  # the lag in events counts at most this many (a count costs what it reads)
LAG_READ_TIMEOUT_S = 2.0
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}


def metrics_port_for(settings: Settings, component: str) -> int:
    """The metrics port of `component`: MSGCORE_METRICS_PORT if set, else MSGCORE_METRICS_PORT_BASE +
    its offset (PORT_OFFSETS) if a base is set, else 0 (off)."""
    if settings.metrics_port:
        return settings.metrics_port
    if settings.metrics_port_base:
        return settings.metrics_port_base + PORT_OFFSETS.get(component, len(PORT_OFFSETS))
    return 0


@dataclass
class MetricsServer:
    """Serve until `stop()`. `checks` are the readiness checks (core/readiness.py); `gauges`, if
    given, adds the store-derived metrics to /metrics."""

    host: str
    port: int
    checks: dict[str, Check] = field(default_factory=dict)
    gauges: StoreGauges | None = None
    refreshers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run before /metrics
    _server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the port (the one chosen by the OS when `port` is 0)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, ctype, body = await self._answer(head[:MAX_REQUEST_BYTES])
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        writer.write(f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return _json(400, {"error": "bad request"})
        method, target = parts[0].decode("latin-1"), parts[1].decode("latin-1").split("?", 1)[0]
        if target not in ("/metrics", "/healthz", "/readyz"):
            return _json(404, {"error": "not found"})
        if method != "GET":
            return _json(405, {"error": "method not allowed"})
        if target == "/healthz":
            return _json(200, {"status": "ok"})
        if target == "/readyz":
            results = await run_checks(self.checks)
            ok = all_ok(results)
            return _json(200 if ok else 503, {"status": "ok" if ok else "unavailable", "checks": results})
        for refresh in self.refreshers:
            await refresh()
        if self.gauges is None:
            return 200, CONTENT_TYPE_LATEST, render()
        await self.gauges.refresh()
        return 200, CONTENT_TYPE_LATEST, render(self.gauges.registry)


class ProjectorLagEvents:
    """Sets msgcore_projector_lag_events on scrape: events in the log whose `_id` (the writer's clock at
    insert) is from a later second than the `at` of the newest event the projector has seen
    (`watched_projector()` stats: `at` is taken on the same clock a moment earlier). One bounded
    count on the `_id` index per `ttl_s`, never on the projector's path. An estimate: ids have a
    one-second grain, so events of the newest applied second that are still to come are not counted
    (a caught-up, idle projector shows 0). 0 while no projector is active or nothing was applied
    since it started; NaN when the store does not answer (a stale count would look healthy)."""

    def __init__(self, feed: ChangeFeed, *, ttl_s: float = 5.0, limit: int = LAG_COUNT_LIMIT) -> None:
        self.feed, self.ttl_s, self.limit = feed, ttl_s, limit
        self._read_at = float("-inf")

    async def refresh(self) -> None:
        if time.monotonic() - self._read_at < self.ttl_s:
            return
        self._read_at = time.monotonic()
        stats = metrics.watched_projector()
        if stats is None or not stats.active or stats.last_event_at is None:
            metrics.PROJECTOR_LAG_EVENTS.set(0)
            return
        try:
            since = stats.last_event_at + timedelta(seconds=1)
            behind = await asyncio.wait_for(self.feed.count_since(since, self.limit), LAG_READ_TIMEOUT_S)
        except (TimeoutError, StoreUnavailable) as e:
            log.warning("projector: lag in events not read: %r", e)
            metrics.PROJECTOR_LAG_EVENTS.set(math.nan)
            return
        metrics.PROJECTOR_LAG_EVENTS.set(behind)


def _json(status: int, doc: dict[str, object]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(doc).encode()


async def start_for(settings: Settings, component: str, checks: dict[str, Check],
                    gauges: StoreGauges | None = None,
                    refreshers: list[Callable[[], Awaitable[None]]] | None = None) -> MetricsServer | None:
    """Start the component's server if it has a port (None otherwise). A port already taken (a
    second copy on the same host) is logged and skipped: metrics never stop a worker."""
    port = metrics_port_for(settings, component)
    if not port:
        return None
    server = MetricsServer(settings.metrics_host, port, checks, gauges, refreshers or [])
    try:
        await server.start()
    except OSError as e:
        log.warning("%s: metrics server not started on %s:%d: %s", component, settings.metrics_host, port, e)
        return None
    log.info("%s: metrics on http://%s:%d/metrics (probes /healthz, /readyz)", component, settings.metrics_host,
             server.port)
    return server


@asynccontextmanager
async def metrics_endpoint(settings: Settings, component: str, db: Database, *, pg: bool = False,
                           store_gauges: bool = False) -> AsyncIterator[MetricsServer | None]:
    """The component's metrics server for the duration of the block (None when it has no port):
    readiness checks MongoDB (and PostgreSQL with `pg`; the connector's SMPP binds); `store_gauges`
    adds the backlog and route status (one process kind exposing them is enough: the scheduler does);
    the projector's /metrics also counts its lag in events (ProjectorLagEvents)."""
    checks: dict[str, Check] = {"mongo": mongo_check(db)}
    if pg and settings.pg_url:
        checks["postgres"] = pg_check(settings.pg_url)
    if component == "connector":
        checks["smpp"] = smpp_check()
    gauges = StoreGauges(db, utcnow, lane_detail=settings.metrics_lane_detail) if store_gauges else None
    refreshers: list[Callable[[], Awaitable[None]]] = []
    if component == "projector":
        refreshers.append(ProjectorLagEvents(ChangeFeed(db["events"])).refresh)
    server = await start_for(settings, component, checks, gauges, refreshers)
    try:
        yield server
    finally:
        if server is not None:
            await server.stop()
