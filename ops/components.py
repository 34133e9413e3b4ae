"""Composition roots: one async `main` per component process, wiring stores, clock and workers.

Each runs until SIGTERM/SIGINT, then stops claiming, finishes or releases what is in flight, and
exits. None needs another component to be up: the log in MongoDB decouples them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from core import metrics
from core.config import Settings
from core.domain.events import utcnow
from core.metrics_server import metrics_endpoint
from core.store.campaigns import CampaignStore
from core.store.database import Database
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.lanes import LaneBook
from core.store.mongo import connect
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from core.store.timers import Timers
from core.workers.campaigns import CampaignSweeper
from core.workers.expiry import Expirer
from core.workers.loop import run_until_stopped
from core.workers.timers import TimerReleaser
from ops.embedded import read_endpoints

log = logging.getLogger(__name__)


class ConfigError(RuntimeError):
    """Settings that cannot work; the message names the variable to set."""


def resolve_urls(settings: Settings) -> Settings:
    """Fill empty store URLs from the endpoints a running `msgcore up` recorded in the data dir."""
    endpoints = read_endpoints(settings.data_dir)
    mongo = settings.mongo_url or endpoints.get("mongo", "")
    pg = settings.pg_url or endpoints.get("pg", "")
    if not mongo:
        raise ConfigError("no MongoDB: set MSGCORE_MONGO_URL, or start the embedded default with `msgcore up`")
    return settings.model_copy(update={"mongo_url": mongo, "pg_url": pg,
                                       "admin_key": settings.admin_key or endpoints.get("admin_key", "")})


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


@asynccontextmanager
async def database(settings: Settings, component: str):  # type: ignore[no-untyped-def]
    client = connect(settings.mongo_url, component)
    try:
        yield client[settings.mongo_db]
    finally:
        await client.close()


async def prepare(db: Database) -> None:
    """Indexes every component relies on; idempotent."""
    await EventStore(db).ensure_indexes()
    await TenantStore(db).ensure_indexes()
    await CampaignStore(db).ensure_indexes()


def worker_id(component: str) -> str:
    return f"{component}@{socket.gethostname()}:{os.getpid()}"


async def _run_stage(settings: Settings, component: str,
                     build: Callable[[Database], Any]) -> None:
    stop = stop_on_signals()
    async with database(settings, component) as db:
        await prepare(db)
        stage = build(db)
        log.info("%s started (%s)", component, worker_id(component))
        await run_until_stopped(component, stage.step, stop, settings.poll_interval_s)
        log.info("%s stopped", component)


ROUTER_MAX_IDLE_S = {"shared": 0.2, "bulk": 0.5}


async def router_main(settings: Settings) -> None:
    """Two routing loops in one process: the shared (transactional) lane, and the campaign and
    marketing lanes, so that a one-time password is routed while a bulk batch commits."""
    from core.store.lanes import BULK, SHARED
    from core.workers.router import Router

    stop = stop_on_signals()
    async with database(settings, "router") as db, metrics_endpoint(settings, "router", db):
        await prepare(db)
        routers = [Router(EventStore(db), RouteStore(db), utcnow, batch_size=settings.batch_size,
                          max_attempts=settings.max_attempts, scope=scope) for scope in (SHARED, BULK)]
        log.info("router started (%s)", worker_id("router"))
        # Idle polls back off: one-time passwords whose route is UP do not pass through the router
        # (routed at acceptance), so its shared lane waits for the exceptions (route BUSY or DOWN,
        # retries, released timers) and its bulk lanes for campaigns; both may answer a little later.
        await asyncio.gather(*(run_until_stopped(f"router[{r.scope}]", r.step, stop, settings.poll_interval_s,
                                                 max_idle_s=ROUTER_MAX_IDLE_S[r.scope])
                               for r in routers))
        log.info("router stopped")


async def scheduler_main(settings: Settings) -> None:
    """Timed jobs: expire sent messages whose receipt never came (the `expirer` consumer of the
    `await:<route>` topics, billing them in the same commit); release due timers (retry back-off,
    `send_at`, suspended tenants) into their topics; release scheduled campaigns at their send_at (a
    date job each, plus a sweep every second), and mark canceling and finished campaigns."""
    stop = stop_on_signals()
    async with (database(settings, "scheduler") as db,
                metrics_endpoint(settings, "scheduler", db, store_gauges=True)):
        await prepare(db)
        expirer = Expirer(EventStore(db), RouteStore(db), utcnow, batch_size=settings.batch_size,
                          default_validity_s=settings.default_validity_s)
        releaser = TimerReleaser(Timers(db), LaneBook(db), utcnow, batch_size=settings.batch_size)
        campaigns = CampaignSweeper(CampaignStore(db), utcnow)
        scheduler = AsyncIOScheduler(timezone="UTC")

        async def expire_due() -> None:
            try:
                while await expirer.step():
                    pass
            except StoreUnavailable as e:
                log.warning("scheduler: expiry stopped, store unavailable (next run in a second): %s", e)

        async def campaign_jobs() -> None:
            await campaigns.sweep()
            for doc in await campaigns.campaigns.scheduled():
                job_id = f"release:{doc['_id']}"
                if scheduler.get_job(job_id) is None and doc.get("send_at") is not None:
                    scheduler.add_job(campaigns.release, "date", run_date=doc["send_at"], id=job_id,
                                      misfire_grace_time=None)

        # Each job is one instance at a time and coalesced: a slow run is never stacked behind itself.
        scheduler.add_job(expire_due, "interval", seconds=1, max_instances=1, coalesce=True, id="expire")
        scheduler.add_job(releaser.run_due, "interval", seconds=0.5, max_instances=1, coalesce=True, id="timers")
        scheduler.add_job(campaign_jobs, "interval", seconds=1, max_instances=1, coalesce=True, id="campaigns")
        scheduler.start()
        log.info("scheduler started (%s)", worker_id("scheduler"))
        await stop.wait()
        scheduler.shutdown(wait=False)
        log.info("scheduler stopped; expired %d, timers released %d", expirer.expired, releaser.released)


async def connector_main(settings: Settings, route_ids: list[str], partitions: Sequence[int] = ()) -> None:
    """Run the connectors of the given routes (all enabled SMPP routes when none are named), kept in
    step with the `routes` collection by the route manager: routes added, enabled, disabled or changed
    at run time take effect within a few seconds, without a restart."""
    from smsc.route_manager import RouteManager

    stop = stop_on_signals()
    async with database(settings, "connector") as db, metrics_endpoint(settings, "connector", db):
        await prepare(db)
        routes = RouteStore(db)
        known = {r.id: r for r in await routes.list(include_disabled=True)}
        unknown = [rid for rid in route_ids if rid not in known]
        if unknown:
            # Named routes may be enabled later; a route that does not exist at all is most likely a typo.
            log.warning("connector: no route %s yet; its connector starts when it is added", ", ".join(unknown))
        manager = RouteManager(EventStore(db), routes, utcnow, owner_prefix=worker_id("connector"),
                               route_ids=route_ids, partitions=partitions, lease_s=settings.lease_s,
                               batch_size=settings.batch_size,
                               max_attempts=settings.max_attempts)
        active = sorted(manager.wanted(list(known.values())))
        log.info("connector started (%s) for routes %s%s", worker_id("connector"), active or "none yet",
                 f" (managing only {sorted(route_ids)})" if route_ids else "")
        await manager.run(stop)


async def projector_main(settings: Settings) -> None:
    from projections.projector import Projector
    from projections.schema import migrate

    if not settings.pg_url:
        raise ConfigError("no PostgreSQL: set MSGCORE_PG_URL, or start the embedded default with `msgcore up`")
    stop = stop_on_signals()
    async with database(settings, "projector") as db, metrics_endpoint(settings, "projector", db, pg=True):
        await migrate(settings.pg_url, settings.reporting_schema)
        projector = Projector(db["events"], settings.pg_url, settings.reporting_schema)
        metrics.watch_projector(projector.stats, utcnow)
        log.info("projector started (%s) schema=%s", worker_id("projector"), settings.reporting_schema)
        await projector.run(stop)


async def webhooks_main(settings: Settings) -> None:
    """Status webhooks: the fan-out (change stream -> one delivery job per endpoint per batch; one
    process at a time, others stand by) and the dispatcher (one owner per endpoint's topic)."""
    from core.store.change_feed import ChangeFeed
    from core.store.owners import Owners
    from core.store.webhook_queue import WebhookQueue
    from core.store.webhooks import WebhookStore
    from core.workers.webhooks import WebhookDispatcher
    from core.workers.webhooks_dispatch import DispatchSettings
    from core.workers.webhooks_fanout import FanOut
    from core.workers.webhooks_send import HookSender

    stop = stop_on_signals()
    async with database(settings, "webhooks") as db, metrics_endpoint(settings, "webhooks", db):
        await prepare(db)
        store, queue, owners = WebhookStore(db), WebhookQueue(db), Owners(db)
        await store.ensure_indexes()
        await queue.ensure_indexes()
        await owners.ensure_indexes()
        sender = HookSender(timeout_s=settings.webhooks_timeout_s, allow_loopback=settings.webhooks_allow_loopback)
        holder = worker_id("webhooks")
        fanout = FanOut(ChangeFeed(db["events"]), store, queue, owners, utcnow, holder, lease_s=settings.lease_s)
        dispatch = DispatchSettings(batch_jobs=settings.webhooks_batch_jobs,
                                    endpoint_concurrency=settings.webhooks_endpoint_concurrency,
                                    backoff_base_s=settings.webhooks_backoff_base_s,
                                    backoff_cap_s=settings.webhooks_backoff_cap_s,
                                    max_age_s=settings.webhooks_max_age_s)
        dispatcher = WebhookDispatcher(store, queue, owners, sender, utcnow, holder, dispatch,
                                       lease_s=settings.lease_s, concurrency=settings.webhooks_concurrency,
                                       jobs_retention_s=settings.webhooks_jobs_retention_s,
                                       deliveries_retention_s=settings.webhooks_deliveries_retention_s)
        log.info("webhooks started (%s), loopback targets %s", holder,
                 "allowed" if settings.webhooks_allow_loopback else "refused")
        try:
            await asyncio.gather(fanout.run(stop), dispatcher.run(stop))
        finally:
            await sender.close()
        log.info("webhooks stopped; fan-out %s, redelivered %d", fanout.stats, dispatcher.stats["redelivered"])


async def simulator_main(settings: Settings, port: int, receipt_delay_s: float, journal: str | None,
                         control_port: int | None = None, faults: dict[str, Any] | None = None) -> None:
    """Run the SMSC simulator until SIGTERM/SIGINT; `faults` are FaultSettings fields (validated here)."""
    from pydantic import ValidationError

    from smsc.sim.server import Simulator

    stop = stop_on_signals()
    try:
        sim = Simulator(port=port, receipt_delay_s=receipt_delay_s, journal_path=journal,
                        faults=faults or None, control_port=control_port)
    except ValidationError as e:
        raise ConfigError(f"invalid fault settings: {e}") from e
    await sim.start()
    log.info("smsc-sim listening on 127.0.0.1:%d (control API %s, faults %s)", sim.port,
             f"http://127.0.0.1:{sim.control_port}" if sim.control_port is not None else "off", sim.faults.active())
    await stop.wait()
    await sim.stop()
    stats = sim.stats()
    stats.pop("submit_per_second", None)
    log.info("smsc-sim stopped: %s", stats)


def run(main: Awaitable[None]) -> None:
    asyncio.run(main)  # type: ignore[arg-type]
