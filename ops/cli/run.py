"""`msgcore up`, and the commands that run one component each (`python -m ops.cli <component>` is how
`msgcore up` and ops/stack.py start them)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from ops import components
from ops.cli.common import cli_settings, need_pg, run_component
from ops.up import up as run_up

app = typer.Typer()


@app.command()
def up() -> None:
    """Start everything on the embedded default (or on MSGCORE_MONGO_URL / MSGCORE_PG_URL)."""
    settings = cli_settings("up", need_store=False)
    run_up(settings)


@app.command()
def api() -> None:
    """The REST API (submission, status, audit trail)."""
    # Imported here: fastapi and the API's modules add ~0.4 s and ~10 MB to every other process
    # started through this CLI (router, connector, ...), which never serves HTTP.
    from api.server import serve

    serve(cli_settings("api"))


@app.command()
def router() -> None:
    """Route accepted messages."""
    s = cli_settings("router")
    run_component("router", components.router_main(s))


@app.command()
def scheduler() -> None:
    """Timed jobs: receipt expiry (with its bill), due timers, campaign release and completion."""
    s = cli_settings("scheduler")
    run_component("scheduler", components.scheduler_main(s))


@app.command()
def connector(route: Annotated[list[str] | None, typer.Option(help="Route id(s); default: all SMPP routes")] = None,
              partition: Annotated[list[int] | None, typer.Option(
                  min=0, max=63, help="Of partitioned routes, run only these partitions (repeatable); default: all. "
                                      "Each partition is owned by one process; the others stand by.")] = None
              ) -> None:
    """The SMPP connector(s): send routed messages, record receipts."""
    s = cli_settings("connector")
    run_component("connector", components.connector_main(s, route or [], partition or []))


@app.command()
def projector() -> None:
    """Stream the event log into the PostgreSQL reporting schema."""
    s = cli_settings("projector")
    run_component("projector", components.projector_main(s))


@app.command()
def webhooks() -> None:
    """Status webhooks: fan events out to the tenants' endpoints and deliver them, signed, with retries."""
    s = cli_settings("webhooks")
    run_component("webhooks", components.webhooks_main(s))


@app.command()
def migrate() -> None:
    """Apply pending reporting-schema migrations (idempotent; each is recorded in <schema>.migrations).
    The projector and `msgcore up` also apply them on start."""
    # Imported here: psycopg adds ~0.15 s and ~9 MB to the processes that never use PostgreSQL.
    from projections.schema import migrate as apply_migrations

    s = cli_settings("migrate")
    pg_url = need_pg(s, "migrate")
    applied = asyncio.run(apply_migrations(pg_url, s.reporting_schema))
    if applied:
        typer.echo(f"schema {s.reporting_schema}: applied {', '.join(applied)}")
    else:
        typer.echo(f"schema {s.reporting_schema}: up to date")


def _sim_faults(error_ratio: float | None, permanent_share: float | None, throttle_tps: float | None,
                drop_after_pdus: int | None, receipt_mode: str | None, receipt_stat: str | None,
                malformed_ratio: float | None, seed: int | None) -> dict[str, Any]:
    """The simulator's fault settings from the options given (None = not given)."""
    faults: dict[str, Any] = {k: v for k, v in {
        "error_ratio": error_ratio, "permanent_share": permanent_share, "throttle_tps": throttle_tps,
        "drop_after_pdus": drop_after_pdus, "receipt_mode": receipt_mode, "malformed_ratio": malformed_ratio,
        "seed": seed}.items() if v is not None}
    if receipt_stat is None:
        return faults
    if "=" not in receipt_stat:
        faults["receipt_stat"] = receipt_stat
        return faults
    try:
        faults["receipt_stat_mix"] = {k.strip(): float(v) for k, v in
                                      (item.split("=", 1) for item in receipt_stat.split(",") if item.strip())}
    except ValueError as e:
        raise typer.BadParameter(f"--receipt-stat: expected STAT=WEIGHT,...: {e}") from e
    return faults


@app.command("smsc-sim")
def smsc_sim(
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1")] = 2775,
    receipt_delay: Annotated[float, typer.Option(help="Seconds before a delivery receipt")] = 0.2,
    journal: Annotated[Path | None, typer.Option(help="Append one JSON line per submit_sm here")] = None,
    control_port: Annotated[int | None, typer.Option(
        help="HTTP control API on 127.0.0.1 (GET/PUT /faults, POST /reset; 0 = any free port)")] = None,
    error_ratio: Annotated[float | None, typer.Option(help="Share of submit_sm answered with an error (0..1)")] = None,
    permanent_share: Annotated[float | None, typer.Option(
        help="Share of those errors that are permanent (0x0B, 0x0A); the rest temporary (0x14, 0x08)")] = None,
    throttle_tps: Annotated[float | None, typer.Option(
        help="Answer ESME_RTHROTTLED (0x58) above this many submit_sm/s per system_id")] = None,
    drop_after_pdus: Annotated[int | None, typer.Option(help="Close each connection after its N-th PDU")] = None,
    receipt_mode: Annotated[str | None, typer.Option(
        help="normal | never | out_of_order | before_response")] = None,
    receipt_stat: Annotated[str | None, typer.Option(
        help="Receipt stat (DELIVRD, UNDELIV, EXPIRED, ...) or a mix: DELIVRD=0.9,UNDELIV=0.05,EXPIRED=0.05")] = None,
    malformed_ratio: Annotated[float | None, typer.Option(
        help="Share of deliver_sm preceded by a malformed PDU (0..1)")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the fault RNG, for reproducible runs")] = None,
) -> None:
    """An SMPP v3.4 SMSC simulator on 127.0.0.1 with delivery receipts and switchable faults."""
    s = cli_settings("smsc-sim", need_store=False)
    faults = _sim_faults(error_ratio, permanent_share, throttle_tps, drop_after_pdus, receipt_mode, receipt_stat,
                         malformed_ratio, seed)
    run_component("smsc-sim", components.simulator_main(s, port, receipt_delay, str(journal) if journal else None,
                                                        control_port, faults))
