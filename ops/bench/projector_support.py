"""What the projector benchmark's steps share: timestamped notes, the figures table, peak RSS per
phase, and two reads of the reporting schema."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

import psutil
import psycopg
from psycopg import sql

MB = 2**20


def log(text: str) -> None:
    print(f"{datetime.now(UTC).strftime('%H:%M:%SZ')} {text}", flush=True)



@dataclass
class Figures:
    rows: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"  {name:44} {value}", flush=True)


def _tree_rss(pid: int) -> tuple[float, float] | None:
    """(sum of RSS over the process and its descendants, largest single RSS) in MB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    values = []
    for p in procs:
        try:
            values.append(p.memory_info().rss / MB)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return (sum(values), max(values)) if values else None


class RssSampler(threading.Thread):
    """Peak RSS per phase: this process, and the server process trees it knows the pids of."""

    def __init__(self, servers: dict[str, int], interval_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.servers, self.interval_s = servers, interval_s
        self.me = psutil.Process()
        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self.done = threading.Event()
        self._lock = threading.Lock()

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
        self.sample()

    def sample(self) -> None:
        values = {"bench": self.me.memory_info().rss / MB}
        for name, pid in self.servers.items():
            tree = _tree_rss(pid)
            if tree is not None:
                values[f"{name} (sum)"], values[f"{name} (max proc)"] = tree
        with self._lock:
            peak = self.peaks.setdefault(self.phase, {})
            for k, v in values.items():
                peak[k] = max(peak.get(k, 0.0), v)

    def run(self) -> None:
        while not self.done.wait(self.interval_s):
            self.sample()



async def checkpoint_applied(pg_url: str, schema: str) -> int | None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL("SELECT events_applied FROM {}.checkpoints WHERE projection = %s").format(
            sql.Identifier(schema)), ("reporting",))
        row = await cur.fetchone()
    return None if row is None else int(row[0])


async def pg_count(pg_url: str, schema: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(sql.Identifier(schema),
                                                                            sql.Identifier(table)))
        row = await cur.fetchone()
    return int(row[0]) if row else 0

