"""Store errors: what the rest of msgcore sees of the database. Driver errors are translated here
(and in the adapters of this package) and nowhere else."""

from __future__ import annotations

from collections.abc import Sequence


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreUnavailable(StoreError):
    """The database could not be reached or refused the operation for a transient reason; nothing
    was written (a transaction either commits whole or not at all). Retry later."""


class CheckpointMoved(StoreError):
    """A consumer's checkpoint was not where the consumer read it: another copy of the stage (or a
    previous life of this one) moved it. Nothing was written; reload the checkpoint and read again."""

    def __init__(self, checkpoints: Sequence[str]) -> None:
        super().__init__(f"checkpoints moved meanwhile: {list(checkpoints)[:5]}")
        self.checkpoints = list(checkpoints)


class Fenced(StoreError):
    """The writer's ownership (owner document, epoch) was taken over: a stale owner must not commit.
    Nothing was written."""

    def __init__(self, owner: str, epoch: int) -> None:
        super().__init__(f"owner {owner} epoch {epoch} is no longer current")
        self.owner = owner
        self.epoch = epoch


class GapInTopic(StoreError):
    """A range read below the topic's counter came back short: the log is damaged (positions are
    dense by construction). Raised loudly rather than skipping a message."""

    def __init__(self, topic: str, start: int, end: int, found: int) -> None:
        super().__init__(f"topic {topic}: positions [{start}, {end}) hold {found} events, expected {end - start}")
        self.topic = topic


class HistoryLost(StoreError):
    """A change stream cannot resume where it was asked to: that point is no longer in the server's
    oplog (or the server refused the resume). Following on from elsewhere would skip events."""



class RouteNotDrained(StoreError):
    """A route's partitioning may change only while nothing of it is in flight: the route disabled,
    every message in its send topics sent (backlog 0) and none held on a timer for them. Otherwise
    messages would wait in topics (or attempts) that no connector reads any more."""

    def __init__(self, route_id: str, why: str) -> None:
        super().__init__(f"route {route_id}: partitions can change only when the route is drained: {why}")
        self.route_id = route_id
        self.why = why
