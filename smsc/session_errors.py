"""The errors an `SmppSession` (smsc/session.py) raises, and the result of one submit_sm."""

from __future__ import annotations

from dataclasses import dataclass


class SessionError(Exception):
    """Base of the errors an `SmppSession` raises."""


class ConnectFailed(SessionError):
    """TCP connect (or the bind exchange) failed at the transport level."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(f"connect to {host}:{port} failed: {reason}")
        self.host, self.port, self.reason = host, port, reason


class BindFailed(SessionError):
    """The SMSC answered the bind with a non-zero command status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"bind refused with status 0x{status:02x}")
        self.status = status


class SessionClosed(SessionError):
    """The session is not (or no longer) bound; a pending submit's outcome is unknown."""


class MalformedPdu(SessionError):
    """The SMSC sent bytes that are not a valid PDU. `fatal`: its length cannot be trusted, so the
    stream is out of step and the bind must go; otherwise the PDU was skipped whole."""

    def __init__(self, reason: str, *, command_id: int = 0, sequence: int = 0, fatal: bool = False) -> None:
        super().__init__(reason)
        self.command_id, self.sequence, self.fatal = command_id, sequence, fatal


class MalformedResponse(SessionError):
    """The answer to a submit_sm could not be parsed: the SMSC may or may not have accepted it."""


class SubmitTimeout(SessionError):
    """No submit_sm_resp within the timeout; the SMSC may or may not have accepted the message."""

    def __init__(self, sequence: int, timeout_s: float) -> None:
        super().__init__(f"no submit_sm_resp for sequence {sequence} within {timeout_s}s")
        self.sequence, self.timeout_s = sequence, timeout_s


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """The SMSC's answer to one submit_sm; `message_id` is None unless status is 0.

    `generic_nack` is True when the SMSC answered with generic_nack instead of submit_sm_resp (it
    could not take the PDU at all); `status` is then the nack's status, which may be 0.
    """

    sequence: int
    status: int
    message_id: str | None
    generic_nack: bool = False
