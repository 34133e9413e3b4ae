"""`msgcore projections ...` (the PostgreSQL reporting projection: status, rebuild) and
`msgcore reporting ...` (the reporting schema for BI tools).

psycopg and the projections package are imported inside the commands: they add ~0.15 s and ~9 MB to
every process started through this CLI (router, connector, ...), most of which never use PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer

# A driver error at the boundary: core/store does not translate the projection status reads yet.
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from core.store.database import DRIVER_ERRORS
from ops import components
from ops.cli.common import cli_settings, need_pg

if TYPE_CHECKING:
    from projections.rebuild import RebuildResult
    from projections.status import ProjectionStatus

projections_app = typer.Typer(no_args_is_help=True, help="The PostgreSQL reporting projection: lag, rebuild.")
reporting_app = typer.Typer(no_args_is_help=True, help="The reporting schema for BI tools.")


@projections_app.command("status")
def projections_status(
    count_limit: Annotated[int, typer.Option(min=1, help="Stop counting the events behind at this many")
                           ] = 100_000,
) -> None:
    """Checkpoint time, cluster time, newest event, events behind, and whether the resume token is
    still in the oplog. Exit 0 if the projection can follow on, 1 if it needs an operator."""
    import psycopg

    from projections.status import format_status, projection_status

    s = cli_settings("cli")
    pg_url = need_pg(s, "projections status")

    async def go() -> ProjectionStatus:
        async with components.database(s, "cli") as db:
            return await projection_status(db["events"], pg_url, s.reporting_schema, count_limit=count_limit)

    try:
        status = asyncio.run(go())
    except (psycopg.Error, *DRIVER_ERRORS) as e:
        typer.echo(f"msgcore projections status: {e.__class__.__name__}: {e}", err=True)
        raise typer.Exit(2) from e
    for line in format_status(status):
        typer.echo(line)
    if not status.ok:
        raise typer.Exit(1)


def _rebuild_progress() -> tuple[Progress, Callable[[int, int], None], Callable[[str], None]]:
    """The progress bar of a rebuild, and its two callbacks: events replayed of an estimate, and a
    phase line (UTC time and text)."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("events"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        transient=False)
    task = progress.add_task("replaying the log", total=None)

    def on_progress(done: int, estimate: int) -> None:
        progress.update(task, completed=done, total=estimate)

    def on_phase(text: str) -> None:
        progress.console.print(f"{datetime.now(UTC).strftime('%H:%M:%SZ')} {text}", highlight=False)

    return progress, on_progress, on_phase


def _print_rebuilt(result: RebuildResult) -> None:
    typer.echo(f"schema {result.schema} rebuilt from the log: {result.replayed} events replayed, "
               f"{result.followed} followed live, {result.seconds:.1f}s")
    typer.echo(f"previous schema kept as: {result.old_schema or '- (there was none)'}")
    if result.dropped:
        typer.echo(f"dropped: {', '.join(result.dropped)}")
    if result.stopped_live:
        typer.echo(f"live projector session(s) {', '.join(map(str, result.stopped_live))} were stopped; "
                   "the projector resumes on the new schema by itself")


@projections_app.command("rebuild")
def projections_rebuild(
    stop_projector: Annotated[bool, typer.Option(
        help="Stop the live projector (terminate its PostgreSQL session) for the swap; it waits as a standby "
             "and resumes on the new schema by itself. With --no-stop-projector, wait for it to be stopped")
    ] = True,
    lock_timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for the live projector's lock")
                            ] = 60.0,
    catch_up_timeout: Annotated[float, typer.Option(min=1, help="Seconds the shadow may take to catch up")
                                ] = 600.0,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Events per PostgreSQL transaction")] = 1000,
) -> None:
    """Replay the whole log into a shadow schema, catch up with the live log, swap it in atomically.

    Traffic continues meanwhile. The previous schema is kept as <schema>_old_<time> until the next rebuild."""
    from projections.rebuild import RebuildError, rebuild

    s = cli_settings("cli")
    pg_url = need_pg(s, "projections rebuild")
    progress, on_progress, on_phase = _rebuild_progress()

    async def go() -> RebuildResult:
        async with components.database(s, "cli") as db:
            return await rebuild(db["events"], pg_url, s.reporting_schema, batch_size=batch_size,
                                 stop_live=stop_projector, lock_timeout_s=lock_timeout,
                                 catch_up_timeout_s=catch_up_timeout, progress=on_progress, phase=on_phase)

    try:
        with progress:
            result = asyncio.run(go())
    except RebuildError as e:
        typer.echo(f"msgcore projections rebuild: {e}", err=True)
        raise typer.Exit(1) from e
    _print_rebuilt(result)


@reporting_app.command("grant-bi-role")
def reporting_grant_bi_role(
    role: Annotated[str, typer.Option(help="Read-only role for BI tools")] = "msgcore_bi",
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True,
                                          envvar="MSGCORE_BI_PASSWORD", help="Its password (prompted if not given)")
                        ] = "",
) -> None:
    """Create (or update) a read-only login role with SELECT on the reporting schema."""
    from projections.bi_role import ensure_bi_role

    s = cli_settings("cli")
    pg_url = need_pg(s, "reporting grant-bi-role")
    asyncio.run(ensure_bi_role(pg_url, s.reporting_schema, role, password))
    typer.echo(f"role {role}: read-only access to schema {s.reporting_schema} granted")
