"""`msgcore trace`: a message's full event history from the log (the lookup: ops/trace.py)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from ops import components
from ops.cli.common import cli_settings
from ops.trace import TraceResult, format_trace
from ops.trace import trace as run_trace

app = typer.Typer()


@app.command()
def trace(
    query: Annotated[str, typer.Argument(help="Message id, SMSC message id, or phone number (E.164)")],
    max_messages: Annotated[int, typer.Option(min=1, max=1000, help="Show at most this many messages")] = 20,
    scan_time: Annotated[float, typer.Option(min=1, help="Phone numbers: seconds a lookup may take when the "
                                                         "events have no index on the number")] = 30.0,
) -> None:
    """Print the full event history from the log (seq, UTC time, type, route, key data) of the
    message(s) named. Exit 1 if none is found."""
    s = cli_settings("cli")

    async def go() -> TraceResult:
        async with components.database(s, "cli") as db:
            return await run_trace(db, query, max_messages=max_messages, scan_time_s=scan_time)

    result = asyncio.run(go())
    for line in format_trace(result):
        typer.echo(line)
    if not result.messages:
        typer.echo(f"msgcore trace: no message found for {query!r}", err=True)
        raise typer.Exit(1)
