"""A set of msgcore component processes on loopback, for e2e tests, benchmarks and fault scenarios.

Unlike `msgcore up` it does not supervise: a scenario decides when a process dies (kill -9) and
when it comes back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from core.domain.events import utcnow
from core.domain.routing import Route
from core.metrics_server import PORT_OFFSETS
from core.store.mongo import connect
from core.store.routes import RouteStore
from core.store.tenants import TenantStore
from ops.components import prepare
from ops.embedded import die_with_parent, free_port

WORKERS = ("router", "connector", "scheduler", "projector")


@dataclass
class Stack:
    mongo_url: str
    pg_url: str
    mongo_db: str
    schema: str
    log_dir: Path
    admin_key: str = "test-admin-key"
    api_port: int = 0
    sim_port: int = 0
    receipt_delay_s: float = 0.2
    mail_port: int = 0  # mail-sim's SMTP port (0: a free one)
    mail_http_port: int = 0  # mail-sim's SendGrid v3 endpoint (0: a free one)
    metrics_port_base: int = 0  # the workers' /metrics on base + offset (core/metrics_server.py); 0: off
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.api_port = self.api_port or free_port()
        self.sim_port = self.sim_port or free_port()
        self.mail_port = self.mail_port or free_port()
        self.mail_http_port = self.mail_http_port or free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def metrics_url(self, component: str) -> str:
        """A component's /metrics (the api's on its own port; a worker's needs `metrics_port_base`)."""
        if component == "api":
            return f"{self.api_url}/metrics"
        return f"http://127.0.0.1:{self.metrics_port_base + PORT_OFFSETS[component]}/metrics"

    @property
    def journal(self) -> Path:
        return self.log_dir / "smsc-journal.jsonl"

    @property
    def mail_sink(self) -> Path:
        """Where mail-sim keeps every mail it took, one .eml file each."""
        return self.log_dir / "mail-sim"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "MSGCORE_MONGO_URL": self.mongo_url, "MSGCORE_PG_URL": self.pg_url,
            "MSGCORE_MONGO_DB": self.mongo_db, "MSGCORE_REPORTING_SCHEMA": self.schema,
            "MSGCORE_API_PORT": str(self.api_port), "MSGCORE_ADMIN_KEY": self.admin_key,
            "MSGCORE_DATA_DIR": str(self.log_dir / "data"),
            "MSGCORE_METRICS_PORT_BASE": str(self.metrics_port_base), **self.extra_env,
        }

    def args_for(self, component: str) -> list[str]:
        args = [sys.executable, "-m", "ops.cli", component]
        if component == "smsc-sim":
            args += ["--port", str(self.sim_port), "--receipt-delay", str(self.receipt_delay_s),
                     "--journal", str(self.journal)]
        if component == "mail-sim":
            args += ["--port", str(self.mail_port), "--http-port", str(self.mail_http_port),
                     "--sink", str(self.mail_sink)]
        return args

    def start(self, component: str, name: str | None = None) -> subprocess.Popen[bytes]:
        """Start one component; `name` tells copies of the same component apart (router-2)."""
        name = name or component
        with (self.log_dir / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(self.args_for(component), env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=die_with_parent)
        self.procs[name] = proc
        return proc

    def start_all(self, components: tuple[str, ...] = ("smsc-sim", "api", *WORKERS)) -> None:
        for c in components:
            self.start(c)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            if sig == signal.SIGKILL:
                proc.wait()

    def stop(self, name: str, timeout_s: float = 20.0) -> int | None:
        proc = self.procs.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> dict[str, int | None]:
        # The simulators stand in for the SMSC and the mail provider: they go last, so connectors can
        # unbind cleanly.
        order = sorted(self.procs, key=lambda n: n.startswith(("smsc-sim", "mail-sim")))
        return {n: self.stop(n) for n in order}

    def rss_mb(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                out[name] = psutil.Process(proc.pid).memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                continue
        return out

    def cpu_s(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            try:
                t = psutil.Process(proc.pid).cpu_times()
                out[name] = t.user + t.system
            except psutil.NoSuchProcess:
                continue
        return out

    def wait_http(self, timeout_s: float = 30.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"api did not answer on {self.api_url} within {timeout_s}s; see {self.log_dir}/api.log")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


async def seed(mongo_url: str, db_name: str, routes: list[Route], tenants: list[str]) -> dict[str, str]:
    """Prepare a fresh database: indexes, routes, tenants. Returns an API key per tenant."""
    client = connect(mongo_url, "seed")
    try:
        db = client[db_name]
        await prepare(db)
        now = utcnow()
        for r in routes:
            await RouteStore(db).upsert(r, actor="seed", now=now)
        return {t: await TenantStore(db).create(t, t.title(), now) for t in tenants}
    finally:
        await client.close()
