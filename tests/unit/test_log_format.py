"""MSGCORE_LOG_FORMAT=json: one JSON object per line with time, level, component, message and ids."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from ops.logs import configure


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """What the handler `configure` installs writes (pytest swaps sys.stderr around each phase, so
    the stream is set on the handler itself by `setup`)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield io.StringIO()
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def setup(stream: io.StringIO, component: str, level: str = "INFO", fmt: str | None = None) -> None:
    configure(component, level, fmt)
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_ids_of_the_message(captured: io.StringIO) -> None:
    setup(captured, "router", "INFO", "json")
    log = logging.getLogger("core.workers.router")
    log.info("router: message=%s tenant=%s suspended: held", "01JABC", "acme")
    log.warning("connector route=%s: bind lost (%s)", "sim", "timeout")
    log.info("api ready", extra={"message_id": "01JXYZ"})
    first, second, third = lines(captured)
    assert first["level"] == "INFO" and first["component"] == "router"
    assert first["logger"] == "core.workers.router"
    assert first["message"] == "router: message=01JABC tenant=acme suspended: held"
    assert (first["message_id"], first["tenant_id"]) == ("01JABC", "acme")
    assert "route_id" not in first
    assert str(first["time"]).endswith("Z") and str(first["time"])[10] == "T"
    assert second["route_id"] == "sim" and second["level"] == "WARNING"
    assert third["message_id"] == "01JXYZ"


def test_json_keeps_tracebacks_on_one_line(captured: io.StringIO) -> None:
    setup(captured, "api", "INFO", "json")
    try:
        raise RuntimeError("bug")
    except RuntimeError:
        logging.getLogger("api").exception("unhandled error in %s", "GET /x")
    [doc] = lines(captured)
    assert "RuntimeError: bug" in str(doc["exc_info"]) and doc["level"] == "ERROR"


def test_text_stays_the_default(captured: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MSGCORE_LOG_FORMAT", raising=False)
    setup(captured, "scheduler")
    logging.getLogger("core.workers.timers").info("timers: %d released", 3)
    line = captured.getvalue().strip()
    assert "component=scheduler core.workers.timers: timers: 3 released" in line
    assert line[:4].isdigit() and not line.startswith("{")


def test_the_environment_picks_json_when_no_format_is_given(captured: io.StringIO,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MSGCORE_LOG_FORMAT", "json")
    setup(captured, "projector")
    logging.getLogger("projections").info("projector started")
    assert lines(captured)[0]["component"] == "projector"


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text or json"):
        configure("api", "INFO", "xml")
