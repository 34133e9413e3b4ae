"""`msgcore verify`: check the event log and the reporting tables against it (the checks: ops/verify/)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from core.domain.events import utcnow

# A driver error at the boundary: core/store does not translate a failed connect for this reader yet.
from core.store.database import UNTRANSLATED_UNAVAILABLE
from ops import components
from ops.cli.common import cli_settings

if TYPE_CHECKING:
    from ops.verify import VerifyReport

app = typer.Typer()


def _print_findings(report: VerifyReport, show: int) -> None:
    """At most `show` discrepancies per kind (and how many more there are), then at most `show` notes."""
    shown: dict[str, int] = {}
    for d in report.discrepancies:
        shown[d.kind] = shown.get(d.kind, 0) + 1
        if shown[d.kind] <= show:
            typer.echo(f"{d.kind}\t{d.message_id or '-'}\t{d.detail}")
    for kind, n in sorted(report.discrepancy_counts.items()):
        if n > show:
            typer.echo(f"{kind}\t...\t{n - show} more not shown ({n} in all)")
    for note in report.notes[:show]:
        typer.echo(f"note:{note.kind}\t{note.message_id or '-'}\t{note.detail}")


def _print_counts(report: VerifyReport, schema: str) -> None:
    c = report.counts
    typer.echo(f"messages={c['messages']} events={c['events']} terminal={c['terminal']} in_flight={c['in_flight']} "
               f"(backlog={c['in_backlog']} timer={c['on_timer']} receipt={c['awaiting_receipt']} "
               f"paused={c['paused']}) stuck={c['stuck']} billed={c['billed']} "
               f"possible_duplicates={c['possible_duplicates']} multi_sent={c['multi_sent']}")
    typer.echo(f"topics={c['topics']} positions={c['positions']} checkpoints={c['checkpoints']} "
               f"attempts_open={c['attempts_open']} in_motion={c['in_motion']}")
    if report.reporting_checked:
        typer.echo(f"reporting schema {schema}: projected={c['projected']} "
                   f"not_yet_projected={c['not_yet_projected']} projector_position="
                   f"{report.projector_position.isoformat() if report.projector_position else 'unknown'}")
    else:
        typer.echo("no PostgreSQL configured (MSGCORE_PG_URL): only the MongoDB checks ran")


@app.command()
def verify(
    stale_after: Annotated[float, typer.Option(min=0, help="Seconds a message may wait past its due time (in a "
                                               "topic backlog, on a timer, for a receipt) before it is stuck, and "
                                               "an attempt may stay open before it is unresolved")] = 3600.0,
    lag_grace: Annotated[float, typer.Option(
        min=0, help="Events missing from the reporting tables count as not yet projected if they are at most this "
                    "many seconds older than the projector's position")] = 60.0,
    show: Annotated[int, typer.Option(min=0, help="Discrepancies printed per kind")] = 50,
) -> None:
    """Check the event log (topics gapless, every position below a checkpoint with its outcome, attempts
    resolved, every message finished or legitimately waiting, no unexplained second send, no double
    bill, tenants' spend) and the reporting tables against it: exit 0 if clean, 1 if not."""
    # Imported here: psycopg (which ops.verify reads PostgreSQL with) adds ~0.15 s and ~9 MB to every
    # process started through this CLI, most of which never use PostgreSQL.
    import psycopg

    from ops.verify import VerifyError
    from ops.verify import verify as run_verify

    s = cli_settings("verify")

    async def go() -> VerifyReport:
        async with components.database(s, "verify") as db:
            return await run_verify(db, s.pg_url or None, s.reporting_schema, utcnow(),
                                    stale_after_s=stale_after, lag_grace_s=lag_grace)

    try:
        report = asyncio.run(go())
    # Configuration: a store unreachable or a wrong schema.
    except (VerifyError, *UNTRANSLATED_UNAVAILABLE, psycopg.OperationalError) as e:
        typer.echo(f"msgcore verify: {e}", err=True)
        raise typer.Exit(2) from e
    _print_findings(report, show)
    _print_counts(report, s.reporting_schema)
    if report.ok:
        typer.echo("OK: no discrepancies")
        return
    total = sum(report.discrepancy_counts.values())
    kinds = ", ".join(f"{k}={n}" for k, n in sorted(report.discrepancy_counts.items()))
    typer.echo(f"FAILED: {total} discrepancies ({kinds})")
    raise typer.Exit(1)
