"""`msgcore suppressions ...`: a tenant's opt-out list, from the command line (a sub-app of ops/cli/).

Talks to the store directly, like `msgcore tenants`; every change is an `opted_out` / `opted_in`
event with source `cli` and the operator as actor (core/store/suppressions.py).
Exit codes: 0 done, 1 nothing matched (remove), 2 bad input or no store.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from core.domain.consent import ALL_SENDERS, Change, normalize_address
from core.domain.events import utcnow
from core.domain.submission_rules import E164, SENDER_ID
from core.store.suppressions import SuppressionStore
from ops import components
from ops.cli.common import cli_actor, cli_settings

T = TypeVar("T")

suppressions_app = typer.Typer(no_args_is_help=True, help="Opt-outs: numbers a tenant must not send to.")

TenantOpt = Annotated[str, typer.Option("--tenant", help="Tenant id")]
AddressArg = Annotated[str, typer.Argument(help="The number, E.164 (+4915112345678)")]
ScopeOpt = Annotated[str | None, typer.Option("--scope", help='A sender id, or "*" for every sender')]


def _fail(command: str, message: str, code: int) -> typer.Exit:
    typer.echo(f"msgcore suppressions {command}: {message}", err=True)
    return typer.Exit(code)


def _checked(command: str, address: str, scope: str | None) -> tuple[str, str | None]:
    if not re.match(E164, address):
        raise _fail(command, f"{address!r} is not an E.164 number", 2)
    if scope is not None and scope != ALL_SENDERS and not re.match(SENDER_ID, scope):
        raise _fail(command, f"{scope!r} is not a sender id or '*'", 2)
    return address, None if scope is None else normalize_address(scope)


def _with_store(command: str, fn: Callable[[SuppressionStore], Awaitable[T]]) -> T:
    s = cli_settings(f"suppressions {command}")

    async def go() -> T:
        async with components.database(s, "cli") as db:
            return await fn(SuppressionStore(db))

    return asyncio.run(go())


@suppressions_app.command("list")
def list_(tenant: TenantOpt,
          address: Annotated[str | None, typer.Option("--address", help="Only this number")] = None) -> None:
    """Print the tenant's active entries: address, scope, since, source, reason."""

    async def go(store: SuppressionStore) -> None:
        after = None
        while True:
            rows = await store.list(tenant, address=address, after=after, limit=1000)
            for r in rows:
                since = r.get("since")
                typer.echo(f"{r['address']}\t{r['scope']}\t{since.isoformat() if since else '-'}\t"
                           f"{r.get('source', '')}\t{r.get('reason', '')}")
            if len(rows) < 1000:
                return
            after = (rows[-1]["address"], rows[-1]["scope"])

    _with_store("list", go)


@suppressions_app.command("add")
def add(tenant: TenantOpt, address: AddressArg, scope: ScopeOpt = None,
        reason: Annotated[str, typer.Option(help="Why (kept in the event)")] = "") -> None:
    """Opt a number out (of every sender unless --scope)."""
    number, sc = _checked("add", address, scope)
    change = Change("sms", number, sc or ALL_SENDERS, True, "cli", cli_actor(), reason)
    applied = _with_store("add", lambda store: store.apply(tenant, [change], utcnow()))
    typer.echo("opted out" if applied else "already opted out")


@suppressions_app.command("remove")
def remove(tenant: TenantOpt, address: AddressArg, scope: ScopeOpt = None,
           reason: Annotated[str, typer.Option(help="Why (kept in the event)")] = "") -> None:
    """Opt a number back in (every entry of it unless --scope)."""
    number, sc = _checked("remove", address, scope)

    async def go(store: SuppressionStore) -> int:
        scopes = [sc] if sc is not None else await store.active_scopes(tenant, "sms", number)
        changes = [Change("sms", number, s, False, "cli", cli_actor(), reason) for s in scopes]
        return len(await store.apply(tenant, changes, utcnow())) if changes else 0

    removed = _with_store("remove", go)
    if not removed:
        raise _fail("remove", f"{number} is not suppressed" + (f" for {scope!r}" if scope else ""), 1)
    typer.echo(f"opted in ({removed} entr{'y' if removed == 1 else 'ies'})")
