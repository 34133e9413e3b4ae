"""A circuit breaker per route (after postman, seed 003). Pure: the caller passes the time.

    closed ──(failures >= max_failures, or ratio >= failure_ratio over >= min_calls, within window_s)──> open
    open ──(cool_down_s passed)──> half_open: `probes` calls let through, the others refused
    half_open ──probe succeeded──> closed (the window starts empty)
    half_open ──probe failed──> open (a new cool-down)

Only failures of the route count (a temporary provider error, a time-out, a dropped connection); a
message's own fault (a permanent refusal of one recipient, bad input) is `record_neutral` or not
recorded at all. Every change of state is returned as a `Transition`, for the caller to log and to
put into the events it writes. An OPEN route counts as DOWN for routing (`route_status`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerSettings(BaseModel):
    """A route's breaker (part of the route's definition)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_failures: int = Field(default=5, ge=1, le=10_000, description="Failures within the window that open it")
    failure_ratio: float = Field(default=0.5, gt=0, le=1, description="Share of failed calls that opens it")
    min_calls: int = Field(default=10, ge=1, le=10_000, description="Calls in the window before the ratio counts")
    window_s: float = Field(default=60.0, gt=0, le=86_400)
    cool_down_s: float = Field(default=30.0, ge=0, le=86_400, description="Open this long before a probe")
    probes: int = Field(default=1, ge=1, le=100, description="Calls let through while half-open")


@dataclass(frozen=True, slots=True)
class Transition:
    route_id: str
    before: BreakerState
    after: BreakerState
    at: datetime
    reason: str

    def describe(self) -> str:
        return f"breaker route={self.route_id}: {self.before.value} -> {self.after.value} ({self.reason})"


class CircuitBreaker:
    """The breaker of one route, in the memory of the process that owns the route's send topics (only
    that process calls the route, so only it can tell whether the route works)."""

    def __init__(self, route_id: str, settings: BreakerSettings | None = None) -> None:
        self.route_id = route_id
        self.settings = settings or BreakerSettings()
        self.state = BreakerState.CLOSED
        self.opened_at: datetime | None = None
        self._calls: deque[tuple[datetime, bool]] = deque()  # (when, failed), within the window
        self._probes_out = 0

    def state_at(self, now: datetime) -> BreakerState:
        """The state at `now` (an open breaker whose cool-down passed is half-open), without changing it."""
        if self.state == BreakerState.OPEN and self._cooled(now):
            return BreakerState.HALF_OPEN
        return self.state

    def allow(self, now: datetime) -> tuple[bool, Transition | None]:
        """May a call go to the route now? Half-open lets `probes` calls through at a time."""
        change = None
        if self.state == BreakerState.OPEN and self._cooled(now):
            change = self._move(BreakerState.HALF_OPEN, now, f"cool-down of {self.settings.cool_down_s:g}s passed")
        if self.state == BreakerState.CLOSED:
            return True, change
        if self.state == BreakerState.HALF_OPEN and self._probes_out < self.settings.probes:
            self._probes_out += 1
            return True, change
        return False, change

    def record(self, now: datetime, failed: bool) -> Transition | None:
        """The outcome of a call that `allow` let through."""
        if self.state == BreakerState.HALF_OPEN:
            self._probes_out = max(0, self._probes_out - 1)
            if failed:
                return self._open(now, "the probe failed")
            self._calls.clear()
            return self._move(BreakerState.CLOSED, now, "the probe succeeded")
        if self.state == BreakerState.OPEN:
            return None  # a call let through before the breaker opened: already counted as open
        self._calls.append((now, failed))
        self._forget(now)
        failures = sum(1 for _, f in self._calls if f)
        s = self.settings
        if failed and failures >= s.max_failures:
            return self._open(now, f"{failures} failures within {s.window_s:g}s")
        if failed and len(self._calls) >= s.min_calls and failures / len(self._calls) >= s.failure_ratio:
            return self._open(now, f"{failures} of {len(self._calls)} calls failed within {s.window_s:g}s")
        return None

    def release_probe(self) -> None:
        """A probe that `allow` let through was not made after all (nothing to send)."""
        if self.state == BreakerState.HALF_OPEN:
            self._probes_out = max(0, self._probes_out - 1)

    def _cooled(self, now: datetime) -> bool:
        return self.opened_at is None or now >= self.opened_at + timedelta(seconds=self.settings.cool_down_s)

    def _forget(self, now: datetime) -> None:
        horizon = now - timedelta(seconds=self.settings.window_s)
        while self._calls and self._calls[0][0] < horizon:
            self._calls.popleft()

    def _open(self, now: datetime, reason: str) -> Transition:
        self.opened_at = now
        self._calls.clear()
        self._probes_out = 0
        return self._move(BreakerState.OPEN, now, reason)

    def _move(self, after: BreakerState, now: datetime, reason: str) -> Transition:
        before, self.state = self.state, after
        return Transition(self.route_id, before, after, now, reason)
