"""What every `msgcore` command group needs: settings resolved for a command, and who is acting."""

from __future__ import annotations

import getpass

import typer
from pydantic import ValidationError

from core.config import Settings
from ops import components
from ops.logs import configure


def cli_settings(command: str, need_store: bool = True) -> Settings:
    """Settings from MSGCORE_* (a bad one is a usage error), logging configured for `command`, and
    the store URLs resolved (from the environment, or the endpoints `msgcore up` recorded): if none,
    the message names what to set and the exit code is 2."""
    try:
        settings = Settings()
    except ValidationError as e:
        raise typer.BadParameter(f"invalid MSGCORE_* setting: {e}") from e
    configure(command.split()[0], settings.log_level)
    if need_store:
        try:
            settings = components.resolve_urls(settings)
        except components.ConfigError as e:
            typer.echo(f"msgcore {command}: {e}", err=True)
            raise typer.Exit(2) from e
    return settings


def cli_actor() -> str:
    """Who runs this command, for audit records: `cli:<user>`."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in this environment (e.g. a container without one)
        return "cli"
