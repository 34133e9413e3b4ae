"""Process settings, read once per process from `MSGCORE_*` variables and an optional TOML file.

Settings are built in each entry point (`Settings()`), never at import time.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSGCORE_", extra="ignore")

    # Stores. Empty URL = use the embedded servers that `msgcore up` started (their URLs are
    # written to `<data_dir>/endpoints.json`).
    mongo_url: str = ""
    mongo_db: str = "msgcore"
    pg_url: str = ""
    reporting_schema: str = "reporting"

    data_dir: Path = Path(".msgcore")

    api_host: str = "127.0.0.1"
    api_port: int = 8080
    # Admin key for /v1/admin; `msgcore up` generates one and stores it in the data dir.
    admin_key: str = ""

    # Routes loaded into the `routes` collection on start (TOML file with [[routes]] tables).
    routes_file: Path | None = None

    # Workers.
    batch_size: int = Field(default=500, ge=1, le=5000)
    poll_interval_s: float = Field(default=0.05, gt=0)
    lease_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    default_validity_s: int = Field(default=48 * 3600, ge=60)
    max_parts: int = Field(default=10, ge=1, le=255)
    email_max_body_bytes: int = Field(default=1024 * 1024, ge=1)  # an e-mail's text + html (body_too_large)

    # Simulator (msgcore smsc-sim) defaults.
    sim_host: str = "127.0.0.1"
    sim_port: int = 2775
    sim_receipt_delay_s: float = 0.2

    log_level: str = "INFO"
    # "text" (default: one readable line) or "json" (one object per line: ops/logs.py).
    log_format: str = Field(default="text", pattern="^(text|json)$")

    # Metrics and probes of the worker processes (core/metrics_server.py): this process's port, or
    # a base port + the component's offset (router +1, scheduler +2, connector +3, projector +4);
    # 0 = off. The api serves them on its own port. Listen on 0.0.0.0 only inside a container.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_port_base: int = Field(default=0, ge=0, le=65530)
    metrics_host: str = "127.0.0.1"
    # Backlog gauges label lanes by class (shared, campaign, marketing); the N lanes with the most
    # waiting are labelled by their key (campaign or tenant id) instead. 0: never (bounded labels).
    metrics_lane_detail: int = Field(default=0, ge=0, le=50)

    # Status webhooks (core/workers/webhooks_*.py). Targets resolving to private, loopback, link-local
    # or metadata addresses are refused; `msgcore up` and the tests allow loopback only.
    webhooks_allow_loopback: bool = False
    webhooks_timeout_s: float = Field(default=10.0, gt=0)
    webhooks_max_age_s: float = Field(default=24 * 3600, gt=0)  # retried this long after enqueue, then webhook_failed
    webhooks_backoff_base_s: float = Field(default=1.0, gt=0)
    webhooks_backoff_cap_s: float = Field(default=3600.0, gt=0)
    # POSTs in flight per process, all endpoints: keep it well above endpoint_concurrency times the
    # endpoints that may hang at once (each holds up to endpoint_concurrency slots for timeout_s).
    webhooks_concurrency: int = Field(default=256, ge=1, le=2000)
    webhooks_endpoint_concurrency: int = Field(default=16, ge=1, le=200)  # messages in flight per endpoint
    webhooks_batch_jobs: int = Field(default=20, ge=1, le=1000)  # jobs read per dispatcher batch
    webhooks_jobs_retention_s: float = Field(default=7 * 86_400, gt=0)  # delivered jobs (what replay can resend)
    webhooks_deliveries_retention_s: float = Field(default=30 * 86_400, gt=0)  # delivery records
