"""What the benchmarks share: the store servers a run starts (unless MSGCORE_MONGO_URL /
MSGCORE_PG_URL name others), percentiles and CPU time of a process tree."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ops.embedded import EmbeddedMongo, EmbeddedPostgres


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def line(label: str, text: str) -> None:
    """One figure: its label in a column of 30, then its text."""
    print(f"  {label:30} {text}", flush=True)


def note(text: str) -> None:
    """Progress while the run goes on (the figures come at the end of each phase)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (the PostgreSQL server is a family of processes)."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total
    except psutil.NoSuchProcess:
        return 0.0


def postgres_pid(pg: EmbeddedPostgres) -> int | None:
    """The postmaster's pid, from its pid file; None if it cannot be read."""
    try:
        return int((pg.pgdata / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class StoreServers:
    mongo_url: str
    pg_url: str
    # pids of the servers this run started ("mongo-server", "pg-server"), for CPU and memory figures
    pids: dict[str, int] = field(default_factory=dict)


@contextmanager
def store_servers(work: Path) -> Iterator[StoreServers]:
    """The MongoDB-wire and PostgreSQL servers for a run: those the environment names, else embedded
    ones started under `work` and stopped at the end (also on Ctrl-C or SIGTERM)."""
    servers = StoreServers(os.environ.get("MSGCORE_MONGO_URL", ""), os.environ.get("MSGCORE_PG_URL", ""))
    started: list[EmbeddedMongo | EmbeddedPostgres] = []
    try:
        if not servers.mongo_url:
            mongo = EmbeddedMongo(work)
            mongo.start()
            started.append(mongo)
            servers.mongo_url = mongo.url
            if mongo.proc is not None:
                servers.pids["mongo-server"] = mongo.proc.pid
        if not servers.pg_url:
            pg = EmbeddedPostgres(work)
            pg.start()
            started.append(pg)
            servers.pg_url = pg.url
            pid = postgres_pid(pg)
            if pid is not None:
                servers.pids["pg-server"] = pid
        yield servers
    finally:
        for s in reversed(started):
            s.stop()


Bench = Callable[[Any, str, str, Path, dict[str, int]], Awaitable[None]]


def run_with_store_servers(bench: Bench, args: Any, prefix: str = "msgcore-bench-") -> None:
    """Run `bench(args, mongo_url, pg_url, work_dir, server_pids)` against `store_servers` in a temp
    dir; SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, store_servers(Path(tmp)) as servers:
        asyncio.run(bench(args, servers.mongo_url, servers.pg_url, Path(tmp), servers.pids))
