"""The route manager: one Connector per enabled SMPP route, kept in step with the `routes` collection.

Every `interval_s` (about 2 s) it reads the routes and reconciles:
- a new (or newly enabled) SMPP route gets a connector, which binds;
- a removed or disabled route's connector is stopped gracefully (it stops reading, commits what is
  in flight, unbinds, marks the route DOWN and releases its owner key);
- a route whose definition changed (host, port, credentials, window, TPS, ...) gets its connector
  restarted with the new definition: the old one stops gracefully first, then the new one starts.

So routes change at run time through the admin API or the CLI without restarting anything. Messages
routed to a route whose connector is away wait in its send topics and are sent when a connector for
the route runs again. Managers in several processes may run the same route: one connector owns it
(`connector|send:<route>`), the others stand by (smsc/connector.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime

from core.aio import sleep_or_stop
from core.domain.message import PARTITION_SEPARATOR
from core.domain.routing import Route
from core.store.errors import StoreUnavailable
from core.store.eventstore import EventStore
from core.store.routes import RouteStore
from smsc.connector import Connector
from smsc.receipts import side

log = logging.getLogger(__name__)

RECONCILE_S = 2.0
# Fields only the router reads: a change to these alone is handed to the running connector without a
# restart (its binds stay up). Any other change (host, port, credentials, binds, window, TPS, TON/NPI,
# ...) restarts the connector.
ROUTING_ONLY = frozenset({"priority", "weight", "prefixes", "price_per_part", "currency", "group", "strategy"})


@dataclass
class _Running:
    route: Route
    connector: Connector
    stop: asyncio.Event
    task: asyncio.Task[None]


ConnectorFactory = Callable[[Route, int | None], Connector]


class RouteManager:
    """Runs the connectors of the enabled SMPP routes (only `route_ids`, when given)."""

    def __init__(self, store: EventStore, routes: RouteStore, clock: Callable[[], datetime], *,
                 owner_prefix: str, route_ids: Collection[str] = (), partitions: Collection[int] = (),
                 interval_s: float = RECONCILE_S,
                 lease_s: float = 30.0, batch_size: int = 500, max_attempts: int = 5,
                 grace_s: float = 10.0, factory: ConnectorFactory | None = None) -> None:
        self.store = store
        self.routes = routes
        self.clock = clock
        self.owner_prefix = owner_prefix
        self.route_ids = frozenset(route_ids)
        self.partitions = frozenset(partitions)  # of a partitioned route, the ones run here (empty: all)
        self.interval_s = interval_s
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.max_attempts = max_attempts
        self.grace_s = grace_s
        self.factory = factory or self._connector
        self.running: dict[str, _Running] = {}
        self.stopping: dict[str, asyncio.Task[None]] = {}  # connectors told to stop, not yet stopped
        self.starts = 0  # connectors started since the manager started (restarts included)

    def _connector(self, route: Route, partition: int | None) -> Connector:
        key = route.id if partition is None else f"{route.id}{PARTITION_SEPARATOR}{partition}"
        return Connector(self.store, self.routes, route, self.clock, owner=f"{self.owner_prefix}/{key}",
                         lease_s=self.lease_s, batch_size=self.batch_size, max_attempts=self.max_attempts,
                         partition=partition)

    def wanted(self, routes: list[Route]) -> dict[str, Route]:
        """The connectors this manager should run, by key: the route id, or `<route id>#<partition>`
        for each partition of a partitioned route (those in `partitions` when given). Every process
        may run every partition: one owns each, the others stand by (smsc/connector.py)."""
        out: dict[str, Route] = {}
        for r in routes:
            if not (r.enabled and r.kind == "smpp" and (not self.route_ids or r.id in self.route_ids)):
                continue
            if r.partitions <= 1:
                out[r.id] = r
                continue
            for p in range(r.partitions):
                if not self.partitions or p in self.partitions:
                    out[f"{r.id}{PARTITION_SEPARATOR}{p}"] = r
        return out

    async def run(self, stop: asyncio.Event) -> None:
        """Reconcile every `interval_s` until `stop` is set, then stop every connector gracefully."""
        log.info("route manager started%s", f" for routes {sorted(self.route_ids)}" if self.route_ids else "")
        try:
            while not stop.is_set():
                try:
                    await self.reconcile()
                except StoreUnavailable as e:
                    log.warning("route manager: could not read routes (store unavailable), keeping %s: %s",
                                sorted(self.running), e)
                await sleep_or_stop(stop, self.interval_s)
        finally:
            for rid in list(self.running):
                self._stop(rid, "manager stopping")
            await asyncio.gather(*self.stopping.values(), return_exceptions=True)
            log.info("route manager stopped; %d connector starts", self.starts)

    async def reconcile(self) -> None:
        """One pass: start, stop or restart connectors so they match the enabled routes. Stopping runs
        in the background (a connector may wait up to grace_s for in-flight submits), so one slow stop
        does not hold up the other routes; a restarted route's new connector starts only once its old
        one has stopped."""
        wanted = self.wanted(await side(self.routes.list(include_disabled=True)))
        self.stopping = {rid: t for rid, t in self.stopping.items() if not t.done()}
        for rid, running in list(self.running.items()):
            if running.task.done():
                # A connector that ended on its own (a bug, or an error it could not handle): log why and
                # let this pass start it again if its route is still wanted.
                exc = None if running.task.cancelled() else running.task.exception()
                log.error("route manager: connector route=%s ended unexpectedly: %r; restarting", rid, exc)
                self.running.pop(rid)
        for rid, running in list(self.running.items()):
            route = wanted.get(rid)
            if route is None:
                self._stop(rid, "route removed or disabled")
            elif route != running.route:
                changed = _changed(running.route, route)
                if set(changed) <= ROUTING_ONLY:
                    log.info("route manager: route=%s changed (%s); connector keeps its binds", rid, ", ".join(changed))
                    running.route = route
                    running.connector.route = route
                else:
                    self._stop(rid, f"route changed ({', '.join(changed)}); restarting")
        for key, route in wanted.items():
            if key not in self.running and key not in self.stopping:
                self._start(key, route)

    def _start(self, key: str, route: Route) -> None:
        stop = asyncio.Event()
        _, _, part = key.partition(PARTITION_SEPARATOR)
        connector = self.factory(route, int(part) if part else None)
        task = asyncio.create_task(connector.run(stop, grace_s=self.grace_s), name=f"connector-{key}")
        self.running[key] = _Running(route, connector, stop, task)
        self.starts += 1
        log.info("route manager: started connector route=%s (%s:%d, %d binds, window %d, tps %s)", route.id,
                 route.host, route.port, route.binds, route.window, route.tps or "unlimited")

    def _stop(self, route_id: str, why: str) -> None:
        running = self.running.pop(route_id)
        log.info("route manager: stopping connector route=%s: %s", route_id, why)
        running.stop.set()
        self.stopping[route_id] = asyncio.create_task(self._await_stopped(route_id, running.task),
                                                      name=f"stopping-connector-{route_id}")

    async def _await_stopped(self, route_id: str, task: asyncio.Task[None]) -> None:
        try:
            # The connector waits up to grace_s for in-flight submits; give it a little more to unbind.
            await asyncio.wait_for(asyncio.shield(task), timeout=self.grace_s + 5.0)
            log.info("route manager: connector route=%s stopped", route_id)
        except TimeoutError:
            log.error("route manager: connector route=%s did not stop in time; cancelling it", route_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception as e:  # the connector failed while stopping: it is gone either way
            log.error("route manager: connector route=%s failed while stopping: %r", route_id, e)


def _changed(old: Route, new: Route) -> list[str]:
    a, b = old.model_dump(), new.model_dump()
    return [k for k in b if a.get(k) != b[k]]
