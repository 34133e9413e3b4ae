"""`msgcore smpp-accounts ...`: the SMPP accounts ESMEs bind with (a sub-app of ops/cli/).

Exit codes: 0 done, 1 no such account or tenant, 2 bad input, account exists, or no store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from core.domain.events import utcnow
from core.store.smpp_accounts import InvalidSmppAccount, SmppAccountExists, SmppAccountNotFound, SmppAccountStore
from core.store.tenants import TenantStore
from ops import components
from ops.cli.common import cli_settings

T = TypeVar("T")

smpp_accounts_app = typer.Typer(no_args_is_help=True, help="SMPP accounts: how ESMEs bind to `msgcore smpp-server`.")

SystemIdArg = Annotated[str, typer.Argument(help="The account's system_id (its login)")]


def _fail(command: str, message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"msgcore smpp-accounts {command}: {message}", err=True)
    return typer.Exit(code)


def _with_store(command: str, fn: Callable[[SmppAccountStore, TenantStore], Awaitable[T]]) -> T:
    s = cli_settings(f"smpp-accounts {command}")

    async def go() -> T:
        async with components.database(s, "cli") as db:
            return await fn(SmppAccountStore(db), TenantStore(db))

    try:
        return asyncio.run(go())
    except (InvalidSmppAccount, SmppAccountExists) as e:
        raise _fail(command, str(e), 2) from e
    except SmppAccountNotFound as e:
        raise _fail(command, str(e), 1) from e


def _line(a: dict[str, Any]) -> str:
    tps = "unlimited" if a.get("tps") is None else f"{a['tps']:g}"
    ips = ",".join(a.get("allowed_ips") or []) or "any"
    return (f"{a['system_id']}\ttenant={a['tenant_id']}\t{'enabled' if a.get('enabled') else 'disabled'}\t"
            f"max_binds={a.get('max_binds')}\twindow={a.get('window')}\ttps={tps}\tips={ips}\t"
            f"{'transactional' if a.get('transactional', True) else 'marketing'}\talphabet={a.get('alphabet')}\t"
            f"receive_mo={'yes' if a.get('receive_mo') else 'no'}")


@smpp_accounts_app.command("create")
def create(
    system_id: SystemIdArg,
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant id its messages belong to")],
    allow_ip: Annotated[list[str] | None, typer.Option("--allow-ip", help="CIDR it may bind from (repeatable)")] = None,
    max_binds: Annotated[int, typer.Option(help="Binds open at once")] = 4,
    window: Annotated[int, typer.Option(help="Outstanding PDUs per bind")] = 100,
    tps: Annotated[float | None, typer.Option(help="submit_sm per second (default unlimited)")] = None,
    marketing: Annotated[bool, typer.Option("--marketing", help="Its messages go to the marketing lane")] = False,
    alphabet: Annotated[str, typer.Option(help="What data_coding 0 means: gsm or latin1")] = "gsm",
    receive_mo: Annotated[bool, typer.Option("--receive-mo", help="MO for the tenant's numbers go to this "
                                             "account (the tenant's oldest such account gets them)")] = False,
) -> None:
    """Create an account and print its password (shown only this once)."""

    async def go(accounts: SmppAccountStore, tenants: TenantStore) -> tuple[dict[str, Any], str] | None:
        if await tenants.get(tenant) is None:
            return None
        return await accounts.create(system_id, tenant, utcnow(), allowed_ips=allow_ip or [], max_binds=max_binds,
                                     window=window, tps=tps, transactional=not marketing, alphabet=alphabet,
                                     receive_mo=receive_mo)

    created = _with_store("create", go)
    if created is None:
        raise _fail("create", f"no tenant {tenant}")
    typer.echo(f"{_line(created[0])}\npassword: {created[1]}\n(store it now: only its hash is kept)")


@smpp_accounts_app.command("list")
def list_accounts(tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's")] = None) -> None:
    """One line per account."""
    for a in _with_store("list", lambda accounts, _: accounts.list(tenant)):
        typer.echo(_line(a))


@smpp_accounts_app.command("update")
def update(
    system_id: SystemIdArg,
    receive_mo: Annotated[bool | None, typer.Option("--receive-mo/--no-receive-mo",
                                                    help="Whether MO for the tenant's numbers go to it")] = None,
) -> None:
    """Change an account's settings (those given)."""
    changes: dict[str, Any] = {} if receive_mo is None else {"receive_mo": receive_mo}
    if not changes:
        raise _fail("update", "nothing to change (e.g. --receive-mo or --no-receive-mo)", 2)
    typer.echo(_line(_with_store("update", lambda a, _: a.update(system_id, changes, utcnow()))))


@smpp_accounts_app.command("disable")
def disable(system_id: SystemIdArg) -> None:
    """New binds of the account are refused."""
    typer.echo(_line(_with_store("disable", lambda a, _: a.set_enabled(system_id, False, utcnow()))))


@smpp_accounts_app.command("enable")
def enable(system_id: SystemIdArg) -> None:
    """The account may bind again."""
    typer.echo(_line(_with_store("enable", lambda a, _: a.set_enabled(system_id, True, utcnow()))))


@smpp_accounts_app.command("rotate-password")
def rotate_password(system_id: SystemIdArg) -> None:
    """A new password (shown once); the old one stops working at the next bind."""
    doc, password = _with_store("rotate-password", lambda a, _: a.rotate_password(system_id, utcnow()))
    typer.echo(f"{_line(doc)}\npassword: {password}")
