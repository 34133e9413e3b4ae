"""Logging, configured once per process: every line has a UTC timestamp and the component name.

Modules log with `logging.getLogger(__name__)` and put the ids they concern (message, tenant, route)
in the message itself.
"""

from __future__ import annotations

import logging
import sys
import time

FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)-7s component=%(component)s %(name)s: %(message)s"


class _ComponentFilter(logging.Filter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        return True


def configure(component: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter(FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(_ComponentFilter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("pymongo", "uvicorn.access", "apscheduler.executors", "smpplib", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A timed job still running at its next tick is skipped (max_instances=1, on purpose); APScheduler
    # warns about every skip, which on a slow store floods the log with no action to take.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
