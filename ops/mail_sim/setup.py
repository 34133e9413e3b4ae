"""The embedded default's e-mail route: `msgcore up` points route "mail" (kind smtp) at its mail-sim."""

from __future__ import annotations

from datetime import datetime

from core.domain.routing import Route
from core.store.routes import RouteStore

MAIL_ROUTE = "mail"
MAIL_SIM_PORT = 2525


async def ensure_mail_route(routes: RouteStore, port: int, now: datetime) -> None:
    """Create route "mail" to 127.0.0.1:`port`, or follow the mail-sim to a new port; a route "mail"
    that an operator pointed elsewhere is left alone."""
    current = await routes.get(MAIL_ROUTE)
    if current is None:
        route = Route(id=MAIL_ROUTE, kind="smtp", host="127.0.0.1", port=port, price_per_part=1, pool=4)
        await routes.upsert(route, actor="msgcore up", now=now)
    elif current.kind == "smtp" and current.host == "127.0.0.1" and current.port != port:
        await routes.upsert(current.model_copy(update={"port": port}), actor="msgcore up", now=now)
