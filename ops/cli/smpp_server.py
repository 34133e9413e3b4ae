"""`msgcore smpp-server`: the SMPP server ESMEs bind to (smsc/esme_server/)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import typer

from core.config import Settings
from core.domain.events import utcnow
from core.metrics_server import metrics_endpoint
from ops import components
from ops.cli.common import cli_settings, run_component

log = logging.getLogger(__name__)

app = typer.Typer()

DEFAULT_PORT = 2776
DEFAULT_TLS_PORT = 3550


@dataclass(frozen=True)
class TlsOptions:
    cert: str
    key: str
    port: int = DEFAULT_TLS_PORT


async def smpp_server_main(settings: Settings, port: int, commit_window_ms: float, receipt_timeout_s: float,
                           bind_lease_s: float = 15.0, tls: TlsOptions | None = None) -> None:
    """Run the server until SIGTERM/SIGINT."""
    from smsc.esme_server.server import EsmeServer, EsmeServerConfig, tls_context

    stop = components.stop_on_signals()
    config = EsmeServerConfig(port=port, commit_window_s=commit_window_ms / 1000, max_parts=settings.max_parts,
                              default_validity_s=settings.default_validity_s, receipt_timeout_s=receipt_timeout_s,
                              poll_s=settings.poll_interval_s, bind_lease_s=bind_lease_s,
                              tls=tls_context(tls.cert, tls.key) if tls else None,
                              tls_port=tls.port if tls else DEFAULT_TLS_PORT)
    async with (components.database(settings, "smpp-server") as db,
                metrics_endpoint(settings, "smpp-server", db)):
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
    bind_lease: Annotated[float, typer.Option(
        min=1.0, help="max_binds across processes: a bind of a process that died stops counting after this "
                      "many seconds")] = 15.0,
    tls_cert: Annotated[str | None, typer.Option(
        envvar="MSGCORE_SMPP_TLS_CERT", help="PEM certificate (chain): also serve SMPP over TLS on --tls-port")] = None,
    tls_key: Annotated[str | None, typer.Option(
        envvar="MSGCORE_SMPP_TLS_KEY", help="PEM private key of --tls-cert")] = None,
    tls_port: Annotated[int, typer.Option(envvar="MSGCORE_SMPP_TLS_PORT",
                                          help="TCP port on 127.0.0.1 for SMPP over TLS")] = DEFAULT_TLS_PORT,
) -> None:
    """The SMPP v3.4 server for ESMEs: binds, submit_sm, query_sm, cancel_sm, receipts back."""
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    tls = TlsOptions(tls_cert, tls_key, tls_port) if tls_cert and tls_key else None
    s = cli_settings("smpp-server")
    run_component("smpp-server", smpp_server_main(s, port, commit_window_ms, receipt_timeout, bind_lease, tls))
