"""Routes and the strategies that pick one (after Envoy, seed 000). Pure: no I/O.

Priority 1 is the highest. A route is DOWN while its connection is down and BUSY while its window is
full. Among routes matching a destination, the longest matching prefix wins ("" is the default).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.domain.circuit_breaker import BreakerSettings
from core.domain.encoding import MoAlphabet
from core.domain.errors import NoRoute
from core.domain.events import EventType
from core.domain.message import MessageState, event_doc, lane_of, partition_of, routed_message, send_topic


class Strategy(StrEnum):
    LOAD_BALANCE = "load_balance"
    FAILOVER = "failover"
    SMART = "smart"


class RouteStatus(StrEnum):
    UP = "up"
    BUSY = "busy"
    DOWN = "down"


class UnknownOutcomePolicy(StrEnum):
    """What to do with a message whose earlier submit_sm may or may not have reached the SMSC."""

    RESEND = "resend"  # at-least-once: send again; the `sent` event says possible_duplicate
    HOLD = "hold"  # at-most-once: append `unknown` and wait for an operator


class MailTls(StrEnum):
    """How an `smtp` route secures its connections."""

    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


EMAIL_KINDS = frozenset({"smtp", "http"})  # e-mail routes; every other kind is SMPP (channel sms)
HTTP_PROVIDERS = frozenset({"sendgrid"})


class BindType(StrEnum):
    TRANSCEIVER = "transceiver"
    TRANSMITTER_RECEIVER = "transmitter_receiver"  # one transmitter and one receiver bind per `binds`


class Route(BaseModel):
    """An upstream: an SMPP connection to an SMSC, with its commercial terms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    kind: str = "smpp"
    host: str = "127.0.0.1"
    port: int = Field(default=2775, ge=1, le=65535)
    system_id: str = "msgcore"
    password: str = "secret"
    system_type: str = ""
    priority: int = Field(default=1, ge=1)
    weight: int = Field(default=1, ge=1)
    prefixes: tuple[str, ...] = ("",)
    tps: int = Field(default=0, ge=0)  # 0 = no limit
    binds: int = Field(default=1, ge=1, le=32)
    bind_type: BindType = BindType.TRANSCEIVER
    # Source address TON/NPI: None = derived from the sender (alphanumeric 5/0, numeric 1/1).
    source_ton: int | None = Field(default=None, ge=0, le=6)
    source_npi: int | None = Field(default=None, ge=0, le=18)
    dest_ton: int = Field(default=1, ge=0, le=6)
    dest_npi: int = Field(default=1, ge=0, le=18)
    window: int = Field(default=20, ge=1, le=1000)
    # Send topics split by hash of message id (core.domain.message.partition_of); each partition has
    # its own owner, so several connector processes share the route. Changed only while the route is
    # drained (core/store/routes.py).
    partitions: int = Field(default=1, ge=1, le=64)
    price_per_part: int = Field(default=0, ge=0)  # minor units
    currency: str = "EUR"
    group: str = "default"
    strategy: Strategy = Strategy.FAILOVER
    on_unknown_outcome: UnknownOutcomePolicy = UnknownOutcomePolicy.RESEND
    # How this SMSC's MO with data_coding 0 is to be read: GSM 03.38 (most), Latin-1 or ASCII.
    mo_alphabet: MoAlphabet = MoAlphabet.GSM
    enabled: bool = True
    # E-mail routes (kind `smtp` or `http`, sent by `msgcore mailer`): `host`, `port` and `password`
    # above are the SMTP server's; `price_per_part` is the price per e-mail.
    tls: MailTls = MailTls.NONE
    username: str = ""
    pool: int = Field(default=2, ge=1, le=64)  # SMTP connections (or HTTP requests in flight) per route
    provider: str = ""  # kind `http`: "sendgrid" (v3 mail/send)
    base_url: str = ""  # kind `http`: the provider's API, e.g. https://api.sendgrid.com
    api_key: str = ""
    breaker: BreakerSettings = BreakerSettings()
    # The key that verifies the provider's event webhook (POST /v1/providers/{route}/events): SendGrid's
    # Signed Event Webhook verification key (base64 DER ECDSA P-256 public key); "" = events refused.
    events_key: str = Field(default="", max_length=4096)

    @property
    def channel(self) -> str:
        return "email" if self.kind in EMAIL_KINDS else "sms"

    @model_validator(mode="after")
    def _http_names_its_provider(self) -> Route:
        if self.kind == "http" and self.provider not in HTTP_PROVIDERS:
            raise ValueError(f"a route of kind http needs provider one of {sorted(HTTP_PROVIDERS)}")
        return self

    @property
    def tps_per_owner(self) -> float:
        """The TPS one connector may use: the route's limit (0 = none) split evenly between its
        partitions' owners (a carrier's limit holds for the whole account, not per bind)."""
        return self.tps / self.partitions if self.tps else 0.0

    def match_length(self, destination: str) -> int:
        """Length of the longest prefix of this route matching `destination`, or -1."""
        digits = destination.lstrip("+")
        best = -1
        for p in self.prefixes:
            p = p.lstrip("+")
            if digits.startswith(p) and len(p) > best:
                best = len(p)
        return best


def candidates(routes: Sequence[Route], destination: str, excluded: Sequence[str] = (),
               channel: str = "sms") -> list[Route]:
    """Enabled routes of `channel` whose prefix match is the longest, not excluded, in priority order."""
    email = channel == "email"  # on the hot path of every acceptance: no property call per route
    scored = [(r.match_length(destination), r) for r in routes
              if r.enabled and (r.kind in EMAIL_KINDS) is email and r.id not in excluded]
    scored = [(n, r) for n, r in scored if n >= 0]
    if not scored:
        return []
    longest = max(n for n, _ in scored)
    return sorted((r for n, r in scored if n == longest), key=lambda r: (r.priority, r.id))


def choose_route(routes: Sequence[Route], destination: str, status: Mapping[str, RouteStatus],
                 excluded: Sequence[str] = (), rng: random.Random | None = None, channel: str = "sms") -> Route:
    """The route of `channel` for `destination`. If every candidate is DOWN, the first by priority is
    chosen anyway: the message waits for it rather than failing. Raises NoRoute if nothing matches."""
    # A message that failed on every matching route tries them again rather than failing for want
    # of a route: its exceptions steer it away from a bad route only while there is another one.
    pool = candidates(routes, destination, excluded, channel) or candidates(routes, destination, (), channel)
    if not pool:
        raise NoRoute(destination)
    strategy = pool[0].strategy

    def st(r: Route) -> RouteStatus:
        return status.get(r.id, RouteStatus.DOWN)

    if strategy == Strategy.FAILOVER:
        return next((r for r in pool if st(r) != RouteStatus.DOWN), pool[0])
    if strategy == Strategy.LOAD_BALANCE:
        return next((r for r in pool if st(r) == RouteStatus.UP),
                    next((r for r in pool if st(r) != RouteStatus.DOWN), pool[0]))
    return _smart(pool, st, rng or random.Random())


def _smart(pool: list[Route], st: object, rng: random.Random) -> Route:
    """Balance by weight across the highest priority level with a live route; prefer non-BUSY."""
    status_of = st  # callable Route -> RouteStatus
    for level in sorted({r.priority for r in pool}):
        live = [r for r in pool if r.priority == level and status_of(r) != RouteStatus.DOWN]  # type: ignore[operator]
        if live:
            free = [r for r in live if status_of(r) == RouteStatus.UP] or live  # type: ignore[operator]
            return rng.choices(free, weights=[r.weight for r in free])[0]
    return pool[0]


def routed_event(state: MessageState, route: Route, now: datetime) -> tuple[dict[str, Any], str]:
    """The `routed` event of `state` onto `route`, and the send topic (lane, partition) it goes to."""
    doc = event_doc(state, EventType.ROUTED, now,
                    {"route_id": route.id, "price_per_part": route.price_per_part, "currency": route.currency,
                     "strategy": route.strategy.value, "message": routed_message(state)}, route_id=route.id)
    return doc, send_topic(route.id, lane_of(state), partition_of(state.message_id, route.partitions))
