"""`msgcore campaigns upload`: the recipient CSV streamed to the API with progress, and its report."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import typer
from rich.console import Console
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
from rich.table import Table

from ops.cli.campaigns_api import Api, CliError

# The API answers an upload only once every row is checked and accepted: minutes for a million rows.
UPLOAD_TIMEOUT = httpx.Timeout(connect=10.0, read=3600.0, write=300.0, pool=10.0)
CHUNK_BYTES = 256 * 1024
POLL_S = 0.5


class FileStream:
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
    stream: FileStream
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


def open_csv(path: Path) -> tuple[IO[bytes], int]:
    try:
        handle = path.open("rb")
    except FileNotFoundError as e:
        raise CliError(f"file not found: {path}", 2) from e
    except IsADirectoryError as e:
        raise CliError(f"{path} is a directory, not a CSV file", 2) from e
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror}", 2) from e
    return handle, path.stat().st_size


def upload_with_progress(api: Api, campaign: dict[str, Any], stream: FileStream, size: int,
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


def print_report(report: dict[str, Any], show: int) -> None:
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

