"""The binds of one route: `route.binds` transceivers, or (bind_type `transmitter_receiver`) that
many transmitter and receiver pairs. Submits go over the transmitters, deliver_sm come over the
receivers. Each bind is kept up by its own task, reconnecting with exponential back-off and jitter;
a bind that drops soon after it came up (a flapping link, an SMSC sending garbage) keeps the back-off
growing.

The pool is opened only while its connector owns the route (smsc/connector.py) and closed (unbind)
when it stops owning: a standby connector holds no bind.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from core import metrics
from core.aio import sleep_or_stop
from core.domain.retry import backoff_s
from core.domain.routing import BindType, Route, RouteStatus
from smsc.connector_metrics import bind_state, binds_closed
from smsc.session import DeliverSm, SessionError, SmppSession

log = logging.getLogger(__name__)

BIND_STABLE_S = 2.0  # a bind lost after living this long reconnects at once (after a little jitter)
RELINK_CAP_S = 5.0  # cap of the back-off between a lost bind and its next try while it keeps flapping
LINK_POLL_S = 0.2

OnDeliver = Callable[[DeliverSm, SmppSession], None]


class BindPool:
    """Keeps a route's binds up between `open()` and `close()`; counts reconnects and malformed PDUs."""

    def __init__(self, route: Route, on_deliver: OnDeliver, on_up: Callable[[], None]) -> None:
        self.route = route
        self.on_deliver = on_deliver
        self.on_up = on_up
        self.sessions: list[SmppSession] = []
        self.reconnects = 0
        self._malformed_closed = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def plan(self) -> list[tuple[int, str]]:
        kinds = (["transmitter", "receiver"] if self.route.bind_type == BindType.TRANSMITTER_RECEIVER
                 else ["transceiver"])
        return [(i, kind) for i in range(self.route.binds) for kind in kinds]

    @property
    def is_open(self) -> bool:
        return bool(self._tasks)

    def open(self) -> None:
        """Start keeping every bind of the plan up (idempotent)."""
        if self._tasks:
            return
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._keep_bound(i, kind, self._stop),
                                           name=f"bind-{self.route.id}-{i}-{kind}") for i, kind in self.plan()]

    async def close(self) -> None:
        """Unbind every session and stop reconnecting. Unacknowledged deliver_sm come again on a
        later bind (the SMSC resends them)."""
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sessions, self.sessions = self.sessions, []
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
        self._malformed_closed += sum(s.malformed for s in sessions)
        binds_closed(self.route.id, id(self))

    @property
    def malformed(self) -> int:
        """Malformed PDUs received over every bind this pool had."""
        return self._malformed_closed + sum(s.malformed for s in self.sessions)

    # ---- what the sender sees ---------------------------------------------------------------------

    def transmitters(self) -> list[SmppSession]:
        return [s for s in self.sessions if s.is_up and s.can_submit]

    def in_flight(self) -> float:
        """submit_sm awaiting their response over every bind (read on scrape)."""
        return float(sum(s.in_flight for s in self.sessions))

    @property
    def capacity(self) -> int:
        """Submits that may be outstanding at once over the binds that are up."""
        return sum(s.window for s in self.transmitters())

    def pick(self) -> SmppSession:
        """The least loaded transmitting bind; LookupError when none is up (nothing is sent then)."""
        up = self.transmitters()
        if not up:
            raise LookupError(f"route {self.route.id}: no transmitting bind is up")
        return min(up, key=lambda s: s.in_flight / s.window)

    def status(self) -> tuple[RouteStatus, str]:
        """DOWN without a transmitting bind, BUSY when every window is full, else UP (and a detail)."""
        up = self.transmitters()
        receivers = sum(1 for s in self.sessions if s.is_up and s.can_receive)
        status = RouteStatus.DOWN if not up else (
            RouteStatus.BUSY if all(s.in_flight >= s.window for s in up) else RouteStatus.UP)
        return status, f"{len(up)} transmitting, {receivers} receiving binds up"

    # ---- keeping binds up -----------------------------------------------------------------------

    def _session(self, kind: str) -> SmppSession:
        holder: list[SmppSession] = []

        def deliver(pdu: DeliverSm) -> None:
            # Receipts are acknowledged on the bind they came in on: hand the session along.
            self.on_deliver(pdu, holder[0])

        r = self.route
        session = SmppSession(r.host, r.port, system_id=r.system_id, password=r.password, system_type=r.system_type,
                              window=r.window, bind=kind, on_deliver=deliver)
        holder.append(session)
        return session

    async def _keep_bound(self, index: int, kind: str, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        rid = self.route.id
        bind = (id(self), index, kind)
        while not stop.is_set():
            session = self._session(kind)
            bind_state(rid, bind, "binding")
            try:
                await session.open()
            except (SessionError, OSError) as e:
                bind_state(rid, bind, "down")
                attempt += 1
                delay = backoff_s(attempt, base_s=0.5, cap_s=30.0)
                log.warning("connector route=%s bind=%d/%s failed (%s); retry in %.1fs", rid, index, kind, e, delay)
                await sleep_or_stop(stop, delay)
                continue
            up_at = loop.time()
            self.sessions.append(session)
            bind_state(rid, bind, "bound")
            log.info("connector route=%s bind=%d/%s up %s:%d", rid, index, kind, self.route.host, self.route.port)
            self.on_up()
            while session.is_up and not stop.is_set():
                await asyncio.sleep(LINK_POLL_S)
            if stop.is_set():
                return  # close() unbinds the sessions still listed
            await session.close()
            if session in self.sessions:
                self.sessions.remove(session)
            self._malformed_closed += session.malformed
            bind_state(rid, bind, "down")
            attempt = 0 if loop.time() - up_at > BIND_STABLE_S else attempt + 1
            delay = backoff_s(attempt, base_s=0.2, cap_s=RELINK_CAP_S) if attempt else random.uniform(0.0, 0.2)
            self.reconnects += 1
            metrics.SMPP_RECONNECTS.labels(route=rid).inc()
            log.warning("connector route=%s bind=%d/%s lost its connection%s; reconnect in %.1fs", rid, index, kind,
                        " (malformed PDU)" if session.malformed else "", delay)
            await sleep_or_stop(stop, delay)
