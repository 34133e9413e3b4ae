"""`msgcore tenants ...`: tenants, their plans and API keys (a sub-app of ops/cli/).

Every change is recorded in `tenant_changes` with actor `cli:<user>`. Running API processes see a
change within their tenant cache's TTL (10 s); the admin API (/v1/admin/tenants) applies it at once
in the process that served it. Exit codes: 0 done, 1 no such tenant / key or tenant exists, 2 bad input
or settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from core.domain.events import utcnow
from core.domain.ratelimit import effective_burst
from core.store.tenants import (
    DEFAULT_PRIORITY,
    InvalidTenantSetting,
    KeyNotFound,
    TenantExists,
    TenantNotFound,
    TenantStore,
)
from ops import components
from ops.cli.common import cli_actor, cli_settings

T = TypeVar("T")

tenants_app = typer.Typer(no_args_is_help=True, help="Tenants, their plans (priority, submission limits) and API keys.")

TenantIdArg = Annotated[str, typer.Argument(help="Tenant id")]
PriorityOpt = Annotated[int | None, typer.Option("--priority", help="1..100: weight of its bulk traffic (default 10)")]
TpsOpt = Annotated[str | None, typer.Option(
    "--submit-tps", help="Messages per second it may submit through the API, or 'unlimited'")]
BurstOpt = Annotated[str | None, typer.Option(
    "--submit-burst", help="Messages it may submit at once, or 'default' (max(1000, ceil(tps)))")]


def _fail(command: str, message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"msgcore tenants {command}: {message}", err=True)
    return typer.Exit(code)


def _with_store(command: str, fn: Callable[[Any], Awaitable[T]], prepare: bool = False) -> T:
    """Run `fn(store)` against the TenantStore of the configured database, turning the store's
    errors into a message and an exit code."""
    s = cli_settings(f"tenants {command}")

    async def go() -> T:
        async with components.database(s, "cli") as db:
            if prepare:
                await components.prepare(db)
            return await fn(TenantStore(db))

    try:
        return asyncio.run(go())
    except InvalidTenantSetting as e:
        raise _fail(command, str(e), 2) from e
    except TenantExists as e:  # exit 2, as `tenants create` always answered
        raise _fail(command, str(e), 2) from e
    except (TenantNotFound, KeyNotFound) as e:
        raise _fail(command, str(e), 1) from e


def _parse_tps(command: str, value: str) -> float | None:
    if value.lower() in ("unlimited", "none"):
        return None
    try:
        return float(value)
    except ValueError as e:
        raise _fail(command, f"--submit-tps: {value!r} is not a number (or 'unlimited')", 2) from e


def _parse_burst(command: str, value: str) -> int | None:
    if value.lower() in ("default", "none"):
        return None
    if not value.isdigit():
        raise _fail(command, f"--submit-burst: {value!r} is not a whole number (or 'default')", 2)
    return int(value)


def _limits_line(t: dict[str, Any]) -> str:
    tps, burst = t.get("submit_tps"), t.get("submit_burst")
    rate = "unlimited" if tps is None else f"{tps:g}"
    shown_burst = "-" if tps is None else f"{effective_burst(tps, burst)}{'' if burst is not None else ' (default)'}"
    return f"priority={t.get('priority')}\tsubmit_tps={rate}\tsubmit_burst={shown_burst}"


def _key_line(k: dict[str, Any]) -> str:
    created = k["created_at"].isoformat() if k.get("created_at") else "-"
    state = "active" if k.get("revoked_at") is None else f"revoked {k['revoked_at'].isoformat()}"
    return f"{k['id']}\t{k.get('prefix')}...\tcreated {created}\t{state}"


@tenants_app.command("create")
def tenants_create(
    name: Annotated[str, typer.Argument(help="Display name")],
    tenant_id: Annotated[str | None, typer.Option("--id", help="Tenant id (default: from the name)")] = None,
    priority: PriorityOpt = None,
    submit_tps: TpsOpt = None,
    submit_burst: BurstOpt = None,
) -> None:
    """Create a tenant and print its API key (shown only this once)."""
    tid = tenant_id or "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:63]
    tps = _parse_tps("create", submit_tps) if submit_tps is not None else None
    burst = _parse_burst("create", submit_burst) if submit_burst is not None else None
    key_id, key = _with_store("create", lambda store: store.register(
        tid, name, utcnow(), priority=DEFAULT_PRIORITY if priority is None else priority, submit_tps=tps,
        submit_burst=burst, actor=cli_actor()), prepare=True)
    typer.echo(f"tenant: {tid}\napi key: {key}\nkey id: {key_id}\n(store it now: only its hash is kept)")


@tenants_app.command("list")
def tenants_list() -> None:
    """One line per tenant: id, name, status, spend, priority and submission limits."""
    for t in _with_store("list", lambda store: store.list()):
        typer.echo(f"{t['_id']}\t{t['name']}\t{t['status']}\tspent_minor={t.get('spent_minor', 0)}\t"
                   f"{_limits_line(t)}")


@tenants_app.command("limits")
def tenants_limits(tenant_id: TenantIdArg, priority: PriorityOpt = None, submit_tps: TpsOpt = None,
                   submit_burst: BurstOpt = None) -> None:
    """Set a tenant's priority and submission limits (only the options given); without options, show them."""
    fields: dict[str, Any] = {}
    if priority is not None:
        fields["priority"] = priority
    if submit_tps is not None:
        fields["submit_tps"] = _parse_tps("limits", submit_tps)
    if submit_burst is not None:
        fields["submit_burst"] = _parse_burst("limits", submit_burst)

    async def apply(store: Any) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        before = await store.get(tenant_id)
        if before is None or not fields:
            return before, before or {}
        return before, await store.update_limits(tenant_id, utcnow(), actor=cli_actor(), **fields)

    before, after = _with_store("limits", apply)
    if before is None:
        raise _fail("limits", f"no tenant {tenant_id}")
    changed = [f"{k}: {before.get(k)} -> {after.get(k)}" for k in fields if before.get(k) != after.get(k)]
    if fields and not changed:
        typer.echo(f"tenant {tenant_id}: nothing changed")
    for line in changed:
        typer.echo(line)
    typer.echo(f"{tenant_id}\t{_limits_line(after)}")


@tenants_app.command("suspend")
def tenants_suspend(tenant_id: TenantIdArg,
                    reason: Annotated[str, typer.Option("--reason", help="Why (recorded)")]) -> None:
    """Suspend a tenant: its API calls are refused (403 tenant_suspended); its accepted messages are
    held by the workers, not lost."""
    t = _with_store("suspend", lambda store: store.suspend(tenant_id, reason, utcnow(), actor=cli_actor()))
    typer.echo(f"tenant {tenant_id} suspended since {t['suspended_at'].isoformat()}: {t['suspend_reason']}")


@tenants_app.command("resume")
def tenants_resume(tenant_id: TenantIdArg) -> None:
    """Make a suspended tenant active again; its held messages go on."""
    _with_store("resume", lambda store: store.resume(tenant_id, utcnow(), actor=cli_actor()))
    typer.echo(f"tenant {tenant_id} active")


@tenants_app.command("keys")
def tenants_keys(tenant_id: TenantIdArg) -> None:
    """A tenant's API keys: id, prefix, created, active or revoked (never the keys themselves)."""
    keys = _with_store("keys", lambda store: store.list_keys(tenant_id))
    if keys is None:
        raise _fail("keys", f"no tenant {tenant_id}")
    for k in keys:
        typer.echo(_key_line(k))


@tenants_app.command("rotate-key")
def tenants_rotate_key(
    tenant_id: TenantIdArg,
    revoke_existing: Annotated[bool, typer.Option("--revoke-existing",
                                                  help="Revoke the tenant's other keys now")] = False,
) -> None:
    """Issue a new API key and print it (shown only this once). The other keys keep working until
    revoked, unless --revoke-existing."""
    key_id, key = _with_store("rotate-key", lambda store: store.rotate_key(tenant_id, utcnow(), revoke_existing,
                                                                           actor=cli_actor()))
    typer.echo(f"tenant: {tenant_id}\napi key: {key}\nkey id: {key_id}\n(store it now: only its hash is kept)")
    if revoke_existing:
        typer.echo("every other key of the tenant is revoked")


@tenants_app.command("revoke-key")
def tenants_revoke_key(tenant_id: TenantIdArg,
                       key_id: Annotated[str, typer.Argument(help="Key id (see `msgcore tenants keys`)")]) -> None:
    """Revoke an API key; requests with it are refused (within 10 s on running API processes)."""
    k = _with_store("revoke-key", lambda store: store.revoke_key(tenant_id, key_id, utcnow(), actor=cli_actor()))
    typer.echo(f"key {key_id} of tenant {tenant_id} revoked at {k['revoked_at'].isoformat()}")


@tenants_app.command("history")
def tenants_history(tenant_id: TenantIdArg,
                    limit: Annotated[int, typer.Option(min=1, max=1000, help="Last N changes")] = 50) -> None:
    """Recorded changes of a tenant, oldest first: time, actor, what."""

    async def fetch(store: Any) -> tuple[bool, list[dict[str, Any]]]:
        return await store.get(tenant_id) is not None, await store.history(tenant_id, limit)

    exists, changes = _with_store("history", fetch)
    if not exists and not changes:
        raise _fail("history", f"no tenant {tenant_id}")
    for c in changes:
        detail = ", ".join(f"{k}={v}" for k, v in c["change"].items() if k != "action")
        typer.echo(f"{c['at'].isoformat()}\t{c['actor']}\t{c['change'].get('action')}\t{detail}")
