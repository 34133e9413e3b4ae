"""The soak's faults (ops/soak.py), one every `--fault-every` samples, kinds in rotation:

- kill: SIGKILL of a worker (router, connector, scheduler, projector in turn), started again at once;
- smsc-drop: the SMSC simulator closes every bind and refuses to keep new ones for DROP_HOLD_S (its
  `drop_after_pdus` fault, switched through its control API: each connection is closed right after
  its next PDU, the response lost), then lets them be; the connector must bind again;
- store-restart: the embedded MongoDB-wire server stopped (SIGTERM) and started again on the same port
  and data directory; every component must reconnect, the api's /readyz must say so. Only when the
  soak started that server itself: an external MongoDB (MSGCORE_MONGO_URL) is not ours to restart,
  so the fault is skipped and says why.

The stores for a run come from `soak_servers`: those the environment names, else embedded ones, with
a handle on the MongoDB server kept for its restart.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.store.database import ping
from core.store.errors import StoreUnavailable
from ops.embedded import EmbeddedMongo, EmbeddedPostgres, free_port
from ops.soak_report import FaultResult, Run
from ops.stack import WORKERS, Stack

FAULT_KINDS = ("kill", "smsc-drop", "store-restart")
DROP_HOLD_S = 2.0  # binds made during this are dropped too: the connector goes through its back-off
DROP_WAIT_S = 45.0  # an idle bind is only dropped at its next PDU (enquire_link every 30 s at most)
RECOVER_TIMEOUT_S = 60.0
STORE_DOWN_S = 1.0


@dataclass
class SoakServers:
    mongo_url: str
    pg_url: str
    mongo: EmbeddedMongo | None = None  # set when the soak started the MongoDB server (restartable)


@contextmanager
def soak_servers(work: Path) -> Iterator[SoakServers]:
    """The servers the environment names (MSGCORE_MONGO_URL, MSGCORE_PG_URL), else embedded ones under
    `work`, stopped at the end (also on Ctrl-C or SIGTERM)."""
    servers = SoakServers(os.environ.get("MSGCORE_MONGO_URL", ""), os.environ.get("MSGCORE_PG_URL", ""))
    pg: EmbeddedPostgres | None = None
    try:
        if not servers.mongo_url:
            servers.mongo = EmbeddedMongo(work / "servers")
            servers.mongo.start()
            servers.mongo_url = servers.mongo.url
        if not servers.pg_url:
            pg = EmbeddedPostgres(work / "servers")
            pg.start()
            servers.pg_url = pg.url
        yield servers
    finally:
        if pg is not None:
            pg.stop()
        if servers.mongo is not None:
            servers.mongo.stop()


@dataclass
class SoakStack(Stack):
    """The stack with the simulator's control API on a port of its own (for the smsc-drop fault)."""

    sim_control_port: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sim_control_port = self.sim_control_port or free_port()

    def args_for(self, component: str) -> list[str]:
        args = super().args_for(component)
        return [*args, "--control-port", str(self.sim_control_port)] if component == "smsc-sim" else args


@dataclass
class Faults:
    """Injects the next fault of the rotation after every `every`-th sample (never after the last)."""

    stack: SoakStack
    db: Any  # the soak's own database handle, to see the store back after a restart
    kinds: tuple[str, ...]
    every: int
    mongo: EmbeddedMongo | None
    done: dict[str, int] = field(default_factory=dict)  # kind -> how many so far

    async def after_sample(self, run: Run, index: int, last: int) -> None:
        """Called after sample `index` (0-based) of `last + 1`."""
        if not self.every or (index + 1) % self.every or index >= last:
            return
        kind = self.kinds[((index + 1) // self.every - 1) % len(self.kinds)]
        n = self.done.get(kind, 0)
        self.done[kind] = n + 1
        started = time.monotonic()
        if kind == "kill":
            result = await self.kill(run, index, WORKERS[n % len(WORKERS)])
        elif kind == "smsc-drop":
            result = await self.smsc_drop(index)
        else:
            result = await self.store_restart(index)
        result.seconds = round(time.monotonic() - started, 1) if result.target != "skipped" else 0.0
        run.faults.append(result)
        print(f"  fault: {kind} {result.target}: {'ok' if result.ok else 'FAILED'}, {result.detail} "
              f"({result.seconds:.1f}s)", flush=True)

    async def kill(self, run: Run, index: int, name: str) -> FaultResult:
        self.stack.kill(name)
        self.stack.start(name)
        run.restarts.setdefault(name, []).append(index + 1)
        return FaultResult(index + 1, "kill", name, True, "kill -9, started again", 0.0)

    async def smsc_drop(self, index: int) -> FaultResult:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.stack.sim_control_port}", timeout=5) as sim:

            async def binds() -> int:
                return int((await sim.get("/stats")).json()["binds_active"])

            async def none_left() -> bool:
                return await binds() == 0

            async def bound_again() -> bool:
                return await binds() >= max(1, before)

            before = await binds()
            await sim.patch("/faults", json={"drop_after_pdus": 1})
            try:
                all_dropped = await _until(none_left, DROP_WAIT_S)
                await asyncio.sleep(DROP_HOLD_S)
            finally:
                await sim.patch("/faults", json={"drop_after_pdus": None})
            let_at = time.monotonic()
            rebound = await _until(bound_again, RECOVER_TIMEOUT_S)
            took = time.monotonic() - let_at
        if not all_dropped:
            return FaultResult(index + 1, "smsc-drop", "smsc-sim", False,
                               f"{await binds()} of {before} binds still up after {DROP_WAIT_S:.0f}s", 0.0)
        if not rebound:
            return FaultResult(index + 1, "smsc-drop", "smsc-sim", False,
                               f"the connector did not bind again within {RECOVER_TIMEOUT_S:.0f}s", 0.0)
        return FaultResult(index + 1, "smsc-drop", "smsc-sim", True,
                           f"{before} bind(s) dropped, bound again {took:.1f}s after the SMSC let them", 0.0)

    async def store_restart(self, index: int) -> FaultResult:
        if self.mongo is None:
            return FaultResult(index + 1, "store-restart", "skipped", True,
                               "MongoDB is external (MSGCORE_MONGO_URL): the soak restarts only a server it "
                               "started", 0.0)
        mongo = self.mongo
        await asyncio.to_thread(mongo.stop)
        await asyncio.sleep(STORE_DOWN_S)
        await asyncio.to_thread(mongo.start)  # the same port and data directory
        back = await _until(self._store_answers, RECOVER_TIMEOUT_S)
        ready = back and await _until(self._api_ready, RECOVER_TIMEOUT_S)
        if not ready:
            what = "MongoDB" if not back else "the api's /readyz"
            return FaultResult(index + 1, "store-restart", "mongo", False,
                               f"{what} not back within {RECOVER_TIMEOUT_S:.0f}s", 0.0)
        return FaultResult(index + 1, "store-restart", "mongo", True,
                           f"stopped and started on port {mongo.port}; api ready again", 0.0)

    async def _store_answers(self) -> bool:
        try:
            await ping(self.db, 2.0)
        except StoreUnavailable:
            return False
        return True

    async def _api_ready(self) -> bool:
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                return (await client.get(f"{self.stack.api_url}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False


async def _until(predicate: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll `predicate()` until it is true (True) or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(interval_s)
    return False
