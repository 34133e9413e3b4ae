"""Run the api process: uvicorn serving `create_app(settings)`."""

from __future__ import annotations

import logging

import uvicorn

from api.app import create_app
from core.config import Settings

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 10


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT. uvicorn handles both: it stops accepting connections, lets
    requests in flight finish (at most GRACEFUL_SHUTDOWN_S), then runs the app's lifespan shutdown,
    which closes the MongoDB client. Logging is configured by the caller (`log_config=None`)."""
    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        server_header=False,
    )
    log.info("api listening on http://%s:%d", settings.api_host, settings.api_port)
    uvicorn.Server(config).run()
