"""Switchable faults of the SMSC simulator: the settings model and the decisions it drives.

`FaultSettings` is what an operator sets (CLI flags, the control API, `Simulator.set_faults`); every
fault is off by default, so a simulator without settings behaves exactly as before. `FaultEngine`
holds the live state the faults need (a seeded RNG, the sliding throttle windows, the bind-refusal
deadline, counters and per-second submit counts) and answers the simulator's questions: what status
does this submit_sm get, which stat does its receipt carry, after how long, should a malformed PDU go
out now. It does no I/O; the simulator calls it from its event loop only.

Faults:

- `error_ratio`: that share of submit_sm is answered with an error instead of a message id (no
  receipt, no journal line); `permanent_share` of those take a code from `permanent_codes`, the
  rest from `temporary_codes` (a random code of the list each time).
- `throttle_tps`: above this many accepted submit_sm in the last second (sliding window) per
  system_id (or per bind, `throttle_scope`), the answer is ESME_RTHROTTLED (0x58). Throttled submits
  do not count towards the window, so the accepted rate stays at the limit.
- `drop_after_pdus`: a connection is closed (no unbind) right after its N-th PDU (the bind counts);
  that PDU is processed but its response is lost with the connection (for a submit_sm: accepted,
  journaled, receipt scheduled, outcome unknown to the client). New binds are accepted as usual.
- `refuse_binds_s`: binds are answered ESME_RBINDFAIL (0x0D) for this many seconds after the
  setting was made (0 lifts it at once).
- receipts: `receipt_delay_s` + a uniform random `receipt_jitter_s`; `receipt_mode` `normal`,
  `never` (no receipt for submits made while set), `out_of_order` (due receipts are held per
  system_id in groups of `reorder_window`, or for at most 0.3 s, and released shuffled), or
  `before_response` (the deliver_sm is written before the submit_sm_resp of its own submit, on the
  same transceiver bind when it can receive); `receipt_stat` or a weighted `receipt_stat_mix`.
- `malformed_ratio`: before that share of deliver_sm a malformed PDU goes out on the same bind (one
  of `malformed_kinds`, each keeping the byte stream in step); the receipt itself still follows.
- `seed`: seeds the RNG behind every random choice above, for reproducible runs.
"""

from __future__ import annotations

import random
import struct
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from smsc.pdu import (
    ESME_RINVDSTADR,
    ESME_RINVSRCADR,
    ESME_RMSGQFUL,
    ESME_ROK,
    ESME_RSYSERR,
    ESME_RTHROTTLED,
    MESSAGE_STATES,
    SequenceCounter,
)

ReceiptMode = Literal["normal", "never", "out_of_order", "before_response"]
MalformedKind = Literal["unknown_command", "short_length", "bad_tlv"]
MALFORMED_KINDS: tuple[MalformedKind, ...] = ("unknown_command", "short_length", "bad_tlv")

RATE_KEEP_S = 60
REORDER_MAX_WAIT_S = 0.3
UNKNOWN_COMMAND_ID = 0x00000777  # not a command of SMPP v3.4
DELIVER_SM_ID = 0x00000005

_OUTCOMES = ("ok", "throttled", "failed")


class FaultSettings(BaseModel):
    """What the simulator does wrong, on purpose. All faults are off by default."""

    model_config = ConfigDict(extra="forbid")

    error_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="share of submit_sm answered with an error")
    temporary_codes: list[int] = Field(default_factory=lambda: [ESME_RMSGQFUL, ESME_RSYSERR])
    permanent_codes: list[int] = Field(default_factory=lambda: [ESME_RINVDSTADR, ESME_RINVSRCADR])
    permanent_share: float = Field(default=0.0, ge=0.0, le=1.0, description="share of the errors that are permanent")
    throttle_tps: float | None = Field(default=None, gt=0, description="accepted submit_sm per second before 0x58")
    throttle_scope: Literal["system_id", "bind"] = "system_id"
    drop_after_pdus: int | None = Field(default=None, ge=1, description="close a connection after its N-th PDU")
    refuse_binds_s: float = Field(default=0.0, ge=0.0, description="refuse binds for this long after being set")
    receipt_delay_s: float = Field(default=0.2, ge=0.0)
    receipt_jitter_s: float = Field(default=0.0, ge=0.0)
    receipt_mode: ReceiptMode = "normal"
    reorder_window: int = Field(default=8, ge=2, le=10_000, description="receipts shuffled together (out_of_order)")
    receipt_stat: str = "DELIVRD"
    receipt_stat_mix: dict[str, float] | None = None
    malformed_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    malformed_kinds: list[MalformedKind] = Field(default_factory=lambda: list(MALFORMED_KINDS), min_length=1)
    seed: int | None = None

    @field_validator("temporary_codes", "permanent_codes", mode="before")
    @classmethod
    def _codes(cls, value: Any) -> Any:
        """Accept ints or strings such as "0x14"; every code must be a non-zero command status."""
        if not isinstance(value, list):
            return value
        codes: list[int] = []
        for item in value:
            code = int(item, 0) if isinstance(item, str) else item
            if not isinstance(code, int) or isinstance(code, bool) or not 0 < code <= 0xFFFFFFFF:
                raise ValueError(f"not a non-zero command status: {item!r}")
            codes.append(code)
        return codes

    @field_validator("receipt_stat")
    @classmethod
    def _stat(cls, value: str) -> str:
        value = value.upper()
        if value not in MESSAGE_STATES:
            raise ValueError(f"unknown receipt stat {value!r}; one of {', '.join(MESSAGE_STATES)}")
        return value

    @field_validator("receipt_stat_mix")
    @classmethod
    def _mix(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        mix: dict[str, float] = {}
        for stat, weight in value.items():
            if stat.upper() not in MESSAGE_STATES:
                raise ValueError(f"unknown receipt stat {stat!r}; one of {', '.join(MESSAGE_STATES)}")
            if weight < 0:
                raise ValueError(f"negative weight for {stat}")
            mix[stat.upper()] = float(weight)
        if not mix or sum(mix.values()) <= 0:
            raise ValueError("receipt_stat_mix needs a positive weight")
        return mix

    @model_validator(mode="after")
    def _codes_present(self) -> FaultSettings:
        if self.error_ratio > 0:
            if self.permanent_share < 1 and not self.temporary_codes:
                raise ValueError("error_ratio with permanent_share < 1 needs temporary_codes")
            if self.permanent_share > 0 and not self.permanent_codes:
                raise ValueError("error_ratio with permanent_share > 0 needs permanent_codes")
        return self

    def active(self) -> list[str]:
        """Names of the faults that are switched on (for logs)."""
        defaults = FaultSettings()
        on = [name for name in ("error_ratio", "throttle_tps", "drop_after_pdus", "refuse_binds_s",
                                "receipt_jitter_s", "receipt_stat_mix", "malformed_ratio")
              if getattr(self, name) not in (None, 0, 0.0)]
        if self.receipt_mode != defaults.receipt_mode:
            on.append(f"receipt_mode={self.receipt_mode}")
        return on


class SubmitRates:
    """submit_sm per wall-clock second and system_id, for the last `keep_s` seconds.

    Each row is [second, ok, throttled, failed]; the newest row is last.
    """

    def __init__(self, keep_s: int = RATE_KEEP_S) -> None:
        self._keep_s = keep_s
        self._rows: dict[str, deque[list[int]]] = {}

    def count(self, system_id: str, outcome: int, now_s: int) -> None:
        rows = self._rows.get(system_id)
        if rows is None:
            rows = self._rows[system_id] = deque()
        if not rows or rows[-1][0] != now_s:
            rows.append([now_s, 0, 0, 0])
            while rows and rows[0][0] <= now_s - self._keep_s:
                rows.popleft()
        rows[-1][1 + outcome] += 1

    def snapshot(self, now_s: int | None = None) -> dict[str, list[dict[str, int]]]:
        """Per system_id, one entry per second that saw a submit_sm within the last `keep_s` s."""
        now_s = int(time.time()) if now_s is None else now_s
        out: dict[str, list[dict[str, int]]] = {}
        for system_id, rows in self._rows.items():
            entries = [
                {"second": r[0], "received": r[1] + r[2] + r[3], "ok": r[1], "throttled": r[2], "failed": r[3]}
                for r in rows
                if r[0] > now_s - self._keep_s
            ]
            if entries:
                out[system_id] = entries
        return out

    def clear(self) -> None:
        self._rows.clear()


class FaultEngine:
    """Live fault state of one simulator; event-loop only."""

    def __init__(self, settings: FaultSettings) -> None:
        self._initial = settings
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.rates = SubmitRates()
        self.counters: dict[str, int] = {}
        self._refuse_until = 0.0
        self._windows: dict[str, deque[float]] = {}
        self._mix_stats: list[str] = []
        self._mix_weights: list[float] = []
        self._reset_counters()
        self._apply(settings, set(FaultSettings.model_fields))

    # ---- settings --------------------------------------------------------------------------------

    def update(self, changes: Mapping[str, Any], *, replace: bool = False) -> FaultSettings:
        """Merge `changes` into the current settings (or replace them; missing fields take the
        model's defaults). Raises pydantic's ValidationError and changes nothing on bad input."""
        base: dict[str, Any] = {} if replace else self.settings.model_dump()
        new = FaultSettings.model_validate({**base, **changes})
        changed = set(FaultSettings.model_fields) if replace else set(changes)
        self._apply(new, changed)
        return new

    def reset(self) -> FaultSettings:
        """Back to the settings the simulator started with; counters and rates cleared."""
        self._reset_counters()
        self.rates.clear()
        self._apply(self._initial, set(FaultSettings.model_fields))
        return self._initial

    def _apply(self, new: FaultSettings, changed: set[str]) -> None:
        if "seed" in changed:
            self.rng.seed(new.seed)
        if "refuse_binds_s" in changed:
            self._refuse_until = time.monotonic() + new.refuse_binds_s if new.refuse_binds_s > 0 else 0.0
        if changed & {"throttle_tps", "throttle_scope"}:
            self._windows.clear()
        if new.receipt_stat_mix:
            self._mix_stats, self._mix_weights = list(new.receipt_stat_mix), list(new.receipt_stat_mix.values())
        else:
            self._mix_stats, self._mix_weights = [], []
        self.settings = new

    def _reset_counters(self) -> None:
        self.counters = {
            "submit_sm_ok": 0,
            "submit_sm_throttled": 0,
            "submit_sm_failed_temporary": 0,
            "submit_sm_failed_permanent": 0,
            "binds_refused": 0,
            "connections_dropped": 0,
            "receipts_withheld": 0,
            "receipts_reordered": 0,
            "receipts_before_response": 0,
            "malformed_sent": 0,
        }

    def refuse_binds_remaining_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return max(0.0, self._refuse_until - now)

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.counters,
            "refuse_binds_remaining_s": round(self.refuse_binds_remaining_s(), 3),
            "submit_per_second": self.rates.snapshot(),
        }

    # ---- decisions -------------------------------------------------------------------------------

    def submit_status(self, system_id: str, bind_key: str, now: float) -> int:
        """The command status for one submit_sm (ESME_ROK = accept it); counts it per second."""
        s = self.settings
        if s.throttle_tps is not None:
            key = system_id if s.throttle_scope == "system_id" else bind_key
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = deque()
            cutoff = now - 1.0
            while window and window[0] <= cutoff:
                window.popleft()
            if len(window) >= s.throttle_tps:
                self.counters["submit_sm_throttled"] += 1
                self.rates.count(system_id, 1, int(time.time()))
                return ESME_RTHROTTLED
            window.append(now)
        if s.error_ratio > 0 and self.rng.random() < s.error_ratio:
            permanent = s.permanent_share > 0 and self.rng.random() < s.permanent_share
            code = self.rng.choice(s.permanent_codes if permanent else s.temporary_codes)
            self.counters["submit_sm_failed_permanent" if permanent else "submit_sm_failed_temporary"] += 1
            self.rates.count(system_id, 2, int(time.time()))
            return code
        self.counters["submit_sm_ok"] += 1
        self.rates.count(system_id, 0, int(time.time()))
        return ESME_ROK

    def binds_refused(self, now: float | None = None) -> bool:
        if self._refuse_until == 0.0:
            return False
        if self.refuse_binds_remaining_s(now) > 0:
            self.counters["binds_refused"] += 1
            return True
        return False

    def should_drop(self, pdus_received: int) -> bool:
        limit = self.settings.drop_after_pdus
        return limit is not None and pdus_received >= limit

    def receipt_stat(self) -> str:
        if self._mix_stats:
            return self.rng.choices(self._mix_stats, self._mix_weights)[0]
        return self.settings.receipt_stat

    def receipt_delay(self) -> float:
        s = self.settings
        if s.receipt_jitter_s > 0:
            return s.receipt_delay_s + self.rng.uniform(0.0, s.receipt_jitter_s)
        return s.receipt_delay_s

    def shuffle(self, items: list[Any]) -> None:
        """Shuffle in place so that a list of two or more is never left in its original order."""
        if len(items) < 2:
            return
        original = list(items)
        self.rng.shuffle(items)
        if items == original:
            items.reverse()

    def malformed_pdu(self, seq: SequenceCounter) -> tuple[str, bytes] | None:
        """Now and then (`malformed_ratio`) the bytes of one malformed PDU to send, with its kind."""
        s = self.settings
        if s.malformed_ratio <= 0 or self.rng.random() >= s.malformed_ratio:
            return None
        kind = self.rng.choice(s.malformed_kinds)
        self.counters["malformed_sent"] += 1
        return kind, build_malformed(kind, seq.next_sequence())


def build_malformed(kind: MalformedKind, sequence: int) -> bytes:
    """One malformed PDU whose bytes are exactly what its command_length says (the stream stays in step).

    - unknown_command: a well-framed PDU with a command id SMPP v3.4 does not define;
    - short_length: command_length 12, shorter than the 16-byte header it must hold;
    - bad_tlv: a deliver_sm whose optional part ends in the middle of a TLV tag.
    """
    if kind == "unknown_command":
        body = b"\x00\x00\x00\x00"
        return struct.pack(">LLLL", 16 + len(body), UNKNOWN_COMMAND_ID, 0, sequence) + body
    if kind == "short_length":
        return struct.pack(">LLL", 12, DELIVER_SM_ID, 0)
    # service_type "", ton, npi, source "1", ton, npi, dest "2", esm_class .. sm_default_msg_id,
    # sm_length 0, then a lone byte where a TLV tag (2 bytes) must start.
    body = b"\x00" + b"\x01\x01" + b"1\x00" + b"\x01\x01" + b"2\x00" + b"\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    body += b"\x00"
    return struct.pack(">LLLL", 16 + len(body), DELIVER_SM_ID, 0, sequence) + body
