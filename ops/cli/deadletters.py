"""`msgcore dead-letters ...`: dead-lettered (and failed) messages: list, show, requeue (appends events)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any

import typer

from core.config import Settings
from core.domain.events import Event, utcnow
from core.domain.message import fold
from core.store.deadletters import MAX_REQUEUE, REQUEUABLE_STATES, RequeueResult, list_dead_letters, requeue
from core.store.eventstore import EventStore
from ops import components
from ops.cli.common import cli_actor, cli_settings

dead_letters_app = typer.Typer(no_args_is_help=True,
                               help="Dead-lettered (and failed) messages: list, show, requeue (appends events).")

StateOption = Annotated[str, typer.Option("--state", help="dead_lettered, or failed (operators may retry those too)")]


def _check_state(state: str) -> None:
    if state not in REQUEUABLE_STATES:
        raise typer.BadParameter(f"--state must be one of {', '.join(sorted(REQUEUABLE_STATES))}")


@dead_letters_app.command("list")
def dead_letters_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's messages")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many")] = 100,
    after: Annotated[str | None, typer.Option(help="Start after this message id (the last one printed)")] = None,
    state: StateOption = "dead_lettered",
) -> None:
    """One line per message: id, tenant, to, state, attempts, time and reason of its last event."""
    _check_state(state)
    s = cli_settings("cli")

    async def fetch() -> list[dict[str, object]]:
        async with components.database(s, "cli") as db:
            return await list_dead_letters(db, tenant, limit, after, state=state)

    items = asyncio.run(fetch())
    for i in items:
        at = i["at"].isoformat() if isinstance(i["at"], datetime) else "-"
        typer.echo(f"{i['id']}\t{i['tenant_id']}\t{i['to']}\t{i['state']}\tattempts={i['attempts']}\t{at}\t"
                   f"{i['reason'] or '-'}")
    if not items:
        typer.echo(f"no {state} messages" + (f" for tenant {tenant}" if tenant else ""), err=True)


@dead_letters_app.command("show")
def dead_letters_show(message_id: Annotated[str, typer.Argument(help="Message id")]) -> None:
    """The message's state (the fold of its events) and its full event history (time, type, route, data)."""
    s = cli_settings("cli")

    async def fetch() -> list[dict[str, Any]]:
        async with components.database(s, "cli") as db:
            return await EventStore(db).log.load_events(message_id)

    docs = asyncio.run(fetch())
    if not docs:
        typer.echo(f"msgcore dead-letters show: no message {message_id}", err=True)
        raise typer.Exit(1)
    events = [Event.from_doc(d) for d in docs]
    state = fold(events)
    if state is not None:
        # Where it waits: the topic its last event went to (a stage's input), if any.
        typer.echo(f"message {message_id}\ttenant={state.tenant_id}\tto={state.to}\tstate={state.state}\t"
                   f"attempts={state.attempts}\tversion={state.version}\ttopic={docs[-1].get('topic') or '-'}")
    for e in events:
        data = json.dumps(e.data, default=str, ensure_ascii=False, sort_keys=True)
        typer.echo(f"{e.seq:>3}  {e.at.isoformat()}  {e.type.value:<13} route={e.route_id or '-'}  {data}")


async def _requeue_pages(s: Settings, ids: list[str] | None, tenant: str | None, state: str, actor: str,
                         reason: str) -> RequeueResult:
    """Requeue `ids` (or, with None, every message in `state` of `tenant`) in commits of at most
    MAX_REQUEUE; returns the combined RequeueResult."""
    total = RequeueResult()
    async with components.database(s, "cli") as db:
        store = EventStore(db)
        after: str | None = None
        pending = list(dict.fromkeys(ids)) if ids is not None else []
        while True:
            if ids is None:  # --all: keyset pages, so ids that stay behind (conflicts) are not met again
                page = await list_dead_letters(db, tenant, MAX_REQUEUE, after, state=state)
                chunk = [p["id"] for p in page]
                after = chunk[-1] if chunk else None
            else:
                chunk, pending = pending[:MAX_REQUEUE], pending[MAX_REQUEUE:]
            if not chunk:
                return total
            r = await requeue(store, chunk, actor, reason, utcnow(), state=state)
            for name in ("requeued", "not_found", "not_dead", "conflicts"):
                getattr(total, name).extend(getattr(r, name))
            total.states.update(r.states)


def _print_requeued(result: RequeueResult, state: str) -> None:
    for mid in result.requeued:
        typer.echo(f"requeued {mid}")
    typer.echo(f"{len(result.requeued)} message(s) requeued" +
               (": back to the router, attempts reset" if result.requeued else ""))
    if result.not_found:
        typer.echo(f"unknown message id(s): {', '.join(result.not_found)}", err=True)
    for mid in result.not_dead:
        typer.echo(f"not requeued: {mid} is {result.states.get(mid, '?')}, not {state}", err=True)
    if result.conflicts:
        typer.echo(f"changed meanwhile, not requeued (try again): {', '.join(result.conflicts)}", err=True)


@dead_letters_app.command("requeue")
def dead_letters_requeue(
    message_ids: Annotated[list[str] | None, typer.Argument(help="Message ids")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every message in --state (of --tenant, if given)")] = False,
    reason: Annotated[str, typer.Option(help="Why: recorded in each requeued event")] = "requeued by operator",
    tenant: Annotated[str | None, typer.Option(help="With --all: only this tenant's messages")] = None,
    state: StateOption = "dead_lettered",
) -> None:
    """Append a `requeued` event to each message: back to the router with a fresh attempt budget.

    Exits 1 if some message could not be requeued (unknown, not in --state, or changed meanwhile)."""
    _check_state(state)
    if bool(message_ids) == all_:
        typer.echo("msgcore dead-letters requeue: give message ids, or --all (not both)", err=True)
        raise typer.Exit(2)
    if tenant is not None and not all_:
        typer.echo("msgcore dead-letters requeue: --tenant goes with --all", err=True)
        raise typer.Exit(2)
    s = cli_settings("cli")
    result = asyncio.run(_requeue_pages(s, None if all_ else message_ids, tenant, state, cli_actor(), reason))
    _print_requeued(result, state)
    if not result.ok:
        raise typer.Exit(1)
