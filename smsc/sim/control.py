"""HTTP control API of the SMSC simulator: read and switch its faults while it runs.

A deliberately tiny HTTP/1.1 server on asyncio streams, in the simulator's own event loop (so it
touches the simulator's state without locks), on 127.0.0.1 only. One request per connection,
JSON in and out.

    GET   /faults            {"faults": {...settings...}, "stats": {...}} (stats include
                             `submit_per_second`: per system_id, the last 60 s)
    GET   /stats             the stats alone
    PUT   /faults            merge the body's fields into the settings; `?replace=true` replaces
                             them (fields not given: defaults, all faults off). 422 on bad input.
    PATCH /faults            same as PUT without replace
    POST  /reset             settings back to those the simulator started with; fault counters and
                             per-second rates cleared (protocol counters keep counting)

    curl -s localhost:8775/faults
    curl -s -X PUT localhost:8775/faults -d '{"error_ratio": 0.1, "permanent_share": 0.5}'
    curl -s -X PUT localhost:8775/faults -d '{"receipt_mode": "before_response"}'
    curl -s -X POST localhost:8775/reset
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from smsc.sim.protocol import ControlledSimulator

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
READ_TIMEOUT_S = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 422: "Unprocessable Entity", 500: "Internal Server Error"}


class _HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


class ControlServer:
    """Serves the control API of one simulator on 127.0.0.1:`port` (0 = ephemeral)."""

    def __init__(self, sim: ControlledSimulator, port: int) -> None:
        self._sim = sim
        self._requested_port = port
        self._port: int | None = None
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("control API not started")
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._requested_port)
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("smsc-sim control API on http://127.0.0.1:%d (smsc port %s)", self._port, self._sim_port())

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _sim_port(self) -> int | None:
        try:
            return self._sim.port
        except RuntimeError:
            return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, payload = 500, {"error": {"code": "internal", "message": "internal error"}}
        method, target = "?", "?"
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                method, target, body = await _read_request(reader)
            status, payload = 200, self._route(method, target, body)
        except _HttpError as exc:
            status = exc.status
            payload = {"error": {"code": exc.code, "message": exc.message, "details": exc.details}}
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        except Exception:
            log.exception("smsc-sim control: %s %s failed", method, target)
        log.info("smsc-sim control (smsc port %s): %s %s -> %d", self._sim_port(), method, target, status)
        data = json.dumps(payload, default=str).encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode("ascii")
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(head + data)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()

    def _route(self, method: str, target: str, body: bytes) -> dict[str, Any]:
        url = urlsplit(target)
        path = url.path.rstrip("/") or "/"
        query = parse_qs(url.query)
        if path == "/faults":
            if method == "GET":
                return self._state()
            if method in ("PUT", "PATCH"):
                replace = method == "PUT" and query.get("replace", ["false"])[-1].lower() in ("1", "true", "yes")
                changes = _json_object(body)
                try:
                    if replace:
                        self._sim.replace_faults(changes)
                    else:
                        self._sim.set_faults(**changes)
                except ValidationError as exc:
                    details = json.loads(exc.json(include_url=False, include_context=False))
                    raise _HttpError(422, "validation_error", "invalid fault settings", details) from exc
                return self._state()
            raise _HttpError(405, "method_not_allowed", f"{method} not allowed on /faults")
        if path == "/reset":
            if method != "POST":
                raise _HttpError(405, "method_not_allowed", f"{method} not allowed on /reset")
            self._sim.reset()
            return self._state()
        if path == "/stats":
            if method != "GET":
                raise _HttpError(405, "method_not_allowed", f"{method} not allowed on /stats")
            return self._sim.stats()
        raise _HttpError(404, "not_found", f"no such resource: {path}")

    def _state(self) -> dict[str, Any]:
        return {"smsc_port": self._sim_port(), "faults": self._sim.faults.model_dump(), "stats": self._sim.stats()}


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise _HttpError(400, "bad_request", "malformed request line")
    method, target = parts[0].upper(), parts[1]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            try:
                length = int(value.strip())
            except ValueError as exc:
                raise _HttpError(400, "bad_request", "bad Content-Length") from exc
        elif name.strip().lower() == "transfer-encoding":
            raise _HttpError(400, "bad_request", "chunked bodies are not supported; send Content-Length")
    if length < 0:
        raise _HttpError(400, "bad_request", "bad Content-Length")
    if length > MAX_BODY:
        raise _HttpError(413, "payload_too_large", f"body over {MAX_BODY} bytes")
    body = await reader.readexactly(length) if length else b""
    return method, target, body


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HttpError(400, "invalid_json", f"body is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _HttpError(422, "validation_error", "body must be a JSON object of fault settings")
    return value
