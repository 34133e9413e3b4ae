"""A campaign's own life (separate from its messages' lives), as a pure state machine.

    draft ─start─> running <─resume/pause─> paused
      │  └start (send_at ahead)─> scheduled ─(send_at reached, by the scheduler)─> running
      └──────────── cancel (from draft, scheduled, running, paused) ─> canceling ─> canceled
    running ─(nothing left to send, no upload going on)─> completed

Recipients are accepted as messages when uploaded (draft, scheduled, running or paused); they wait in
the campaign's lane, which the stages claim only while the campaign is `running`. So `start`,
`pause` and `resume` are one write to the lane, whatever the campaign's size. `cancel` ends every
message not yet handed to an SMSC as `canceled` (the scheduler's cancel sweep), then the campaign is
`canceled`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum


class CampaignStatus(StrEnum):
    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELING = "canceling"
    CANCELED = "canceled"
    COMPLETED = "completed"


class CampaignAction(StrEnum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"


class CampaignTransitionError(ValueError):
    def __init__(self, action: str, status: str) -> None:
        super().__init__(f"cannot {action} a campaign that is {status}")
        self.action = action
        self.status = status


S = CampaignStatus
UPLOADABLE = frozenset({S.DRAFT, S.SCHEDULED, S.RUNNING, S.PAUSED})
FINAL = frozenset({S.CANCELED, S.COMPLETED})

# Which lane state each campaign status puts its lane in; only `active` lanes are claimed. A completed
# campaign's lane stays active: an operator may requeue one of its dead letters.
LANE_STATE: dict[CampaignStatus, str] = {
    S.DRAFT: "draft", S.SCHEDULED: "scheduled", S.RUNNING: "active", S.PAUSED: "paused",
    S.CANCELING: "canceling", S.CANCELED: "canceled", S.COMPLETED: "active",
}


def apply_action(status: CampaignStatus, action: CampaignAction, send_at: datetime | None,
                 now: datetime) -> CampaignStatus:
    """The status after `action`; raises CampaignTransitionError when it does not apply."""
    match action:
        case CampaignAction.START if status == S.DRAFT:
            return S.SCHEDULED if send_at is not None and send_at > now else S.RUNNING
        case CampaignAction.PAUSE if status in (S.RUNNING, S.SCHEDULED):
            return S.PAUSED
        case CampaignAction.RESUME if status == S.PAUSED:
            return S.SCHEDULED if send_at is not None and send_at > now else S.RUNNING
        case CampaignAction.CANCEL if status in (S.DRAFT, S.SCHEDULED, S.RUNNING, S.PAUSED):
            return S.CANCELING
    raise CampaignTransitionError(action.value, status.value)
