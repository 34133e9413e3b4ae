"""Reassembly of long messages sent in parts (UDH concatenation or SAR TLVs).

The parts of one message are held in memory until all have arrived, then joined into ONE message
(one `accepted` event, its parts counted again by msgcore, which splits it again for the SMSC).
Choice: every part's submit_sm_resp is held too and answered when the whole message is committed,
all with the same msgcore message id; a message whose parts do not all arrive within `hold_s` is
refused part by part (ESME_RSUBMITFAIL), nothing of it accepted. So an ESME never holds a
message id for a part that could still be lost, at the cost of window slots while parts wait.

A message is keyed by the account, source, destination, reference and total: parts may come over
different binds of one account. Held parts are lost with the process, unanswered: the ESME resends
them after its response time-out (nothing was accepted). No I/O here; the caller passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from smsc.esme_server.submit import SubmitRequest, joined

W = TypeVar("W")
Key = tuple[str, str, str, int, int]


@dataclass
class _Held(Generic[W]):
    since: float
    parts: dict[int, SubmitRequest] = field(default_factory=dict)
    waiters: list[W] = field(default_factory=list)


class Reassembler(Generic[W]):
    def __init__(self, hold_s: float = 60.0, max_messages: int = 10_000) -> None:
        self.hold_s = hold_s
        self.max_messages = max_messages
        self._held: dict[Key, _Held[W]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def add(self, account: str, req: SubmitRequest, waiter: W, now: float) -> tuple[SubmitRequest, list[W]] | None:
        """Hold a part (with `waiter`, what answers its submit_sm); when it completes its message,
        return (the joined request, the waiters of every part received) and forget the message.
        A part received twice replaces the earlier copy; both waiters are answered."""
        assert req.segment is not None
        key = (account, req.source, req.destination, req.segment.ref, req.segment.total)
        held = self._held.get(key)
        if held is None:
            if len(self._held) >= self.max_messages:
                raise OverflowError(f"{len(self._held)} partial messages held")
            held = self._held[key] = _Held(since=now)
        held.parts[req.segment.index] = req
        held.waiters.append(waiter)
        if len(held.parts) < req.segment.total:
            return None
        del self._held[key]
        return joined(list(held.parts.values())), held.waiters

    def expired(self, now: float) -> list[list[W]]:
        """The waiters of each message held longer than `hold_s` (forgotten now)."""
        old = [k for k, h in self._held.items() if now - h.since > self.hold_s]
        return [self._held.pop(k).waiters for k in old]
