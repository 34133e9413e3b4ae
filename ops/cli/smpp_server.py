"""`msgcore smpp-server`: the SMPP server ESMEs bind to (smsc/esme_server/)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from core.config import Settings
from core.domain.events import utcnow
from ops import components
from ops.cli.common import cli_settings, run_component

log = logging.getLogger(__name__)

app = typer.Typer()

DEFAULT_PORT = 2776


async def smpp_server_main(settings: Settings, port: int, commit_window_ms: float, receipt_timeout_s: float) -> None:
    """Run the server until SIGTERM/SIGINT."""
    from smsc.esme_server.server import EsmeServer, EsmeServerConfig

    stop = components.stop_on_signals()
    config = EsmeServerConfig(port=port, commit_window_s=commit_window_ms / 1000, max_parts=settings.max_parts,
                              default_validity_s=settings.default_validity_s, receipt_timeout_s=receipt_timeout_s,
                              poll_s=settings.poll_interval_s)
    async with components.database(settings, "smpp-server") as db:
        await components.prepare(db)
        server = EsmeServer(db, config, utcnow)
        await server.start()
        await stop.wait()
        await server.stop()


@app.command("smpp-server")
def smpp_server(
    port: Annotated[int, typer.Option(envvar="MSGCORE_SMPP_PORT", help="TCP port on 127.0.0.1")] = DEFAULT_PORT,
    commit_window_ms: Annotated[float, typer.Option(
        help="Group commit: submits arriving within this many ms share one transaction")] = 5.0,
    receipt_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for a deliver_sm_resp before sending the receipt again")] = 10.0,
) -> None:
    """The SMPP v3.4 server for ESMEs: binds, submit_sm, query_sm, cancel_sm, receipts back."""
    s = cli_settings("smpp-server")
    run_component("smpp-server", smpp_server_main(s, port, commit_window_ms, receipt_timeout))
