"""`msgcore up`: the embedded default on one machine, supervised.

Starts (unless MSGCORE_MONGO_URL / MSGCORE_PG_URL name real servers) SecantusDB and PostgreSQL under
the data directory, prepares both stores, makes sure a first route (to the simulator) and a demo
tenant exist, then runs every component as its own child process and restarts any that dies.
SIGINT/SIGTERM stops the components (each finishes its in-flight work), then the servers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.config import Settings
from core.domain.events import utcnow
from core.domain.routing import Route
from core.ids import new_token
from core.metrics_server import PORT_OFFSETS
from core.store.routes import RouteStore, load_routes_file
from core.store.tenants import TenantStore
from ops.components import database, prepare
from ops.embedded import EmbeddedMongo, EmbeddedPostgres, die_with_parent, free_port, write_endpoints
from ops.mail_sim.setup import MAIL_SIM_PORT, ensure_mail_route, mail_sim_events_args

log = logging.getLogger(__name__)

COMPONENTS = ("smsc-sim", "mail-sim", "api", "router", "connector", "mailer", "scheduler", "projector", "smpp-server",
              "webhooks")
SIMULATORS = ("smsc-sim", "mail-sim")  # stopped last: they stand in for the SMSC and the e-mail provider
DEMO_TENANT = "demo"
STOP_GRACE_S = 20.0
# The workers serving /metrics, /healthz, /readyz on MSGCORE_METRICS_PORT_BASE + their offset
# (core/metrics_server.py); the api serves them on its own port.
METRICS_COMPONENTS = ("router", "scheduler", "connector", "projector", "webhooks", "smpp-server", "mailer")
METRICS_BASE_DEFAULT = 9300
METRICS_BASE_TRIES = 50  # 9300, 9310, ...: the first base whose worker ports are all free


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def metrics_base(settings: Settings) -> int:
    """The metrics base port of the components: MSGCORE_METRICS_PORT_BASE if set, else the first of
    9300, 9310, ... whose worker ports are free (0: none found, the workers serve no metrics)."""
    if settings.metrics_port_base:
        return settings.metrics_port_base
    for base in range(METRICS_BASE_DEFAULT, METRICS_BASE_DEFAULT + 10 * METRICS_BASE_TRIES, 10):
        if all(_port_free(base + PORT_OFFSETS[c]) for c in METRICS_COMPONENTS):
            return base
    return 0


def metrics_lines(api_url: str, base: int) -> list[str]:
    """One `metrics: <component> <url>` line per component that serves /metrics."""
    lines = [f"metrics: api {api_url}/metrics"]
    if base:
        lines += [f"metrics: {c} http://127.0.0.1:{base + PORT_OFFSETS[c]}/metrics" for c in METRICS_COMPONENTS]
    return lines


def _secret_file(path: Path, make: str) -> str:
    if path.exists():
        return path.read_text().strip()
    path.write_text(make)
    path.chmod(0o600)
    return make


@dataclass
class Child:
    name: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


async def _bootstrap(settings: Settings, sim_port: int, mail_port: int = 0) -> str:
    """Indexes, reporting schema, first route and demo tenant. Returns the demo tenant's API key."""
    async with database(settings, "up") as db:
        await prepare(db)
        now = utcnow()
        routes = RouteStore(db)
        if settings.routes_file:
            for route in load_routes_file(settings.routes_file):
                await routes.upsert(route, actor="msgcore up (routes file)", now=now)
        existing = {r.id: r for r in await routes.list()}
        sim = existing.get("sim")
        if not existing or (sim and sim.host == "127.0.0.1" and sim.port != sim_port):
            base = sim or Route(id="sim", price_per_part=5, window=50)
            await routes.upsert(base.model_copy(update={"port": sim_port}), actor="msgcore up", now=now)
        if mail_port:
            await ensure_mail_route(routes, mail_port, now, settings.data_dir)
        tenants = TenantStore(db)
        key_file = settings.data_dir / "demo-tenant.key"
        if key_file.exists() and await tenants.get(DEMO_TENANT):
            key = key_file.read_text().strip()
        else:
            key = (await tenants.add_key(DEMO_TENANT, now) if await tenants.get(DEMO_TENANT)
                   else await tenants.create(DEMO_TENANT, "Demo tenant", now)) or ""
            key_file.write_text(key)
            key_file.chmod(0o600)
    if settings.pg_url:
        from projections.schema import migrate

        await migrate(settings.pg_url, settings.reporting_schema)
    return key


def _smpp_server(settings: Settings) -> tuple[int, list[str]]:
    """The SMPP server's port (MSGCORE_SMPP_PORT, else 2776 when free, else any free port) and the
    banner's lines: its address and the demo tenant's login."""
    wanted = int(os.environ.get("MSGCORE_SMPP_PORT", "2776"))
    port = wanted if _port_free(wanted) else free_port()
    return port, [f"SMPP server: 127.0.0.1:{port}", asyncio.run(_demo_smpp_login(settings))]


async def _demo_smpp_login(settings: Settings) -> str:
    """`SMPP login: <system_id> <password>` of the demo tenant's SMPP account (created on the first
    `up`; its password kept in the data dir)."""
    from core.store.smpp_accounts import SmppAccountStore, new_password

    async with database(settings, "up") as db:
        accounts = SmppAccountStore(db)
        password_file = settings.data_dir / "demo-smpp.password"
        known = password_file.exists()
        password = _secret_file(password_file, new_password())
        if await accounts.get(DEMO_TENANT) is None:
            await accounts.create(DEMO_TENANT, DEMO_TENANT, utcnow(), password=password)
        elif not known:  # the account outlived its password file (a kept database): issue a new one
            password = (await accounts.rotate_password(DEMO_TENANT, utcnow()))[1]
            password_file.write_text(password)
    return f"SMPP login: {DEMO_TENANT} {password}"


class Supervisor:
    def __init__(self, settings: Settings, sim_port: int, metrics_port_base: int = 0, smpp_port: int = 0,
                 mail_port: int = MAIL_SIM_PORT, api_url: str = "") -> None:
        self.settings = settings
        self.stopping = False
        mail_events = mail_sim_events_args(settings.data_dir, api_url) if api_url else []
        port_args = {"smsc-sim": ["--port", str(sim_port)], "smpp-server": ["--port", str(smpp_port)],
                     "mail-sim": ["--port", str(mail_port), *mail_events]}
        self.children = [Child(name, [sys.executable, "-m", "ops.cli", name, *port_args.get(name, [])])
                         for name in COMPONENTS]
        self.env = {**os.environ,
                    "MSGCORE_MONGO_URL": settings.mongo_url, "MSGCORE_PG_URL": settings.pg_url,
                    "MSGCORE_ADMIN_KEY": settings.admin_key, "MSGCORE_DATA_DIR": str(settings.data_dir),
                    "MSGCORE_METRICS_PORT_BASE": str(metrics_port_base),
                    # Status webhooks to a receiver on this machine work out of the box; private,
                    # link-local and metadata addresses stay refused.
                    "MSGCORE_WEBHOOKS_ALLOW_LOOPBACK": os.environ.get("MSGCORE_WEBHOOKS_ALLOW_LOOPBACK", "true")}
        # One port for every process cannot work on one host: each takes base + its offset.
        self.env.pop("MSGCORE_METRICS_PORT", None)

    def start(self, child: Child) -> None:
        child.proc = subprocess.Popen(child.args, env=self.env, start_new_session=True, preexec_fn=die_with_parent)
        child.started_at = time.monotonic()

    def watch(self) -> None:
        """Restart a component that died, with back-off: one crash must not take the product down."""
        now = time.monotonic()
        for child in self.children:
            if child.proc is None or child.proc.poll() is None:
                if child.proc is None and now >= child.next_start:
                    self.start(child)
                continue
            code = child.proc.returncode
            quick = now - child.started_at < 10
            child.restarts += 1
            delay = min(30.0, 2 ** min(child.restarts, 5)) if quick else 1.0
            log.warning("component %s exited with code %s; restarting in %.0fs", child.name, code, delay)
            child.proc = None
            child.next_start = now + delay

    def stop(self) -> None:
        # The simulator stands in for the SMSC: it goes last, so connectors can unbind cleanly.
        self._stop([c for c in self.children if c.name not in SIMULATORS])
        self._stop([c for c in self.children if c.name in SIMULATORS])

    def _stop(self, children: list[Child]) -> None:
        for child in children:
            if child.proc and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("component %s did not stop within %.0fs; killing it", child.name, STOP_GRACE_S)
                child.proc.kill()
                child.proc.wait()


def up(settings: Settings) -> None:
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = settings.model_copy(update={"data_dir": data_dir})
    if not _port_free(settings.api_port):
        raise SystemExit(f"msgcore up: 127.0.0.1:{settings.api_port} is in use; set MSGCORE_API_PORT to a free port")
    servers: list[EmbeddedMongo | EmbeddedPostgres] = []
    stop_requested = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    supervisor: Supervisor | None = None
    try:
        updates: dict[str, object] = {}
        if not settings.mongo_url:
            mongo = EmbeddedMongo(data_dir)
            mongo.start()
            servers.append(mongo)
            updates["mongo_url"] = mongo.url
        if not settings.pg_url:
            pg = EmbeddedPostgres(data_dir)
            pg.start()
            servers.append(pg)
            updates["pg_url"] = pg.url
        updates["admin_key"] = settings.admin_key or _secret_file(data_dir / "admin.key", new_token("mka_"))
        settings = settings.model_copy(update=updates)
        sim_port = settings.sim_port if _port_free(settings.sim_port) else free_port()
        mail_port = MAIL_SIM_PORT if _port_free(MAIL_SIM_PORT) else free_port()
        demo_key = asyncio.run(_bootstrap(settings, sim_port, mail_port))
        smpp_port, smpp_lines = _smpp_server(settings)
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        write_endpoints(data_dir, {"mongo": settings.mongo_url, "pg": settings.pg_url, "api": api_url,
                                   "admin_key": settings.admin_key, "smsc_sim": f"127.0.0.1:{sim_port}",
                                   "mail_sim": f"127.0.0.1:{mail_port}"})
        base = metrics_base(settings)
        supervisor = Supervisor(settings, sim_port, base, smpp_port, mail_port, api_url)
        supervisor.watch()
        _wait_until_ready(f"{api_url}/readyz", supervisor, lambda: stop_requested)
        mail_lines = [f"Mail sim:    127.0.0.1:{mail_port} (route \"mail\"), mails kept under {data_dir / 'mail-sim'}"]
        _banner(api_url, demo_key, settings, data_dir, sim_port,
                [*metrics_lines(api_url, base), *smpp_lines, *mail_lines])
        while not stop_requested:
            time.sleep(0.5)
            supervisor.watch()
    finally:
        log.info("stopping components")
        if supervisor:
            supervisor.stop()
        for server in reversed(servers):
            server.stop()
        log.info("msgcore stopped")


def _wait_until_ready(url: str, supervisor: Supervisor, stopped: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Print the banner only once the api answers: a newcomer pastes its `curl` at once, and the
    api takes a few seconds to start (connection refused before, not a helpful first sight)."""
    deadline = time.monotonic() + timeout_s
    while not stopped() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:  # not listening yet, or 503 while a store is still coming up
            pass
        supervisor.watch()
        time.sleep(0.25)
    log.warning("the api did not answer %s within %.0f s; see its log lines above", url, timeout_s)


def _banner(api_url: str, key: str, settings: Settings, data_dir: Path, sim_port: int, metrics: list[str]) -> None:
    endpoints = "".join(f"\n  {line}" for line in metrics)
    print(
        f"""
msgcore is up.
  API:         {api_url}   (OpenAPI: {api_url}/docs)
  API key:     {key}   (tenant "{DEMO_TENANT}")
  Admin key:   {settings.admin_key}
  PostgreSQL:  {settings.pg_url}   (schema "{settings.reporting_schema}")
  MongoDB:     {settings.mongo_url}
  SMSC sim:    127.0.0.1:{sim_port} (route "sim")
  Data:        {data_dir}{endpoints}
Try:
  curl -s -X POST {api_url}/v1/messages -H "Authorization: Bearer {key}" \\
       -H 'Content-Type: application/json' -d '{{"to": "+4915112345678", "from": "msgcore", "text": "Hello"}}'
Ctrl-C stops everything.
""",
        flush=True,
    )
