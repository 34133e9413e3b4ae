"""The `msgcore` command line: run components, the embedded default, and admin tasks.

One module per command group; this one only assembles them (`app`) and is the console script's
entry point (`main`, see pyproject.toml). `python -m ops.cli <command>` runs the same app.
"""

from __future__ import annotations

import typer

from ops.cli import mail, run, trace, verify
from ops.cli.campaigns import campaigns_app
from ops.cli.deadletters import dead_letters_app
from ops.cli.projections import projections_app, reporting_app
from ops.cli.routes import routes_app
from ops.cli.smpp_accounts import smpp_accounts_app
from ops.cli.smpp_server import app as smpp_server_app
from ops.cli.suppressions import suppressions_app
from ops.cli.tenants import tenants_app

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="msgcore: event-sourced SMS core.")
# Unnamed: their commands sit at the top level (`msgcore up`, `msgcore verify`, ...), in this order.
app.add_typer(run.app)
app.add_typer(verify.app)
app.add_typer(trace.app)
app.add_typer(tenants_app, name="tenants")
app.add_typer(campaigns_app, name="campaigns")
app.add_typer(routes_app, name="routes")
app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(projections_app, name="projections")
app.add_typer(reporting_app, name="reporting")
app.add_typer(smpp_accounts_app, name="smpp-accounts")
app.add_typer(suppressions_app, name="suppressions")
app.add_typer(smpp_server_app)
app.add_typer(mail.app)


def main() -> None:
    app(prog_name="msgcore")
