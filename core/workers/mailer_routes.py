"""`msgcore mailer`: one Mailer per enabled e-mail route, kept in step with the `routes` collection.

Every `interval_s` it reads the routes: a new e-mail route gets a mailer, a disabled or removed one
has its mailer stopped (it releases the owner key), a changed one is restarted with the new
definition (its breaker starts closed). Routes change at run time, without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from core.aio import sleep_or_stop
from core.domain.email import EMAIL
from core.domain.routing import Route
from core.store.database import UNTRANSLATED_UNAVAILABLE
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from core.workers.mailer import Mailer

log = logging.getLogger(__name__)

UNAVAILABLE: tuple[type[Exception], ...] = (StoreUnavailable, *UNTRANSLATED_UNAVAILABLE)


@dataclass
class _Running:
    route: Route
    mailer: Mailer
    stop: asyncio.Event
    task: asyncio.Task[None]


class MailerSet:
    def __init__(self, store: EventStore, routes: RouteStore, clock: Callable[[], datetime], *, owner_prefix: str,
                 route_ids: Sequence[str] = (), lease_s: float = 30.0, batch_size: int = 100,
                 interval_s: float = 2.0) -> None:
        self.store = store
        self.routes = routes
        self.clock = clock
        self.owner_prefix = owner_prefix
        self.route_ids = set(route_ids)
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.running: dict[str, _Running] = {}

    def wanted(self, routes: Sequence[Route]) -> dict[str, Route]:
        return {r.id: r for r in routes
                if r.enabled and r.channel == EMAIL and (not self.route_ids or r.id in self.route_ids)}

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.reconcile()
                except UNAVAILABLE as e:
                    log.warning("mailer: could not read routes (store unavailable), keeping %s: %s",
                                sorted(self.running), e)
                await sleep_or_stop(stop, self.interval_s)
        finally:
            await asyncio.gather(*(self._stop(rid) for rid in list(self.running)))

    async def reconcile(self) -> None:
        wanted = self.wanted(await self.routes.list(include_disabled=False))
        for rid in [r for r, run in self.running.items() if wanted.get(r) != run.route]:
            await self._stop(rid)
        for rid, route in wanted.items():
            if rid not in self.running:
                mailer = Mailer(self.store, self.routes, route, self.clock, owner=f"{self.owner_prefix}/{rid}",
                                lease_s=self.lease_s, batch_size=self.batch_size)
                stop = asyncio.Event()
                task = asyncio.create_task(mailer.run(stop), name=f"mailer-{rid}")
                self.running[rid] = _Running(route, mailer, stop, task)
                log.info("mailer: started route=%s (%s)", rid, route.kind)

    async def _stop(self, rid: str) -> None:
        run = self.running.pop(rid)
        run.stop.set()
        await asyncio.gather(run.task, return_exceptions=True)
        log.info("mailer: stopped route=%s", rid)
