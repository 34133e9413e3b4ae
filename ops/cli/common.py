"""What every `msgcore` command group needs: settings resolved for a command, who is acting, and how
a component's run or a missing store becomes a message and an exit code."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Coroutine
from typing import Any

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
    configure(command.split()[0], settings.log_level, settings.log_format)
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


def run_component(component: str, coro: Coroutine[Any, Any, None]) -> None:
    """Run a component until it stops: a configuration error exits 2 with its message, Ctrl-C quietly."""
    try:
        asyncio.run(coro)
    except components.ConfigError as e:
        typer.echo(f"msgcore {component}: {e}", err=True)
        raise typer.Exit(2) from e
    except KeyboardInterrupt:
        pass


def need_pg(s: Settings, command: str) -> str:
    """The PostgreSQL URL, or exit 2 naming what to set."""
    if not s.pg_url:
        typer.echo(f"msgcore {command}: no PostgreSQL: set MSGCORE_PG_URL, or start the embedded default with "
                   "`msgcore up`", err=True)
        raise typer.Exit(2)
    return s.pg_url
