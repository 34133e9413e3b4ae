"""Typed domain errors. They carry data; the API maps them to HTTP in one place."""

from __future__ import annotations


class DomainError(Exception):
    code = "domain_error"


class InvalidTransition(DomainError):
    """An event that the message's current state does not allow."""

    code = "invalid_transition"

    def __init__(self, message_id: str, state: str | None, event_type: str) -> None:
        super().__init__(f"message {message_id}: {event_type} not allowed in state {state}")
        self.message_id = message_id
        self.state = state
        self.event_type = event_type


class NoRoute(DomainError):
    code = "no_route"

    def __init__(self, destination: str) -> None:
        super().__init__(f"no route for destination {destination}")
        self.destination = destination


class TooManyParts(DomainError):
    code = "too_many_parts"

    def __init__(self, parts: int, limit: int) -> None:
        super().__init__(f"text needs {parts} parts, the limit is {limit}")
        self.parts = parts
        self.limit = limit
