"""`msgcore mailer` (the e-mail sender of every enabled e-mail route) and `msgcore mail-sim` (a local
SMTP server, optionally SendGrid v3 over HTTP, keeping each mail as an .eml file, with faults)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from core.config import Settings
from core.domain.events import utcnow
from ops import components
from ops.cli.common import cli_settings, run_component

log = logging.getLogger(__name__)

app = typer.Typer()


@app.command()
def mailer(route: Annotated[list[str] | None, typer.Option(help="Route id(s); default: all e-mail routes")] = None
           ) -> None:
    """The e-mail sender: owns the send topics of the e-mail routes (smtp, http), sends, commits sent + billed."""
    s = cli_settings("mailer")
    run_component("mailer", mailer_main(s, route or []))


@app.command("mail-sim")
def mail_sim(
    port: Annotated[int, typer.Option(help="SMTP port on 127.0.0.1")] = 2525,
    http_port: Annotated[int | None, typer.Option(
        help="SendGrid v3 endpoint and control API (GET/PUT /faults, POST /reset) on 127.0.0.1; 0 = any free")] = None,
    sink: Annotated[Path | None, typer.Option(help="Keep the mails here; default <data dir>/mail-sim")] = None,
    api_key: Annotated[str, typer.Option(help="Bearer key the HTTP endpoint asks for (empty: any)")] = "",
    every_nth: Annotated[int, typer.Option(help="Fail every Nth call with a temporary error (0: off)")] = 0,
    failure_ratio: Annotated[float, typer.Option(help="Share of calls that fail (0..1)")] = 0.0,
    permanent_share: Annotated[float, typer.Option(help="Of those failures, the share that is permanent")] = 0.0,
    delay: Annotated[float, typer.Option(help="Seconds before each answer")] = 0.0,
    drop_ratio: Annotated[float, typer.Option(help="Share of calls whose connection drops before the answer")] = 0.0,
    events_url: Annotated[str, typer.Option(help="Post each mail's delivered/bounce/spamreport events (SendGrid "
                                            "format, signed) here, e.g. http://127.0.0.1:8080/v1/providers/mail/events")
                          ] = "",
    events_key: Annotated[Path | None, typer.Option(help="PEM P-256 key signing the events (created if missing; "
                                                    "default <data dir>/mail-sim-events.pem)")] = None,
) -> None:
    """A local e-mail provider for trying msgcore out and for tests."""
    s = cli_settings("mail-sim", need_store=False)
    faults = {"every_nth": every_nth, "failure_ratio": failure_ratio, "permanent_share": permanent_share,
              "delay_s": delay, "drop_ratio": drop_ratio}
    run_component("mail-sim", mail_sim_main(sink or s.data_dir / "mail-sim", port, http_port, api_key, faults,
                                            events_url, events_key or s.data_dir / "mail-sim-events.pem"))


async def mailer_main(settings: Settings, route_ids: list[str]) -> None:
    from core.metrics_server import metrics_endpoint
    from core.store.eventstore import EventStore
    from core.store.routes import RouteStore
    from core.workers.mailer_routes import MailerSet

    stop = components.stop_on_signals()
    async with components.database(settings, "mailer") as db, metrics_endpoint(settings, "mailer", db):
        await components.prepare(db)
        mailers = MailerSet(EventStore(db), RouteStore(db), utcnow, owner_prefix=components.worker_id("mailer"),
                            route_ids=route_ids, lease_s=settings.lease_s, batch_size=min(settings.batch_size, 200))
        log.info("mailer started (%s)%s", components.worker_id("mailer"),
                 f" for routes {sorted(route_ids)}" if route_ids else "")
        await mailers.run(stop)
        log.info("mailer stopped")


async def mail_sim_main(sink: Path, port: int, http_port: int | None, api_key: str, faults: dict[str, Any],
                        events_url: str = "", events_key: Path | None = None) -> None:
    from pydantic import ValidationError

    from ops.mail_sim.events import eventing_sim
    from ops.mail_sim.server import MailSim

    stop = components.stop_on_signals()
    try:
        sim = MailSim(sink, port=port, http_port=http_port, api_key=api_key, faults=faults) if not events_url else \
            eventing_sim(sink, events_url, events_key or sink / "events.pem", port=port, http_port=http_port,
                         api_key=api_key, faults=faults)  # ops/mail_sim/events.py
    except ValidationError as e:
        raise components.ConfigError(f"invalid fault settings: {e}") from e
    await sim.start()
    print(f"mail-sim: SMTP 127.0.0.1:{sim.port}"
          + (f", HTTP 127.0.0.1:{sim.http_port}" if sim.http_port else "")
          + f"; every mail kept as an .eml file under {sim.sink_dir.resolve()}", flush=True)
    await stop.wait()
    await sim.stop()
    log.info("mail-sim stopped: %s", sim.stats())
