"""The embedded default's e-mail route: `msgcore up` points route "mail" (kind smtp) at its mail-sim,
and mail-sim posts its delivery/bounce/complaint events back to the route's provider webhook,
signed with a key kept in the data directory (the route holds its public half, `events_key`)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from core.domain.routing import Route
from core.store.routes import RouteStore
from ops.mail_sim.events import load_or_create_key, verification_key

MAIL_ROUTE = "mail"
MAIL_SIM_PORT = 2525


def events_key_file(data_dir: Path) -> Path:
    return data_dir / "mail-sim-events.pem"


def mail_sim_events_args(data_dir: Path, api_url: str) -> list[str]:
    """mail-sim's options to post its events to the route's provider webhook of the api."""
    return ["--events-url", f"{api_url}/v1/providers/{MAIL_ROUTE}/events", "--events-key",
            str(events_key_file(data_dir))]


async def ensure_mail_route(routes: RouteStore, port: int, now: datetime, data_dir: Path | None = None) -> None:
    """Create route "mail" to 127.0.0.1:`port`, or follow the mail-sim to a new port (and, with
    `data_dir`, to its events key); a route "mail" that an operator pointed elsewhere is left alone."""
    events_key = verification_key(load_or_create_key(events_key_file(data_dir))[0]) if data_dir else ""
    current = await routes.get(MAIL_ROUTE)
    if current is None:
        route = Route(id=MAIL_ROUTE, kind="smtp", host="127.0.0.1", port=port, price_per_part=1, pool=4,
                      events_key=events_key)
        await routes.upsert(route, actor="msgcore up", now=now)
    elif current.kind == "smtp" and current.host == "127.0.0.1" and (
            current.port != port or (events_key and current.events_key != events_key)):
        update = {"port": port, **({"events_key": events_key} if events_key else {})}
        await routes.upsert(current.model_copy(update=update), actor="msgcore up", now=now)
