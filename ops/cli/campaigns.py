"""`msgcore campaigns ...`: campaigns through the HTTP API (a sub-app of ops/cli/).

Unlike the other admin commands, which open MongoDB directly, these talk to a running API: the
recipient upload is streamed to it and checked and rendered there, and the campaign rules
(transitions, templates, CSV checks) live in one place.

Which API: `--api-url`, else MSGCORE_API_URL, else the URL `msgcore up` recorded in
`<data_dir>/endpoints.json`, else http://MSGCORE_API_HOST:MSGCORE_API_PORT. Which key: `--api-key`,
else MSGCORE_API_KEY, else the demo tenant's key `msgcore up` keeps in `<data_dir>/demo-tenant.key`.

Exit codes: 0 done; 1 the API refused (no such campaign, an action that does not apply, an unknown
key); 2 bad input (options, file, template, CSV); 3 the API is unreachable or failed; 130 interrupted.
"""

from __future__ import annotations

import time
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from ops.cli.campaigns_api import (
    Api,
    CliError,
    failing,
    format_duration,
    format_time,
    get_campaign,
    print_json,
    resolve_api,
)
from ops.cli.campaigns_upload import FileStream, open_csv, print_report, upload_with_progress

campaigns_app = typer.Typer(no_args_is_help=True,
                            help="Campaigns (through the HTTP API): create, upload recipients, start, follow.")

FINISHED = ("completed", "canceled")
CLOSED = ("canceling", "canceled", "completed")
PROBLEM_PAGE = 1000

CampaignIdArg = Annotated[str, typer.Argument(help="Campaign id (cmp_...)", show_default=False)]
ApiUrlOpt = Annotated[str | None, typer.Option(
    "--api-url", envvar="MSGCORE_API_URL", show_default=False,
    help="The API (default: the one `msgcore up` runs, from <data_dir>/endpoints.json)")]
ApiKeyOpt = Annotated[str | None, typer.Option(
    "--api-key", envvar="MSGCORE_API_KEY", show_default=False,
    help="Tenant API key (default: the demo tenant's key in <data_dir>/demo-tenant.key)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer")]


class Priority(StrEnum):
    MARKETING = "marketing"
    TRANSACTIONAL = "transactional"


# ---- create --------------------------------------------------------------------------------------

@campaigns_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="Campaign name", show_default=False)],
    sender: Annotated[str, typer.Option("--from", help="Sender id of every message", show_default=False)],
    template: Annotated[str | None, typer.Option(
        "--template", help="Text with {{tags}} filled from the CSV columns of the same name")] = None,
    template_file: Annotated[Path | None, typer.Option(
        "--template-file", help="Read the template from this UTF-8 file (one trailing newline dropped)")] = None,
    send_at: Annotated[str | None, typer.Option(
        "--send-at", help="Start sending at (ISO 8601 with a zone, e.g. 2030-06-01T09:00:00+02:00) once started")
    ] = None,
    priority: Annotated[Priority, typer.Option("--priority", help="Transactional campaigns outrank marketing ones")
                        ] = Priority.MARKETING,
    as_json: JsonOpt = False,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Create a campaign (a draft) and print its id."""
    with failing("create"):
        body: dict[str, Any] = {"name": name, "from": sender, "template": _template(template, template_file),
                                "priority": priority.value}
        if send_at is not None:
            body["send_at"] = _check_send_at(send_at)
        campaign = resolve_api(api_url, api_key).call("POST", "/v1/campaigns", json=body)
    if as_json:
        print_json(campaign)
        return
    typer.echo(campaign["id"])
    typer.echo(f"draft created; next: msgcore campaigns upload {campaign['id']} RECIPIENTS.csv", err=True)


def _template(text: str | None, path: Path | None) -> str:
    if (text is None) == (path is None):
        raise CliError("give the text with --template or a file with --template-file (one of them)", 2)
    if text is not None:
        return text
    assert path is not None
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise CliError(f"file not found: {path}", 2) from e
    except UnicodeDecodeError as e:
        raise CliError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", 2) from e
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}", 2) from e
    return content.removesuffix("\n").removesuffix("\r")  # an editor's final newline is not part of the text


def _check_send_at(value: str) -> str:
    try:
        when = datetime.fromisoformat(value)
    except ValueError as e:
        raise CliError(f"--send-at: {value!r} is not an ISO 8601 time (e.g. 2030-06-01T09:00:00+02:00)", 2) from e
    if when.tzinfo is None:
        raise CliError(f"--send-at: {value!r} has no zone: add one, e.g. +02:00 or Z", 2)
    return value


@campaigns_app.command("upload")
def upload(
    campaign_id: CampaignIdArg,
    file: Annotated[Path, typer.Argument(help="CSV with a header row: a phone column and one per template tag",
                                         show_default=False)],
    show: Annotated[int, typer.Option("--show", min=0, help="Problem rows to show")] = 10,
    as_json: JsonOpt = False,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Stream a recipient CSV to a campaign and print the report.

    The report: rows accepted, duplicates, invalid, and the first problem rows with their reasons.
    Uploading the same file again accepts nothing twice."""
    with failing("upload"):
        api = resolve_api(api_url, api_key)
        handle, size = open_csv(file)
        with handle:
            campaign = get_campaign(api, campaign_id)
            if campaign["status"] in CLOSED:
                raise CliError(f"campaign {campaign_id}: it is {campaign['status']} and takes no more recipients "
                               "(campaign_closed)")
            report = upload_with_progress(api, campaign, FileStream(handle), size, file.name)
    if as_json:
        print_json(report)
    else:
        print_report(report, show)

# ---- start, pause, resume, cancel ----------------------------------------------------------------

def _act(command: str, campaign_id: str, api_url: str | None, api_key: str | None) -> None:
    with failing(command):
        campaign = resolve_api(api_url, api_key).call("POST", f"/v1/campaigns/{campaign_id}/{command}",
                                               about=f"campaign {campaign_id}")
    when = f" (sends from {format_time(campaign['send_at'])})" if campaign["status"] == "scheduled" else ""
    typer.echo(f"campaign {campaign_id}: {campaign['status']}{when}")


@campaigns_app.command("start")
def start(campaign_id: CampaignIdArg, api_url: ApiUrlOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Start sending (at --send-at, if it is ahead); print the new status."""
    _act("start", campaign_id, api_url, api_key)


@campaigns_app.command("pause")
def pause(campaign_id: CampaignIdArg, api_url: ApiUrlOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Stop claiming its messages (within about a second); they keep their place."""
    _act("pause", campaign_id, api_url, api_key)


@campaigns_app.command("resume")
def resume(campaign_id: CampaignIdArg, api_url: ApiUrlOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Carry on where it was paused."""
    _act("resume", campaign_id, api_url, api_key)


@campaigns_app.command("cancel")
def cancel(campaign_id: CampaignIdArg, api_url: ApiUrlOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Cancel: messages not yet handed to an SMSC end as `canceled`."""
    _act("cancel", campaign_id, api_url, api_key)


# ---- status, list, problems ----------------------------------------------------------------------

@campaigns_app.command("status")
def status(
    campaign_id: CampaignIdArg,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh until completed or canceled (Ctrl-C stops)")
                     ] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.2, help="Seconds between refreshes")] = 2.0,
    as_json: JsonOpt = False,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Status, recipient counters, messages by state, progress, rate and ETA."""
    with failing("status"):
        if as_json and watch:
            raise CliError("--json and --watch do not go together", 2)
        api = resolve_api(api_url, api_key)
        campaign = get_campaign(api, campaign_id)
        if as_json:
            print_json(campaign)
        elif not watch:
            Console().print(_status_view(campaign))
        else:
            _watch(api, campaign, interval)


def _watch(api: Api, campaign: dict[str, Any], interval: float) -> None:
    with Live(_status_view(campaign), console=Console(), auto_refresh=False) as live:
        try:
            while campaign["status"] not in FINISHED:
                time.sleep(interval)
                campaign = get_campaign(api, campaign["id"])
                live.update(_status_view(campaign), refresh=True)
        except KeyboardInterrupt:
            return


def _status_view(c: dict[str, Any]) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("campaign", f"{c['id']}  {c['name']!r}  ({c['priority']}, from {c['from']})")
    grid.add_row("status", c["status"] + (f", sends from {format_time(c['send_at'])}" if c.get("send_at") else ""))
    r = c["recipients"]
    grid.add_row("recipients", f"{r['rows']:,} rows: {r['accepted']:,} accepted, {r['duplicates']:,} duplicates, "
                               f"{r['invalid']:,} invalid; {r['parts']:,} SMS parts")
    counts = c.get("counts")
    grid.add_row("messages", ", ".join(f"{state} {n:,}" for state, n in sorted(counts.items()))
                 if counts else "by state: not available (reporting not configured or not answering)")
    progress = c.get("progress")
    if progress:
        grid.add_row("progress", _progress_line(progress))
    return Group(grid)


def _progress_line(p: dict[str, Any]) -> RenderableType:
    line = Table.grid(padding=(0, 1))
    rate = f"{p['rate_per_s']:g}/s" if p.get("rate_per_s") else "-/s"
    eta = format_duration(p["eta_s"]) if p.get("eta_s") is not None else "-"
    line.add_row(ProgressBar(total=100.0, completed=p["done_percent"], width=30),
                 f"{p['done_percent']:.1f}%  {p['total'] - p['waiting']:,}/{p['total']:,} handed to an SMSC  "
                 f"rate {rate}  ETA {eta}")
    return line


@campaigns_app.command("list")
def list_campaigns(
    status_filter: Annotated[str | None, typer.Option("--status", help="Only campaigns in this status")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=200, help="At most this many")] = 50,
    before: Annotated[str | None, typer.Option("--before", help="Created before this time (paging)")] = None,
    as_json: JsonOpt = False,
    api_url: ApiUrlOpt = None,
    api_key: ApiKeyOpt = None,
) -> None:
    """Campaigns, newest first."""
    params: dict[str, Any] = {"limit": limit, **({"status": status_filter} if status_filter else {}),
                              **({"before": before} if before else {})}
    with failing("list"):
        page = resolve_api(api_url, api_key).call("GET", "/v1/campaigns", params=params)
    if as_json:
        print_json(page)
        return
    if not page["campaigns"]:
        typer.echo("no campaigns", err=True)
        return
    table = Table("id", "name", "status", "priority", "accepted", "invalid", "created", "send at")
    for c in page["campaigns"]:
        r = c["recipients"]
        table.add_row(c["id"], c["name"], c["status"], c["priority"], f"{r['accepted']:,}", f"{r['invalid']:,}",
                      format_time(c["created_at"]), format_time(c.get("send_at")))
    Console().print(table)
    if page.get("next"):
        typer.echo(f"more: msgcore campaigns list --before {page['next']}", err=True)


@campaigns_app.command("problems")
def problems(campaign_id: CampaignIdArg, api_url: ApiUrlOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Every row not accepted, from all uploads.

    One line per row: row<TAB>code<TAB>reason, by row number (the header is row 1)."""
    shown = 0
    with failing("problems"):
        api = resolve_api(api_url, api_key)
        after: int | None = 0
        while after is not None:
            page = api.call("GET", f"/v1/campaigns/{campaign_id}/problems", about=f"campaign {campaign_id}",
                            params={"after_row": after, "limit": PROBLEM_PAGE})
            for p in page["problems"]:
                reason = " ".join(str(p["reason"]).split())  # one line per problem, whatever the row held
                typer.echo(f"{p['row']}\t{p['code']}\t{reason}")
            shown += len(page["problems"])
            after = page["next_after_row"]
    if not shown:
        typer.echo(f"campaign {campaign_id}: no problem rows", err=True)
