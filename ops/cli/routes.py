"""`msgcore routes ...`: SMSC routes: list, add, update, disable, enable, show, history.

`routes add` and `routes update` take the same route fields: they are declared once, in RouteOptions,
and `with_route_options` makes them the options of both commands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar, get_type_hints

import typer
from pydantic import ValidationError

from core.domain.events import utcnow
from core.domain.routing import Route, RouteStatus
from core.store.errors import RouteNotDrained
from core.store.routes import RouteStore
from ops import components
from ops.cli.common import cli_actor, cli_settings

T = TypeVar("T")

routes_app = typer.Typer(no_args_is_help=True, help="SMSC routes.")

RouteIdArg = Annotated[str, typer.Argument(help="Route id")]
TonNpiOpt = Annotated[str | None, typer.Option(help="A number, or 'auto' (source only: derived from the sender)")]
TON_NPI = ("source_ton", "source_npi", "dest_ton", "dest_npi")
BREAKER_OPTIONS = {"breaker_failures": "max_failures", "breaker_cool_down": "cool_down_s"}


@dataclasses.dataclass(frozen=True)
class RouteOptions:
    """The route fields given on the command line of `routes add` / `routes update` (None = not given)."""

    host: Annotated[str | None, typer.Option("--host", help="SMSC host")] = None
    port: Annotated[int | None, typer.Option("--port", help="SMSC port")] = None
    system_id: Annotated[str | None, typer.Option("--system-id", help="SMPP system_id")] = None
    password: Annotated[str | None, typer.Option("--password", help="SMPP password (never printed)")] = None
    system_type: Annotated[str | None, typer.Option("--system-type", help="SMPP system_type")] = None
    priority: Annotated[int | None, typer.Option("--priority", help="1 = highest")] = None
    weight: Annotated[int | None, typer.Option(
        "--weight", help="Share among routes of equal priority (smart)")] = None
    prefix: Annotated[list[str] | None, typer.Option(
        "--prefix",
        help="Destination prefix, repeatable (longest match wins; \"\" = default route); replaces the list")] = None
    tps: Annotated[int | None, typer.Option(
        "--tps", help="Submit_sm per second across all binds (0 = no limit)")] = None
    binds: Annotated[int | None, typer.Option("--binds", help="Number of binds")] = None
    bind_type: Annotated[str | None, typer.Option("--bind-type", help="transceiver or transmitter_receiver")] = None
    window: Annotated[int | None, typer.Option("--window", help="Outstanding submit_sm per bind")] = None
    partitions: Annotated[int | None, typer.Option(
        "--partitions", help="Split the send topics by hash of message id, one owner each (1-64); changes only "
                             "while the route is disabled and drained")] = None
    price_per_part: Annotated[int | None, typer.Option(
        "--price-per-part", help="Price per SMS part, minor units")] = None
    currency: Annotated[str | None, typer.Option("--currency", help="ISO currency of the price")] = None
    group: Annotated[str | None, typer.Option("--group", help="Route group")] = None
    strategy: Annotated[str | None, typer.Option("--strategy", help="failover, load_balance or smart")] = None
    source_ton: TonNpiOpt = None
    source_npi: TonNpiOpt = None
    dest_ton: TonNpiOpt = None
    dest_npi: TonNpiOpt = None
    on_unknown_outcome: Annotated[str | None, typer.Option("--on-unknown-outcome", help="resend or hold")] = None
    # E-mail routes (sent by `msgcore mailer`; --price-per-part is then the price per e-mail).
    kind: Annotated[str | None, typer.Option("--kind", help="smpp (default), smtp or http (e-mail)")] = None
    tls: Annotated[str | None, typer.Option("--tls", help="smtp: none, starttls or implicit")] = None
    username: Annotated[str | None, typer.Option("--username", help="smtp: login user (and --password)")] = None
    pool: Annotated[int | None, typer.Option("--pool", help="e-mail: SMTP connections / HTTP calls in flight")] = None
    provider: Annotated[str | None, typer.Option("--provider", help="http: sendgrid")] = None
    base_url: Annotated[str | None, typer.Option("--base-url", help="http: the provider's API base URL")] = None
    api_key: Annotated[str | None, typer.Option("--api-key", help="http: the provider's key (never printed)")] = None
    breaker_failures: Annotated[int | None, typer.Option(
        "--breaker-failures", help="e-mail: failures within the window that open the circuit breaker")] = None
    breaker_cool_down: Annotated[float | None, typer.Option(
        "--breaker-cool-down", help="e-mail: seconds the breaker stays open before a probe")] = None

    def fields(self) -> dict[str, Any]:
        """The Route fields given (`prefix` as `prefixes`, TON/NPI as numbers, `auto` as None); a TON/NPI
        that is not a number is a usage error."""
        fields: dict[str, Any] = {}
        for name, value in dataclasses.asdict(self).items():
            if value is None:
                continue
            if name == "prefix":
                fields["prefixes"] = tuple(value)
            elif name in BREAKER_OPTIONS:
                fields.setdefault("breaker", {})[BREAKER_OPTIONS[name]] = value
            elif name in TON_NPI:
                fields[name] = _ton_npi(name, value)
            else:
                fields[name] = value
        return fields


def _ton_npi(name: str, value: str) -> int | None:
    if value == "auto" and name.startswith("source"):
        return None
    if value.isdigit():
        return int(value)
    raise typer.BadParameter(f"--{name.replace('_', '-')} must be a number"
                             + (" or 'auto'" if name.startswith("source") else ""))


def with_route_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command`, with its `options: RouteOptions` parameter replaced by one option per RouteOptions
    field (same place in the signature, so in `--help`); it is called with the RouteOptions built
    from them."""
    hints = get_type_hints(RouteOptions, include_extras=True)
    names = [f.name for f in dataclasses.fields(RouteOptions)]
    expanded = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                  annotation=hints[name]) for name in names]
    signature = inspect.signature(command, eval_str=True)
    params = [p for old in signature.parameters.values() for p in (expanded if old.name == "options" else [old])]

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> None:
        options = RouteOptions(**{name: kwargs.pop(name) for name in names})
        command(**kwargs, options=options)

    wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    return wrapper


def _fail(command: str, message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"msgcore routes {command}: {message}", err=True)
    return typer.Exit(code)


def _build_route(command: str, route_id: str, data: dict[str, Any]) -> Route:
    try:
        return Route.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'route'}: {err['msg']}"
                             for err in e.errors(include_url=False))
        raise _fail(command, f"invalid route {route_id}: {problems}", 2) from e


def _route_store_call(fn: Callable[[RouteStore], Awaitable[T]]) -> T:
    """Run `fn(store)` against the RouteStore of the configured database."""
    s = cli_settings("cli")

    async def go() -> T:
        async with components.database(s, "cli") as db:
            return await fn(RouteStore(db))

    try:
        return asyncio.run(go())
    except RouteNotDrained as e:
        raise _fail("update", str(e)) from e


def _show_value(key: str, value: Any) -> str:
    if key in ("password", "api_key"):
        return "***"
    if isinstance(value, list | tuple):
        return ",".join(f'"{v}"' if v == "" else str(v) for v in value)
    return "auto" if value is None else str(value)


@routes_app.command("list")
def routes_list() -> None:
    """Routes with their live status."""

    async def fetch(store: RouteStore) -> tuple[list[Route], dict[str, RouteStatus]]:
        return await store.list(), await store.statuses(utcnow())

    routes, status = _route_store_call(fetch)
    for r in routes:
        typer.echo(f"{r.id}\t{r.host}:{r.port}\tpriority={r.priority}\tprefixes={','.join(r.prefixes) or '*'}\t"
                   f"price_per_part={r.price_per_part} {r.currency}\t{'enabled' if r.enabled else 'disabled'}\t"
                   f"{status.get(r.id, 'down')}")


@routes_app.command("add")
@with_route_options
def routes_add(
    route_id: RouteIdArg,
    options: RouteOptions,
    disabled: Annotated[bool, typer.Option("--disabled", help="Add it disabled")] = False,
) -> None:
    """Add a route (fields not given take their defaults). Connectors and the router pick it up within
    seconds, without a restart. Recorded in the route's history."""
    route = _build_route("add", route_id, {**options.fields(), "id": route_id, "enabled": not disabled})
    actor = cli_actor()

    async def add(store: RouteStore) -> bool:
        if await store.get(route_id) is not None:
            return False
        await store.upsert(route, actor=actor, now=utcnow())
        return True

    if not _route_store_call(add):
        raise _fail("add", f"route {route_id} exists: change it with `msgcore routes update {route_id} ...`")
    typer.echo(f"route {route_id} added ({'disabled' if disabled else 'enabled'}): {route.host}:{route.port} "
               f"priority={route.priority} prefixes={_show_value('prefixes', route.prefixes)} "
               f"strategy={route.strategy.value}")


@routes_app.command("update")
@with_route_options
def routes_update(route_id: RouteIdArg, options: RouteOptions) -> None:
    """Change the given fields of a route; the others keep their values. A connection change (host,
    port, credentials, binds, window, TPS, ...) makes its connector rebind within seconds."""
    fields = options.fields()
    if not fields:
        raise _fail("update", "nothing to change: give at least one option (see `msgcore routes update --help`)", 2)
    actor = cli_actor()

    async def update(store: RouteStore) -> tuple[Route, Route] | None:
        current = await store.get(route_id)
        if current is None:
            return None
        merged = {**current.model_dump(), **fields}
        if "breaker" in fields:  # the breaker options given change only their own settings
            merged["breaker"] = {**current.breaker.model_dump(), **fields["breaker"]}
        route = _build_route("update", route_id, merged)
        if route != current:
            await store.upsert(route, actor=actor, now=utcnow())
        return current, route

    result = _route_store_call(update)
    if result is None:
        raise _fail("update", f"no route {route_id} (see `msgcore routes list`)")
    before, after = (r.model_dump(mode="json") for r in result)
    diff = [f"{k}: {_show_value(k, before[k])} -> {_show_value(k, after[k])}" for k in after if before[k] != after[k]]
    typer.echo(f"route {route_id} updated: {'; '.join(diff)}" if diff else f"route {route_id}: nothing changed")


def _set_enabled(command: str, route_id: str, enabled: bool) -> None:
    actor = cli_actor()

    async def go(store: RouteStore) -> tuple[Any, Any]:
        before = await store.get(route_id)
        return before, await store.set_enabled(route_id, enabled, actor=actor, now=utcnow())

    before, after = _route_store_call(go)
    if after is None:
        raise _fail(command, f"no route {route_id} (see `msgcore routes list`)")
    state = "enabled" if enabled else "disabled"
    typer.echo(f"route {route_id} {state}" if before.enabled != enabled else f"route {route_id} was already {state}")


@routes_app.command("disable")
def routes_disable(route_id: RouteIdArg) -> None:
    """Stop using a route: the router skips it, its connector finishes what it holds and unbinds."""
    _set_enabled("disable", route_id, False)


@routes_app.command("enable")
def routes_enable(route_id: RouteIdArg) -> None:
    """Use a route again: its connector binds within seconds."""
    _set_enabled("enable", route_id, True)


@routes_app.command("show")
def routes_show(route_id: RouteIdArg) -> None:
    """Every field of a route (password masked) and its live status."""

    async def go(store: RouteStore) -> tuple[Route | None, dict[str, RouteStatus]]:
        return await store.get(route_id), await store.statuses(utcnow())

    route, status = _route_store_call(go)
    if route is None:
        raise _fail("show", f"no route {route_id} (see `msgcore routes list`)")
    for key, value in route.model_dump(mode="json").items():
        typer.echo(f"{key}\t{_show_value(key, value)}")
    typer.echo(f"status\t{status.get(route_id, 'down')}")


def _change_line(previous: dict[str, Any], change: dict[str, Any]) -> str:
    """What one recorded change did: the fields at creation, or each changed field's before -> after."""
    snapshot = change["route"]
    if not previous and set(change["changed"]) >= set(snapshot) - {"id"}:
        return "created (or first recorded): " + " ".join(
            f"{k}={_show_value(k, snapshot[k])}" for k in ("host", "port", "priority", "prefixes", "enabled"))
    return "; ".join(f"{k}: {_show_value(k, previous.get(k))} -> {_show_value(k, snapshot.get(k))}"
                     if previous else f"{k}={_show_value(k, snapshot.get(k))}" for k in change["changed"])


@routes_app.command("history")
def routes_history(
    route_id: RouteIdArg,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="The last this many changes")] = 50,
) -> None:
    """Who changed the route, when, and what (oldest first)."""

    async def go(store: RouteStore) -> tuple[list[dict[str, Any]], Route | None]:
        return await store.history(route_id, limit), await store.get(route_id)

    changes, route = _route_store_call(go)
    if not changes and route is None:
        raise _fail("history", f"no route {route_id} (see `msgcore routes list`)")
    previous: dict[str, Any] = {}
    for c in changes:
        typer.echo(f"{c['at'].isoformat()}\t{c['actor']}\t{_change_line(previous, c) or 'no change'}")
        previous = c["route"]
    if not changes:
        typer.echo(f"no recorded changes of route {route_id}", err=True)
