"""The `msgcore` command line: run components, the embedded default, and admin tasks."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from core.config import Settings
from ops import components
from ops.cli_campaigns import campaigns_app
from ops.cli_common import cli_actor, cli_settings
from ops.cli_tenants import tenants_app

if TYPE_CHECKING:
    from core.store.deadletters import RequeueResult

app = typer.Typer(no_args_is_help=True, add_completion=False, help="msgcore: event-sourced SMS core.")
routes_app = typer.Typer(no_args_is_help=True, help="SMSC routes.")
dead_letters_app = typer.Typer(no_args_is_help=True,
                               help="Dead-lettered (and failed) messages: list, show, requeue (appends events).")
app.add_typer(tenants_app, name="tenants")  # ops/cli_tenants.py
app.add_typer(campaigns_app, name="campaigns")  # ops/cli_campaigns.py
app.add_typer(routes_app, name="routes")
app.add_typer(dead_letters_app, name="dead-letters")
projections_app = typer.Typer(no_args_is_help=True, help="The PostgreSQL reporting projection: lag, rebuild.")
reporting_app = typer.Typer(no_args_is_help=True, help="The reporting schema for BI tools.")
app.add_typer(projections_app, name="projections")
app.add_typer(reporting_app, name="reporting")


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

    settings = cli_settings("up", need_store=False)
    run_up(settings)


@app.command()
def api() -> None:
    """The REST API (submission, status, audit trail)."""
    from api.server import serve

    serve(cli_settings("api"))


@app.command()
def router() -> None:
    """Route accepted messages."""
    s = cli_settings("router")
    _run("router", components.router_main(s))


@app.command()
def scheduler() -> None:
    """Timed jobs: receipt expiry (with its bill), due timers, campaign release and completion."""
    s = cli_settings("scheduler")
    _run("scheduler", components.scheduler_main(s))


@app.command()
def connector(route: Annotated[list[str] | None, typer.Option(help="Route id(s); default: all SMPP routes")] = None
              ) -> None:
    """The SMPP connector(s): send routed messages, record receipts."""
    s = cli_settings("connector")
    _run("connector", components.connector_main(s, route or []))


@app.command()
def projector() -> None:
    """Stream the event log into the PostgreSQL reporting schema."""
    s = cli_settings("projector")
    _run("projector", components.projector_main(s))


@app.command()
def migrate() -> None:
    """Apply pending reporting-schema migrations (idempotent; each is recorded in <schema>.migrations).
    The projector and `msgcore up` also apply them on start."""
    from projections.schema import migrate as apply_migrations

    s = cli_settings("migrate")
    pg_url = _need_pg(s, "migrate")
    applied = asyncio.run(apply_migrations(pg_url, s.reporting_schema))
    if applied:
        typer.echo(f"schema {s.reporting_schema}: applied {', '.join(applied)}")
    else:
        typer.echo(f"schema {s.reporting_schema}: up to date")


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
    faults: dict[str, Any] = {k: v for k, v in {
        "error_ratio": error_ratio, "permanent_share": permanent_share, "throttle_tps": throttle_tps,
        "drop_after_pdus": drop_after_pdus, "receipt_mode": receipt_mode, "malformed_ratio": malformed_ratio,
        "seed": seed}.items() if v is not None}
    if receipt_stat is not None:
        if "=" in receipt_stat:
            try:
                faults["receipt_stat_mix"] = {k.strip(): float(v) for k, v in
                                              (item.split("=", 1) for item in receipt_stat.split(",") if item.strip())}
            except ValueError as e:
                raise typer.BadParameter(f"--receipt-stat: expected STAT=WEIGHT,...: {e}") from e
        else:
            faults["receipt_stat"] = receipt_stat
    _run("smsc-sim", components.simulator_main(s, port, receipt_delay, str(journal) if journal else None,
                                               control_port, faults))


@routes_app.command("list")
def routes_list() -> None:
    """Routes with their live status."""
    from core.domain.events import utcnow
    from core.store.routes import RouteStore

    s = cli_settings("cli")

    async def fetch():  # type: ignore[no-untyped-def]
        async with components.database(s, "cli") as db:
            store = RouteStore(db)
            return await store.list(), await store.statuses(utcnow())

    routes, status = asyncio.run(fetch())
    for r in routes:
        typer.echo(f"{r.id}\t{r.host}:{r.port}\tpriority={r.priority}\tprefixes={','.join(r.prefixes) or '*'}\t"
                   f"price_per_part={r.price_per_part} {r.currency}\t{'enabled' if r.enabled else 'disabled'}\t"
                   f"{status.get(r.id, 'down')}")


# ---- routes: add, update, disable, enable, show, history ------------------------------------------

HostOpt = Annotated[str | None, typer.Option("--host", help="SMSC host")]
PortOpt = Annotated[int | None, typer.Option("--port", help="SMSC port")]
SystemIdOpt = Annotated[str | None, typer.Option("--system-id", help="SMPP system_id")]
PasswordOpt = Annotated[str | None, typer.Option("--password", help="SMPP password (never printed)")]
SystemTypeOpt = Annotated[str | None, typer.Option("--system-type", help="SMPP system_type")]
PriorityOpt = Annotated[int | None, typer.Option("--priority", help="1 = highest")]
WeightOpt = Annotated[int | None, typer.Option("--weight", help="Share among routes of equal priority (smart)")]
PrefixOpt = Annotated[list[str] | None, typer.Option(
    "--prefix", help="Destination prefix, repeatable (longest match wins; \"\" = default route); replaces the list")]
TpsOpt = Annotated[int | None, typer.Option("--tps", help="Submit_sm per second across all binds (0 = no limit)")]
BindsOpt = Annotated[int | None, typer.Option("--binds", help="Number of binds")]
BindTypeOpt = Annotated[str | None, typer.Option("--bind-type", help="transceiver or transmitter_receiver")]
WindowOpt = Annotated[int | None, typer.Option("--window", help="Outstanding submit_sm per bind")]
PriceOpt = Annotated[int | None, typer.Option("--price-per-part", help="Price per SMS part, minor units")]
CurrencyOpt = Annotated[str | None, typer.Option("--currency", help="ISO currency of the price")]
GroupOpt = Annotated[str | None, typer.Option("--group", help="Route group")]
StrategyOpt = Annotated[str | None, typer.Option("--strategy", help="failover, load_balance or smart")]
TonNpiOpt = Annotated[str | None, typer.Option(help="A number, or 'auto' (source only: derived from the sender)")]
UnknownOpt = Annotated[str | None, typer.Option("--on-unknown-outcome", help="resend or hold")]
RouteIdArg = Annotated[str, typer.Argument(help="Route id")]


def _route_fields(**options: Any) -> dict[str, Any]:
    """The Route fields given on the command line (None = not given)."""
    fields: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name == "prefix":
            fields["prefixes"] = tuple(value)
        elif name in ("source_ton", "source_npi", "dest_ton", "dest_npi"):
            if value == "auto" and name.startswith("source"):
                fields[name] = None
            elif value.isdigit():
                fields[name] = int(value)
            else:
                raise typer.BadParameter(f"--{name.replace('_', '-')} must be a number"
                                         + (" or 'auto'" if name.startswith("source") else ""))
        else:
            fields[name] = value
    return fields


def _fail(command: str, message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"msgcore routes {command}: {message}", err=True)
    return typer.Exit(code)


def _build_route(command: str, route_id: str, data: dict[str, Any]) -> Any:
    from core.domain.routing import Route

    try:
        return Route.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'route'}: {err['msg']}"
                             for err in e.errors(include_url=False))
        raise _fail(command, f"invalid route {route_id}: {problems}", 2) from e


def _route_store_call(fn: Any) -> Any:
    """Run `fn(store)` against the RouteStore of the configured database."""
    from core.store.routes import RouteStore

    s = cli_settings("cli")

    async def go() -> Any:
        async with components.database(s, "cli") as db:
            return await fn(RouteStore(db))

    return asyncio.run(go())


def _show_value(key: str, value: Any) -> str:
    if key == "password":
        return "***"
    if isinstance(value, list | tuple):
        return ",".join(f'"{v}"' if v == "" else str(v) for v in value)
    return "auto" if value is None else str(value)


@routes_app.command("add")
def routes_add(
    route_id: RouteIdArg,
    host: HostOpt = None, port: PortOpt = None, system_id: SystemIdOpt = None, password: PasswordOpt = None,
    system_type: SystemTypeOpt = None, priority: PriorityOpt = None, weight: WeightOpt = None,
    prefix: PrefixOpt = None, tps: TpsOpt = None, binds: BindsOpt = None, bind_type: BindTypeOpt = None,
    window: WindowOpt = None, price_per_part: PriceOpt = None, currency: CurrencyOpt = None,
    group: GroupOpt = None, strategy: StrategyOpt = None, source_ton: TonNpiOpt = None,
    source_npi: TonNpiOpt = None, dest_ton: TonNpiOpt = None, dest_npi: TonNpiOpt = None,
    on_unknown_outcome: UnknownOpt = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="Add it disabled")] = False,
) -> None:
    """Add a route (fields not given take their defaults). Connectors and the router pick it up within
    seconds, without a restart. Recorded in the route's history."""
    from core.domain.events import utcnow

    fields = _route_fields(host=host, port=port, system_id=system_id, password=password, system_type=system_type,
                           priority=priority, weight=weight, prefix=prefix, tps=tps, binds=binds,
                           bind_type=bind_type, window=window, price_per_part=price_per_part, currency=currency,
                           group=group, strategy=strategy, source_ton=source_ton, source_npi=source_npi,
                           dest_ton=dest_ton, dest_npi=dest_npi, on_unknown_outcome=on_unknown_outcome)
    route = _build_route("add", route_id, {**fields, "id": route_id, "enabled": not disabled})
    actor = cli_actor()

    async def add(store: Any) -> bool:
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
def routes_update(
    route_id: RouteIdArg,
    host: HostOpt = None, port: PortOpt = None, system_id: SystemIdOpt = None, password: PasswordOpt = None,
    system_type: SystemTypeOpt = None, priority: PriorityOpt = None, weight: WeightOpt = None,
    prefix: PrefixOpt = None, tps: TpsOpt = None, binds: BindsOpt = None, bind_type: BindTypeOpt = None,
    window: WindowOpt = None, price_per_part: PriceOpt = None, currency: CurrencyOpt = None,
    group: GroupOpt = None, strategy: StrategyOpt = None, source_ton: TonNpiOpt = None,
    source_npi: TonNpiOpt = None, dest_ton: TonNpiOpt = None, dest_npi: TonNpiOpt = None,
    on_unknown_outcome: UnknownOpt = None,
) -> None:
    """Change the given fields of a route; the others keep their values. A connection change (host,
    port, credentials, binds, window, TPS, ...) makes its connector rebind within seconds."""
    from core.domain.events import utcnow

    fields = _route_fields(host=host, port=port, system_id=system_id, password=password, system_type=system_type,
                           priority=priority, weight=weight, prefix=prefix, tps=tps, binds=binds,
                           bind_type=bind_type, window=window, price_per_part=price_per_part, currency=currency,
                           group=group, strategy=strategy, source_ton=source_ton, source_npi=source_npi,
                           dest_ton=dest_ton, dest_npi=dest_npi, on_unknown_outcome=on_unknown_outcome)
    if not fields:
        raise _fail("update", "nothing to change: give at least one option (see `msgcore routes update --help`)", 2)
    actor = cli_actor()

    async def update(store: Any) -> tuple[Any, Any] | None:
        current = await store.get(route_id)
        if current is None:
            return None
        route = _build_route("update", route_id, {**current.model_dump(), **fields})
        if route != current:
            await store.upsert(route, actor=actor, now=utcnow())
        return current, route

    result = _route_store_call(update)
    if result is None:
        raise _fail("update", f"no route {route_id} (see `msgcore routes list`)")
    before, after = (r.model_dump(mode="json") for r in result)
    diff = [f"{k}: {_show_value(k, before[k])} -> {_show_value(k, after[k])}" for k in after if before[k] != after[k]]
    typer.echo(f"route {route_id} updated: {'; '.join(diff)}" if diff else f"route {route_id}: nothing changed")


def _set_enabled_cli(command: str, route_id: str, enabled: bool) -> None:
    from core.domain.events import utcnow

    actor = cli_actor()

    async def go(store: Any) -> tuple[Any, Any]:
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
    _set_enabled_cli("disable", route_id, False)


@routes_app.command("enable")
def routes_enable(route_id: RouteIdArg) -> None:
    """Use a route again: its connector binds within seconds."""
    _set_enabled_cli("enable", route_id, True)


@routes_app.command("show")
def routes_show(route_id: RouteIdArg) -> None:
    """Every field of a route (password masked) and its live status."""
    from core.domain.events import utcnow

    async def go(store: Any) -> tuple[Any, Any]:
        return await store.get(route_id), await store.statuses(utcnow())

    route, status = _route_store_call(go)
    if route is None:
        raise _fail("show", f"no route {route_id} (see `msgcore routes list`)")
    for key, value in route.model_dump(mode="json").items():
        typer.echo(f"{key}\t{_show_value(key, value)}")
    typer.echo(f"status\t{status.get(route_id, 'down')}")


@routes_app.command("history")
def routes_history(
    route_id: RouteIdArg,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="The last this many changes")] = 50,
) -> None:
    """Who changed the route, when, and what (oldest first)."""

    async def go(store: Any) -> tuple[Any, Any]:
        return await store.history(route_id, limit), await store.get(route_id)

    changes, route = _route_store_call(go)
    if not changes and route is None:
        raise _fail("history", f"no route {route_id} (see `msgcore routes list`)")
    previous: dict[str, Any] = {}
    for c in changes:
        snapshot = c["route"]
        if not previous and set(c["changed"]) >= set(snapshot) - {"id"}:
            what = "created (or first recorded): " + " ".join(
                f"{k}={_show_value(k, snapshot[k])}" for k in ("host", "port", "priority", "prefixes", "enabled"))
        else:
            what = "; ".join(f"{k}: {_show_value(k, previous.get(k))} -> {_show_value(k, snapshot.get(k))}"
                             if previous else f"{k}={_show_value(k, snapshot.get(k))}" for k in c["changed"])
        typer.echo(f"{c['at'].isoformat()}\t{c['actor']}\t{what or 'no change'}")
        previous = snapshot
    if not changes:
        typer.echo(f"no recorded changes of route {route_id}", err=True)


# ---- dead letters -----------------------------------------------------------------------------------

StateOption = Annotated[str, typer.Option("--state", help="dead_lettered, or failed (operators may retry those too)")]


def _check_dl_state(state: str) -> None:
    from core.store.deadletters import REQUEUABLE_STATES

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
    from core.store.deadletters import list_dead_letters

    _check_dl_state(state)
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
    import json

    from core.domain.events import Event
    from core.domain.message import fold
    from core.store.eventstore import EventStore

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
    from core.domain.events import utcnow
    from core.store.deadletters import MAX_REQUEUE, RequeueResult, list_dead_letters, requeue
    from core.store.eventstore import EventStore

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
    _check_dl_state(state)
    if bool(message_ids) == all_:
        typer.echo("msgcore dead-letters requeue: give message ids, or --all (not both)", err=True)
        raise typer.Exit(2)
    if tenant is not None and not all_:
        typer.echo("msgcore dead-letters requeue: --tenant goes with --all", err=True)
        raise typer.Exit(2)
    s = cli_settings("cli")
    result = asyncio.run(_requeue_pages(s, None if all_ else message_ids, tenant, state, cli_actor(), reason))
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
    if not result.ok:
        raise typer.Exit(1)

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
    import psycopg
    from pymongo.errors import ConnectionFailure

    from core.domain.events import utcnow
    from ops.verify import VerifyError
    from ops.verify import verify as run_verify

    s = cli_settings("verify")

    async def go():  # type: ignore[no-untyped-def]
        async with components.database(s, "verify") as db:
            return await run_verify(db, s.pg_url or None, s.reporting_schema, utcnow(),
                                    stale_after_s=stale_after, lag_grace_s=lag_grace)

    try:
        report = asyncio.run(go())
    except (VerifyError, ConnectionFailure, psycopg.OperationalError) as e:  # config: unreachable or wrong schema
        typer.echo(f"msgcore verify: {e}", err=True)
        raise typer.Exit(2) from e
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
    c = report.counts
    typer.echo(f"messages={c['messages']} events={c['events']} terminal={c['terminal']} in_flight={c['in_flight']} "
               f"(backlog={c['in_backlog']} timer={c['on_timer']} receipt={c['awaiting_receipt']} "
               f"paused={c['paused']}) stuck={c['stuck']} billed={c['billed']} "
               f"possible_duplicates={c['possible_duplicates']} multi_sent={c['multi_sent']}")
    typer.echo(f"topics={c['topics']} positions={c['positions']} checkpoints={c['checkpoints']} "
               f"attempts_open={c['attempts_open']} in_motion={c['in_motion']}")
    if report.reporting_checked:
        typer.echo(f"reporting schema {s.reporting_schema}: projected={c['projected']} "
                   f"not_yet_projected={c['not_yet_projected']} projector_position="
                   f"{report.projector_position.isoformat() if report.projector_position else 'unknown'}")
    else:
        typer.echo("no PostgreSQL configured (MSGCORE_PG_URL): only the MongoDB checks ran")
    if report.ok:
        typer.echo("OK: no discrepancies")
        return
    total = sum(report.discrepancy_counts.values())
    kinds = ", ".join(f"{k}={n}" for k, n in sorted(report.discrepancy_counts.items()))
    typer.echo(f"FAILED: {total} discrepancies ({kinds})")
    raise typer.Exit(1)


# ---- projections, trace, reporting --------------------------------------------------------------------

def _need_pg(s: Settings, command: str) -> str:
    if not s.pg_url:
        typer.echo(f"msgcore {command}: no PostgreSQL: set MSGCORE_PG_URL, or start the embedded default with "
                   "`msgcore up`", err=True)
        raise typer.Exit(2)
    return s.pg_url


@projections_app.command("status")
def projections_status(
    count_limit: Annotated[int, typer.Option(min=1, help="Stop counting the events behind at this many")
                           ] = 100_000,
) -> None:
    """Checkpoint time, cluster time, newest event, events behind, and whether the resume token is
    still in the oplog. Exit 0 if the projection can follow on, 1 if it needs an operator."""
    import psycopg
    from pymongo.errors import PyMongoError

    from projections.status import format_status, projection_status

    s = cli_settings("cli")
    pg_url = _need_pg(s, "projections status")

    async def go():  # type: ignore[no-untyped-def]
        async with components.database(s, "cli") as db:
            return await projection_status(db["events"], pg_url, s.reporting_schema, count_limit=count_limit)

    try:
        status = asyncio.run(go())
    except (psycopg.Error, PyMongoError) as e:
        typer.echo(f"msgcore projections status: {e.__class__.__name__}: {e}", err=True)
        raise typer.Exit(2) from e
    for line in format_status(status):
        typer.echo(line)
    if not status.ok:
        raise typer.Exit(1)


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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from projections.rebuild import RebuildError, rebuild

    s = cli_settings("cli")
    pg_url = _need_pg(s, "projections rebuild")
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("events"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        transient=False)
    task = progress.add_task("replaying the log", total=None)

    def on_progress(done: int, estimate: int) -> None:
        progress.update(task, completed=done, total=estimate)

    def on_phase(text: str) -> None:
        from datetime import UTC

        progress.console.print(f"{datetime.now(UTC).strftime('%H:%M:%SZ')} {text}", highlight=False)

    async def go():  # type: ignore[no-untyped-def]
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
    typer.echo(f"schema {result.schema} rebuilt from the log: {result.replayed} events replayed, "
               f"{result.followed} followed live, {result.seconds:.1f}s")
    typer.echo(f"previous schema kept as: {result.old_schema or '- (there was none)'}")
    if result.dropped:
        typer.echo(f"dropped: {', '.join(result.dropped)}")
    if result.stopped_live:
        typer.echo(f"live projector session(s) {', '.join(map(str, result.stopped_live))} were stopped; "
                   "the projector resumes on the new schema by itself")


@app.command()
def trace(
    query: Annotated[str, typer.Argument(help="Message id, SMSC message id, or phone number (E.164)")],
    max_messages: Annotated[int, typer.Option(min=1, max=1000, help="Show at most this many messages")] = 20,
    scan_time: Annotated[float, typer.Option(min=1, help="Phone numbers: seconds a lookup may take when the "
                                                         "events have no index on the number")] = 30.0,
) -> None:
    """Print the full event history from the log (seq, UTC time, type, route, key data) of the
    message(s) named. Exit 1 if none is found."""
    from ops.trace import format_trace
    from ops.trace import trace as run_trace

    s = cli_settings("cli")

    async def go():  # type: ignore[no-untyped-def]
        async with components.database(s, "cli") as db:
            return await run_trace(db, query, max_messages=max_messages, scan_time_s=scan_time)

    result = asyncio.run(go())
    for line in format_trace(result):
        typer.echo(line)
    if not result.messages:
        typer.echo(f"msgcore trace: no message found for {query!r}", err=True)
        raise typer.Exit(1)


@reporting_app.command("grant-bi-role")
def reporting_grant_bi_role(
    role: Annotated[str, typer.Option(help="Read-only role for BI tools")] = "msgcore_bi",
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True,
                                          envvar="MSGCORE_BI_PASSWORD", help="Its password (prompted if not given)")
                        ] = "",
) -> None:
    """Create (or update) a read-only login role with SELECT on the reporting schema."""
    import inspect

    s = cli_settings("cli")
    try:
        from projections.bi_role import ensure_bi_role  # lazily: written alongside the reporting views
    except ImportError as e:
        typer.echo(f"msgcore reporting grant-bi-role: not available in this build ({e})", err=True)
        raise typer.Exit(2) from e
    pg_url = _need_pg(s, "reporting grant-bi-role")
    outcome = ensure_bi_role(pg_url, s.reporting_schema, role, password)
    if inspect.isawaitable(outcome):
        asyncio.run(outcome)  # type: ignore[arg-type]
    typer.echo(f"role {role}: read-only access to schema {s.reporting_schema} granted")


def main() -> None:
    app(prog_name="msgcore")


if __name__ == "__main__":
    sys.exit(main())
