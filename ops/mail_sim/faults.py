"""The mail simulator's faults: what the next call (one e-mail: SMTP DATA or HTTP mail/send) gets.

- `every_nth` N: calls N, 2N, 3N ... fail with the temporary code (seed 003's fake providers: N=2);
- `failure_ratio` with `permanent_share`: a random share of calls fails, that share of them for good;
- `delay_s`: every answer waits this long (slow provider);
- `drop_ratio`: the connection is dropped after the message was received, before the answer
  (the sender cannot tell whether it was taken: it was not stored).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class MailFaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every_nth: int = Field(default=0, ge=0, description="Fail every Nth call (0: off)")
    failure_ratio: float = Field(default=0.0, ge=0, le=1)
    permanent_share: float = Field(default=0.0, ge=0, le=1, description="Of the random failures, this share permanent")
    delay_s: float = Field(default=0.0, ge=0, le=60)
    drop_ratio: float = Field(default=0.0, ge=0, le=1)
    temporary_smtp: str = "451 4.3.0 Temporary failure, try again later (mail-sim)"
    permanent_smtp: str = "550 5.1.1 Mailbox unavailable (mail-sim)"
    temporary_http: int = Field(default=503, ge=400, le=599)
    permanent_http: int = Field(default=400, ge=400, le=499)

    def active(self) -> dict[str, object]:
        return {k: v for k, v in self.model_dump().items()
                if k in ("every_nth", "failure_ratio", "permanent_share", "delay_s", "drop_ratio") and v}


@dataclass(frozen=True)
class Verdict:
    fail: str = ""  # "" | "temporary" | "permanent"
    drop: bool = False


class FaultPlan:
    """Counts calls and decides each one's fate from the current MailFaults."""

    def __init__(self, faults: MailFaults | None = None, rng: random.Random | None = None) -> None:
        self.faults = faults or MailFaults()
        self.initial = self.faults
        self.rng = rng or random.Random()
        self.calls = 0
        self.counts = {"calls": 0, "accepted": 0, "temporary": 0, "permanent": 0, "dropped": 0}

    def next_call(self) -> Verdict:
        f = self.faults
        self.calls += 1
        self.counts["calls"] += 1
        if f.every_nth and self.calls % f.every_nth == 0:
            verdict = Verdict(fail="temporary")
        elif f.failure_ratio and self.rng.random() < f.failure_ratio:
            verdict = Verdict(fail="permanent" if self.rng.random() < f.permanent_share else "temporary")
        elif f.drop_ratio and self.rng.random() < f.drop_ratio:
            verdict = Verdict(drop=True)
        else:
            verdict = Verdict()
        self.counts["dropped" if verdict.drop else verdict.fail or "accepted"] += 1
        return verdict
