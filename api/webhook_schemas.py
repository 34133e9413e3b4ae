"""Request and response bodies of /v1/webhooks (api/routes/webhooks.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from core.domain.webhooks import ALL_EVENTS, EVENT_TYPES, MAX_URL_CHARS


def _event_list(value: list[str]) -> list[str]:
    """`["*"]` alone, or known event types without repeats."""
    if ALL_EVENTS in value:
        if value != [ALL_EVENTS]:
            raise ValueError('"*" stands for every event type and cannot be combined with others')
        return value
    unknown = sorted(set(value) - EVENT_TYPES)
    if unknown:
        raise ValueError(f"unknown event type(s) {unknown}; known: {sorted(EVENT_TYPES)} or ['*']")
    return list(dict.fromkeys(value))


EventList = Annotated[list[Annotated[str, Field(max_length=40)]], Field(min_length=1, max_length=len(EVENT_TYPES),
                                       description='Event types to receive, e.g. ["delivered", "undelivered"], '
                                                   'or ["*"] for all'),
                      AfterValidator(_event_list)]
Url = Annotated[str, Field(min_length=8, max_length=MAX_URL_CHARS,
                           description="http(s) URL receiving a POST per event")]


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url
    events: EventList


class WebhookUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Url | None = None
    events: EventList | None = None
    enabled: bool | None = None


class WebhookPublic(BaseModel):
    id: str
    url: str
    events: list[str]
    enabled: bool
    created_at: datetime
    updated_at: datetime


class WebhookCreated(WebhookPublic):
    secret: str = Field(description="Signs every delivery (Msgcore-Signature); shown only now")


class WebhookSecret(BaseModel):
    id: str
    secret: str = Field(description="The new signing secret; shown only now")


class WebhookList(BaseModel):
    webhooks: list[WebhookPublic]


class DeliveryAttempt(BaseModel):
    webhook_id: str
    event_id: str
    type: str
    seq: int
    attempt: int
    status: int | None = Field(description="HTTP status of the answer; null: none (timeout, refused)")
    latency_ms: float
    at: datetime
    outcome: str = Field(description="delivered | failed (retried later) | webhook_failed (given up)")
    error: str | None = None


class DeliveryList(BaseModel):
    message_id: str
    attempts: list[DeliveryAttempt] = Field(description="Every attempt for the message's events, oldest first")


class ReplayResult(BaseModel):
    webhook_id: str
    events: int = Field(description="Events enqueued again")
    jobs: int = Field(description="Delivery jobs written")
    more: bool = Field(description="True when the replay stopped at its bound: call again with `since` = `until`")
    until: datetime | None = Field(default=None, description="Creation time of the newest job replayed")
