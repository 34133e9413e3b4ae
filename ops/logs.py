"""Logging, configured once per process: every line has a UTC timestamp and the component name.

Modules log with `logging.getLogger(__name__)` and put the ids they concern (message, tenant, route)
in the message itself, as `message=<id>`, `tenant=<id>`, `route=<id>`, `campaign=<id>`.

Two formats (MSGCORE_LOG_FORMAT): `text` (the default, one readable line) and `json`, one object per
line for log shippers:

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "component": "router", "logger": "core...",
     "message": "router: message=01J... tenant=acme suspended: held", "message_id": "01J...",
     "tenant_id": "acme"}

The ids are taken from the `key=value` pairs of the message (the first of each kind) or from
`extra={"message_id": ...}`; a traceback is in `exc_info`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime

FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)-7s component=%(component)s %(name)s: %(message)s"


class _ComponentFilter(logging.Filter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        return True


# `message=01J...` in a log message -> ("message_id", "01J..."); a value ends at a space, comma,
# semicolon, colon or bracket (ids never contain them).
ID_PATTERN = re.compile(r"\b(message|tenant|route|campaign)=([^\s,;:()\[\]]+)")
ID_FIELDS = ("message_id", "tenant_id", "route_id", "campaign_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ms), level, component, logger, message, the ids."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace(
                "+00:00", "Z"),
            "level": record.levelname,
            "component": getattr(record, "component", ""),
            "logger": record.name,
            "message": message,
        }
        for kind, value in ID_PATTERN.findall(message):
            doc.setdefault(f"{kind}_id", value)
        for name in ID_FIELDS:
            if (value := getattr(record, name, None)) is not None:
                doc[name] = str(value)
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def formatter_for(fmt: str) -> logging.Formatter:
    """The formatter of `fmt` ("text" or "json"; anything else is refused)."""
    if fmt == "json":
        return JsonFormatter()
    if fmt != "text":
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    return formatter


def configure(component: str, level: str = "INFO", fmt: str | None = None) -> None:
    """`fmt`: "text" or "json"; None reads MSGCORE_LOG_FORMAT (default text), for callers that
    configure logging before their Settings exist."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(fmt or os.environ.get("MSGCORE_LOG_FORMAT", "text").lower()))
    handler.addFilter(_ComponentFilter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pymongo", "uvicorn.access", "apscheduler.executors", "smpplib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A timed job still running at its next tick is skipped (max_instances=1, on purpose); APScheduler
    # warns about every skip, which on a slow store floods the log with no action to take.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
