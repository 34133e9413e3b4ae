"""View models of the dashboard's panels: plain dicts and dataclasses the templates render.

Each panel is read on its own (one htmx poll per panel), from the log in MongoDB (exact, live) and
from the reporting tables (with the projector's lag; optional: None when unavailable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from api.dashboard.reporting import Checkpoint, Minute, ReportingReads
from api.read_side import campaign_states
from core.store.backlog import route_statuses, topic_backlogs
from core.store.dashboard_reads import campaigns_overview, newest_event_at, recent_accepted, route_status_details
from core.store.database import Database
from core.store.deadletters import list_dead_letters
from core.store.routes import RouteStore

RECENT = 10
CAMPAIGNS = 20
DEAD_LETTERS = 20
WAITING_STATES = ("accepted", "routed", "retry")
CLOSED = ("canceled", "completed")


@dataclass
class Throughput:
    minutes: list[Minute] | None  # None: reporting unavailable
    recent: list[dict[str, Any]]
    last_minute_accepted: int = 0
    last_minute_billed: int = 0
    hour_accepted: int = 0
    hour_billed: int = 0
    peak: int = 1  # the tallest bar, for scaling the chart


@dataclass
class Lag:
    checkpoints: list[Checkpoint] | None
    newest_event_at: datetime | None
    lags_s: dict[str, float] = field(default_factory=dict)


async def throughput(db: Database, reporting: ReportingReads) -> Throughput:
    """The last hour per minute (reporting) and the newest accepted messages (the log)."""
    view = Throughput(minutes=await reporting.per_minute(), recent=await recent_accepted(db, RECENT))
    if view.minutes:
        # The current minute is partial: "now" is the last full minute.
        full = view.minutes[-2] if len(view.minutes) > 1 else view.minutes[-1]
        view.last_minute_accepted, view.last_minute_billed = full.accepted, full.billed
        view.hour_accepted = sum(m.accepted for m in view.minutes)
        view.hour_billed = sum(m.billed for m in view.minutes)
        view.peak = max([1, *(max(m.accepted, m.billed) for m in view.minutes)])
    return view


async def routes(db: Database, now: datetime) -> list[dict[str, Any]]:
    """Every configured route: status (up/busy/down as the router sees it), the connector's last
    report (its binds), configured binds and TPS limit."""
    statuses = await route_statuses(db, now)
    details = await route_status_details(db)
    out = []
    for r in await RouteStore(db).list(include_disabled=True):
        d = details.get(r.id, {})
        out.append({"id": r.id, "status": statuses.get(r.id, "down").upper(), "enabled": r.enabled,
                    "detail": d.get("detail", ""), "heartbeat_at": d.get("heartbeat_at"), "binds": r.binds,
                    "tps": r.tps or "unlimited", "window": r.window, "host": f"{r.host}:{r.port}"})
    return out


async def backlog(db: Database) -> list[dict[str, Any]]:
    """Waiting entries per lane (shared lane as "shared"): route stage, send stage (all routes), and
    sent messages awaiting expiry per route (lane-less) as its own rows. Lanes with nothing waiting
    are left out; totals come first."""
    lanes: dict[str, dict[str, int]] = {}
    for b in await topic_backlogs(db):
        key = f"await:{b.route}" if b.stage == "await" else (b.lane or "shared")
        row = lanes.setdefault(key, {"route": 0, "send": 0, "await": 0})
        row[b.stage] += b.waiting
    total = {s: sum(r[s] for r in lanes.values()) for s in ("route", "send", "await")}
    rows = [{"lane": "total", **total}]
    rows += [{"lane": k, **v} for k, v in sorted(lanes.items()) if any(v.values())]
    return rows


async def campaigns(db: Database, reporting: ReportingReads) -> list[dict[str, Any]]:
    """Open campaigns first, then recent closed ones; progress from the reporting tables when known."""
    out = []
    for doc in await campaigns_overview(db, CAMPAIGNS):
        total = doc["recipients"]["accepted"]
        row = {"id": doc["_id"], "tenant_id": doc["tenant_id"], "name": doc["name"], "status": doc["status"],
               "total": total, "done_percent": None, "created_at": doc["created_at"],
               "actions": _actions(doc["status"])}
        if doc["status"] not in CLOSED:
            states = await campaign_states(reporting.pool, reporting.schema, doc["tenant_id"], doc["_id"])
            if states is not None and total:
                counts = states.counts
                counts["accepted"] = counts.get("accepted", 0) + max(0, total - sum(counts.values()))
                waiting = sum(counts.get(s, 0) for s in WAITING_STATES)
                row["done_percent"] = round(100.0 * (total - waiting) / total, 1)
        out.append(row)
    return out


def _actions(status: str) -> list[str]:
    """The buttons shown for a status (the store still checks the transition: 409 if it raced)."""
    return {"draft": ["start", "cancel"], "scheduled": ["pause", "cancel"], "running": ["pause", "cancel"],
            "paused": ["resume", "cancel"]}.get(status, [])


async def dead_letters(db: Database) -> list[dict[str, Any]]:
    return await list_dead_letters(db, None, DEAD_LETTERS, None)


async def lag(db: Database, reporting: ReportingReads) -> Lag:
    """Per projection: events applied, and how far the newest applied event is behind the log's newest
    event (0 when caught up)."""
    view = Lag(checkpoints=await reporting.checkpoints(), newest_event_at=await newest_event_at(db))
    for c in view.checkpoints or []:
        if view.newest_event_at is not None and c.last_event_at is not None:
            view.lags_s[c.projection] = max(0.0, (view.newest_event_at - c.last_event_at).total_seconds())
    return view
