"""`msgcore campaigns ...`: campaigns through the HTTP API (a sub-app of ops/cli.py).

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

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Table

from core.config import Settings
from ops.embedded import read_endpoints

campaigns_app = typer.Typer(no_args_is_help=True,
                            help="Campaigns (through the HTTP API): create, upload recipients, start, follow.")

API_TIMEOUT = httpx.Timeout(15.0)
# The API answers an upload only once every row is checked and accepted: minutes for a million rows.
UPLOAD_TIMEOUT = httpx.Timeout(connect=10.0, read=3600.0, write=300.0, pool=10.0)
CHUNK_BYTES = 256 * 1024
POLL_S = 0.5
FINISHED = ("completed", "canceled")
CLOSED = ("canceling", "canceled", "completed")
PROBLEM_PAGE = 1000
OPTION_OF_FIELD = {"name": "--name", "from": "--from", "template": "--template", "send_at": "--send-at",
                   "priority": "--priority"}

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


class CliError(Exception):
    """A failure the user can act on: printed as one line (never a traceback), exit `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def _failing(command: str) -> Iterator[None]:
    try:
        yield
    except CliError as e:
        typer.echo(f"msgcore campaigns {command}: {e}", err=True)
        raise typer.Exit(e.code) from e


# ---- the API -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Api:
    url: str
    key: str

    def client(self, timeout: httpx.Timeout = API_TIMEOUT) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout,
                            headers={"Authorization": f"Bearer {self.key}", "User-Agent": "msgcore-cli"})

    def call(self, method: str, path: str, about: str | None = None, **kwargs: Any) -> Any:
        """The JSON of a 2xx answer; CliError for any other answer or a transport failure, its message
        starting with `about` (e.g. "campaign cmp_x")."""
        try:
            with self.client() as client:
                response = client.request(method, path, **kwargs)
        except (httpx.TransportError, httpx.InvalidURL) as e:
            raise self.transport_error(e) from e
        return self.answer(response, about)

    def transport_error(self, e: Exception) -> CliError:
        if isinstance(e, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return CliError(f"invalid API URL {self.url!r} ({e}): pass --api-url http://HOST:PORT", 2)
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout):
            return CliError(f"cannot reach the API at {self.url} ({e}): is `msgcore up` running?", 3)
        return CliError(f"the API at {self.url} failed to answer: {type(e).__name__} {e}".rstrip(), 3)

    def answer(self, response: httpx.Response, about: str | None) -> Any:
        if response.is_success:
            return response.json()
        raise _refusal(response, about)


def _refusal(response: httpx.Response, about: str | None) -> CliError:
    """An error answer `{"error": {code, message, details}}` as one line naming the problem."""
    try:
        error = response.json()["error"]
        code, message, details = str(error["code"]), str(error["message"]), error.get("details")
    except (ValueError, KeyError, TypeError):
        code, message, details = f"http_{response.status_code}", response.text[:200] or response.reason_phrase, None
    if code == "not_found" and about:
        message = "not found for this API key's tenant"
    elif code == "validation_error" and isinstance(details, list):
        message = "; ".join(_field_problem(d) for d in details if isinstance(d, dict)) or message
    elif code == "unauthorized":
        message += ": pass --api-key or set MSGCORE_API_KEY"
    exit_code = 3 if response.status_code >= 500 else 2 if response.status_code in (400, 413, 415, 422) else 1
    return CliError(f"{about + ': ' if about else ''}{message} ({code})", exit_code)


def _field_problem(detail: dict[str, Any]) -> str:
    field = str(detail.get("field", "")).removeprefix("body.")
    return f"{OPTION_OF_FIELD.get(field, field)}: {detail.get('message', '')}"


def _api(api_url: str | None, api_key: str | None) -> Api:
    try:
        settings = Settings()
    except ValidationError as e:
        raise CliError(f"invalid MSGCORE_* setting: {e}", 2) from e
    url = api_url or _recorded(settings.data_dir).get("api") or f"http://{settings.api_host}:{settings.api_port}"
    key_file = settings.data_dir / "demo-tenant.key"
    key = api_key or (key_file.read_text().strip() if key_file.is_file() else "")
    if not key:
        raise CliError(f"no API key: pass --api-key or set MSGCORE_API_KEY (`msgcore up` keeps the demo "
                       f"tenant's key in {key_file})", 2)
    return Api(url.rstrip("/"), key)


def _recorded(data_dir: Path) -> dict[str, str]:
    try:
        return read_endpoints(data_dir)
    except (OSError, ValueError):  # unreadable or half-written: fall back to the settings
        return {}


def _campaign(api: Api, campaign_id: str) -> dict[str, Any]:
    return api.call("GET", f"/v1/campaigns/{campaign_id}", about=f"campaign {campaign_id}")  # type: ignore[no-any-return]


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
    with _failing("create"):
        body: dict[str, Any] = {"name": name, "from": sender, "template": _template(template, template_file),
                                "priority": priority.value}
        if send_at is not None:
            body["send_at"] = _check_send_at(send_at)
        campaign = _api(api_url, api_key).call("POST", "/v1/campaigns", json=body)
    if as_json:
        _print_json(campaign)
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


# ---- upload --------------------------------------------------------------------------------------

class _FileStream:
    """The file in chunks for httpx, counting what it has handed over (bytes and newlines) for the
    progress display; read from another thread, hence only plain int updates."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.sent = 0
        self.newlines = 0
        self.ends_with_newline = True
        self.finished = False

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.file.read(CHUNK_BYTES):
            self.newlines += chunk.count(b"\n")
            self.ends_with_newline = chunk.endswith(b"\n")
            yield chunk
            self.sent += len(chunk)  # httpx asks for the next chunk once this one is written
        self.finished = True

    @property
    def data_rows(self) -> int:
        """Lines after the header: the API's row count unless quoted fields hold newlines."""
        lines = self.newlines + (0 if self.ends_with_newline else 1)
        return max(0, lines - 1)


@dataclass
class _Upload:
    """The POST running in a worker thread, so that the main thread can draw progress meanwhile."""

    api: Api
    campaign_id: str
    stream: _FileStream
    size: int
    response: httpx.Response | None = None
    error: Exception | None = None

    def run(self) -> None:
        headers = {"Content-Type": "text/csv", "Content-Length": str(self.size)}  # not chunked: size is known
        try:
            with self.api.client(UPLOAD_TIMEOUT) as client:
                self.response = client.post(f"/v1/campaigns/{self.campaign_id}/recipients", content=self.stream,
                                            headers=headers)
        except Exception as e:  # handed to the main thread, which reports it (or re-raises a bug)
            self.error = e


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
    with _failing("upload"):
        api = _api(api_url, api_key)
        handle, size = _open(file)
        with handle:
            campaign = _campaign(api, campaign_id)
            if campaign["status"] in CLOSED:
                raise CliError(f"campaign {campaign_id}: it is {campaign['status']} and takes no more recipients "
                               "(campaign_closed)")
            report = _upload_with_progress(api, campaign, _FileStream(handle), size, file.name)
    if as_json:
        _print_json(report)
    else:
        _print_report(report, show)


def _open(path: Path) -> tuple[IO[bytes], int]:
    try:
        handle = path.open("rb")
    except FileNotFoundError as e:
        raise CliError(f"file not found: {path}", 2) from e
    except IsADirectoryError as e:
        raise CliError(f"{path} is a directory, not a CSV file", 2) from e
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}", 2) from e
    return handle, path.stat().st_size


def _upload_with_progress(api: Api, campaign: dict[str, Any], stream: _FileStream, size: int,
                          name: str) -> dict[str, Any]:
    """Phase 1 draws the bytes sent; phase 2, while the API checks and accepts the rows, the rows it
    has accepted (the campaign's `recipients.rows` grows per batch). Returns the API's report."""
    cid = campaign["id"]
    job = _Upload(api, cid, stream, size)
    worker = threading.Thread(target=job.run, name=f"upload-{cid}", daemon=True)  # daemon: Ctrl-C must not wait
    err = Console(stderr=True)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=err) as progress:
            task = progress.add_task(f"sending {name}", total=size)
            worker.start()
            while worker.is_alive() and not stream.finished:
                worker.join(0.1)
                progress.update(task, completed=stream.sent)
        if worker.is_alive():
            _follow_rows(api, campaign, stream.data_rows, worker, err)
    except KeyboardInterrupt as e:
        raise CliError(_interrupted(cid, stream.finished), 130) from e
    if job.error is not None:
        if isinstance(job.error, httpx.TransportError):
            raise api.transport_error(job.error) from job.error
        raise job.error
    assert job.response is not None
    return api.answer(job.response, f"campaign {cid}")  # type: ignore[no-any-return]


def _follow_rows(api: Api, campaign: dict[str, Any], total: int, worker: threading.Thread, err: Console) -> None:
    baseline = campaign["recipients"]["rows"]  # rows of earlier uploads
    with api.client() as poller, Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("rows"), TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("checking the file", total=total or None)
        while worker.is_alive():
            worker.join(POLL_S)
            rows = _rows_now(poller, campaign["id"])
            if rows is not None and rows > baseline:
                progress.update(task, description="accepting rows", completed=rows - baseline,
                                total=max(total, rows - baseline))
        rows = _rows_now(poller, campaign["id"])
        if rows is not None:  # the final count: the bar ends where the API ended
            progress.update(task, description="accepted rows", completed=rows - baseline, total=rows - baseline)


def _rows_now(poller: httpx.Client, campaign_id: str) -> int | None:
    """The campaign's row counter, or None if the API does not answer now (the upload's own answer
    decides how the upload went)."""
    try:
        response = poller.get(f"/v1/campaigns/{campaign_id}")
        return int(response.json()["recipients"]["rows"]) if response.is_success else None
    except (httpx.TransportError, ValueError, KeyError, TypeError):
        return None


def _interrupted(campaign_id: str, sent: bool) -> str:
    if not sent:
        return "interrupted while sending: the API keeps nothing of an upload cut short"
    return (f"interrupted: the rows the API accepted stay accepted (msgcore campaigns status {campaign_id}); "
            "uploading the same file again accepts nothing twice")


def _print_report(report: dict[str, Any], show: int) -> None:
    cid = report["campaign_id"]
    typer.echo(f"campaign {cid}: {report['rows']:,} rows: {report['accepted']:,} accepted, "
               f"{report['duplicates']:,} duplicates, {report['invalid']:,} invalid (status {report['status']})")
    problems = report["problems"][:show]
    if problems:
        table = Table("row", "code", "reason", title="problem rows (the header is row 1)", title_justify="left")
        for p in problems:
            table.add_row(str(p["row"]), p["code"], p["reason"])
        Console().print(table)
    if report["problems_total"] > len(problems):
        typer.echo(f"{report['problems_total']:,} problem rows in this upload ({len(problems)} shown); "
                   f"all of them: msgcore campaigns problems {cid}")


# ---- start, pause, resume, cancel ----------------------------------------------------------------

def _act(command: str, campaign_id: str, api_url: str | None, api_key: str | None) -> None:
    with _failing(command):
        campaign = _api(api_url, api_key).call("POST", f"/v1/campaigns/{campaign_id}/{command}",
                                               about=f"campaign {campaign_id}")
    when = f" (sends from {_time(campaign['send_at'])})" if campaign["status"] == "scheduled" else ""
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
    with _failing("status"):
        if as_json and watch:
            raise CliError("--json and --watch do not go together", 2)
        api = _api(api_url, api_key)
        campaign = _campaign(api, campaign_id)
        if as_json:
            _print_json(campaign)
        elif not watch:
            Console().print(_status_view(campaign))
        else:
            _watch(api, campaign, interval)


def _watch(api: Api, campaign: dict[str, Any], interval: float) -> None:
    with Live(_status_view(campaign), console=Console(), auto_refresh=False) as live:
        try:
            while campaign["status"] not in FINISHED:
                time.sleep(interval)
                campaign = _campaign(api, campaign["id"])
                live.update(_status_view(campaign), refresh=True)
        except KeyboardInterrupt:
            return


def _status_view(c: dict[str, Any]) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("campaign", f"{c['id']}  {c['name']!r}  ({c['priority']}, from {c['from']})")
    grid.add_row("status", c["status"] + (f", sends from {_time(c['send_at'])}" if c.get("send_at") else ""))
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
    eta = _duration(p["eta_s"]) if p.get("eta_s") is not None else "-"
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
    with _failing("list"):
        page = _api(api_url, api_key).call("GET", "/v1/campaigns", params=params)
    if as_json:
        _print_json(page)
        return
    if not page["campaigns"]:
        typer.echo("no campaigns", err=True)
        return
    table = Table("id", "name", "status", "priority", "accepted", "invalid", "created", "send at")
    for c in page["campaigns"]:
        r = c["recipients"]
        table.add_row(c["id"], c["name"], c["status"], c["priority"], f"{r['accepted']:,}", f"{r['invalid']:,}",
                      _time(c["created_at"]), _time(c.get("send_at")))
    Console().print(table)
    if page.get("next"):
        typer.echo(f"more: msgcore campaigns list --before {page['next']}", err=True)


@campaigns_app.command("problems")
def problems(campaign_id: CampaignIdArg, api_url: ApiUrlOpt = None, api_key: ApiKeyOpt = None) -> None:
    """Every row not accepted, from all uploads.

    One line per row: row<TAB>code<TAB>reason, by row number (the header is row 1)."""
    shown = 0
    with _failing("problems"):
        api = _api(api_url, api_key)
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


# ---- formatting ----------------------------------------------------------------------------------

def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _time(value: str | None) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return value


def _duration(seconds: float) -> str:
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"
