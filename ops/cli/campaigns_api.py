"""The campaigns commands' client of the HTTP API: which API and key, calls, errors as one line.

Which API: `--api-url`, else MSGCORE_API_URL, else the URL `msgcore up` recorded in
`<data_dir>/endpoints.json`, else http://MSGCORE_API_HOST:MSGCORE_API_PORT. Which key: `--api-key`,
else MSGCORE_API_KEY, else the demo tenant's key `msgcore up` keeps in `<data_dir>/demo-tenant.key`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import typer
from pydantic import ValidationError

from core.config import Settings
from ops.embedded import read_endpoints

API_TIMEOUT = httpx.Timeout(15.0)
OPTION_OF_FIELD = {"name": "--name", "from": "--from", "template": "--template", "send_at": "--send-at",
                   "priority": "--priority"}


class CliError(Exception):
    """A failure the user can act on: printed as one line (never a traceback), exit `code`."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@contextmanager
def failing(command: str) -> Iterator[None]:
    try:
        yield
    except CliError as e:
        typer.echo(f"msgcore campaigns {command}: {e}", err=True)
        raise typer.Exit(e.code) from e


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


def resolve_api(api_url: str | None, api_key: str | None) -> Api:
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


def get_campaign(api: Api, campaign_id: str) -> dict[str, Any]:
    return api.call("GET", f"/v1/campaigns/{campaign_id}", about=f"campaign {campaign_id}")  # type: ignore[no-any-return]


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def format_time(value: str | None) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return value


def format_duration(seconds: float) -> str:
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"
