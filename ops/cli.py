"""The `msgcore` command line: run components, the embedded default, and admin tasks."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from core.config import Settings
from ops import components
from ops.logs import configure

app = typer.Typer(no_args_is_help=True, add_completion=False, help="msgcore: event-sourced SMS core.")
tenants_app = typer.Typer(no_args_is_help=True, help="Tenants and their API keys.")
routes_app = typer.Typer(no_args_is_help=True, help="SMSC routes.")
heads_app = typer.Typer(no_args_is_help=True, help="Heads (the per-message cache in `streams`).")
app.add_typer(tenants_app, name="tenants")
app.add_typer(routes_app, name="routes")
app.add_typer(heads_app, name="heads")


def _settings(component: str, need_store: bool = True) -> Settings:
    try:
        settings = Settings()
    except ValidationError as e:
        raise typer.BadParameter(f"invalid MSGCORE_* setting: {e}") from e
    configure(component, settings.log_level)
    if need_store:
        try:
            settings = components.resolve_urls(settings)
        except components.ConfigError as e:
            typer.echo(f"msgcore {component}: {e}", err=True)
            raise typer.Exit(2) from e
    return settings


def _run(component: str, coro: object) -> None:
    try:
        asyncio.run(coro)  # type: ignore[arg-type]
    except components.ConfigError as e:
        typer.echo(f"msgcore {component}: {e}", err=True)
        raise typer.Exit(2) from e
    except KeyboardInterrupt:
        pass


@app.command()
def up() -> None:
    """Start everything on the embedded default (or on MSGCORE_MONGO_URL / MSGCORE_PG_URL)."""
    from ops.up import up as run_up

    settings = _settings("up", need_store=False)
    run_up(settings)


@app.command()
def api() -> None:
    """The REST API (submission, status, audit trail)."""
    from api.server import serve

    serve(_settings("api"))


@app.command()
def router() -> None:
    """Route accepted messages."""
    s = _settings("router")
    _run("router", components.router_main(s))


@app.command()
def biller() -> None:
    """Price and bill finished messages."""
    s = _settings("biller")
    _run("biller", components.biller_main(s))


@app.command()
def scheduler() -> None:
    """Timed jobs: receipt expiry."""
    s = _settings("scheduler")
    _run("scheduler", components.scheduler_main(s))


@app.command()
def connector(route: Annotated[list[str] | None, typer.Option(help="Route id(s); default: all SMPP routes")] = None
              ) -> None:
    """The SMPP connector(s): send routed messages, record receipts."""
    s = _settings("connector")
    _run("connector", components.connector_main(s, route or []))


@app.command()
def projector() -> None:
    """Stream the event log into the PostgreSQL reporting schema."""
    s = _settings("projector")
    _run("projector", components.projector_main(s))


@app.command("smsc-sim")
def smsc_sim(
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1")] = 2775,
    receipt_delay: Annotated[float, typer.Option(help="Seconds before a delivery receipt")] = 0.2,
    journal: Annotated[Path | None, typer.Option(help="Append one JSON line per submit_sm here")] = None,
) -> None:
    """An SMPP v3.4 SMSC simulator on 127.0.0.1 with delivery receipts."""
    s = _settings("smsc-sim", need_store=False)
    _run("smsc-sim", components.simulator_main(s, port, receipt_delay, str(journal) if journal else None))


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Display name")],
    tenant_id: Annotated[str | None, typer.Option("--id", help="Tenant id (default: from the name)")] = None,
) -> None:
    """Create a tenant and print its API key (shown only this once)."""
    from core.domain.events import utcnow
    from core.store.tenants import TenantExists, TenantStore

    s = _settings("cli")
    tid = tenant_id or "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:63]

    async def create() -> str:
        async with components.database(s, "cli") as db:
            await components.prepare(db)
            return await TenantStore(db).create(tid, name, utcnow())

    try:
        key = asyncio.run(create())
    except (ValueError, TenantExists) as e:
        typer.echo(f"msgcore tenants create: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"tenant: {tid}\napi key: {key}\n(store it now: only its hash is kept)")


@tenants_app.command("list")
def tenants_list() -> None:
    from core.store.tenants import TenantStore

    s = _settings("cli")

    async def fetch() -> list[dict[str, object]]:
        async with components.database(s, "cli") as db:
            return await TenantStore(db).list()

    for t in asyncio.run(fetch()):
        typer.echo(f"{t['_id']}\t{t['name']}\t{t['status']}\tspent_minor={t.get('spent_minor', 0)}")


@routes_app.command("list")
def routes_list() -> None:
    """Routes with their live status."""
    from core.domain.events import utcnow
    from core.store.routes import RouteStore

    s = _settings("cli")

    async def fetch():  # type: ignore[no-untyped-def]
        async with components.database(s, "cli") as db:
            store = RouteStore(db)
            return await store.list(), await store.statuses(utcnow())

    routes, status = asyncio.run(fetch())
    for r in routes:
        typer.echo(f"{r.id}\t{r.host}:{r.port}\tpriority={r.priority}\tprefixes={','.join(r.prefixes) or '*'}\t"
                   f"price_per_part={r.price_per_part} {r.currency}\t{'enabled' if r.enabled else 'disabled'}\t"
                   f"{status.get(r.id, 'down')}")


@heads_app.command("rebuild")
def heads_rebuild() -> None:
    """Recreate every head from the event log."""
    from core.domain.events import utcnow
    from core.store.rebuild import rebuild_heads

    s = _settings("cli")

    async def go() -> int:
        async with components.database(s, "cli") as db:
            return await rebuild_heads(db, utcnow(), progress=lambda n: typer.echo(f"\r{n} heads", nl=False))

    n = asyncio.run(go())
    typer.echo(f"\nrebuilt {n} heads")


def main() -> None:
    app(prog_name="msgcore")


if __name__ == "__main__":
    sys.exit(main())
