"""query_sm and cancel_sm: the state of a message (its fold) and its cancellation.

cancel_sm cancels only a message still `accepted` (not yet routed): `canceled` is appended as its
next seq, so it races safely on the unique (message_id, seq) index with the router (or the timer of
a scheduled message): whichever commits first wins, the loser is dropped (the router skips a
canceled message; a cancel that lost answers ESME_RCANCELFAIL). A routed message is not canceled:
its connector may be submitting it this very moment, and the log must never say `canceled` for a
message that reached the SMSC.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from core.domain.events import EventType
from core.domain.message import MessageState, event_doc
from core.store.errors import StoreError
from core.store.eventstore import EventStore
from core.store.smpp_accounts import SmppAccount
from core.store.topics import Write
from smsc.esme_server import wire
from smsc.pdu import ESME_RCANCELFAIL, ESME_RINVMSGID, ESME_RQUERYFAIL, MESSAGE_STATES, as_str

log = logging.getLogger(__name__)

MAX_ID_LEN = 64
# msgcore state -> SMPP message_state (v3.4 section 5.2.28).
SMPP_STATE = {"delivered": "DELIVRD", "expired": "EXPIRED", "canceled": "DELETED", "undelivered": "UNDELIV",
              "failed": "UNDELIV", "dead_lettered": "UNDELIV", "rejected": "REJECTD", "unknown": "UNKNOWN"}
CANCELABLE = frozenset({"accepted"})


def smpp_state(state: str) -> int:
    """The message_state of a msgcore state; what is not final is ENROUTE."""
    return MESSAGE_STATES[SMPP_STATE.get(state, "ENROUTE")]


def smpp_final_date(at: datetime | None) -> str:
    """An SMPP absolute time in UTC (`YYMMDDhhmmss000+`), or "" when not final."""
    return "" if at is None else at.astimezone(UTC).strftime("%y%m%d%H%M%S") + "000+"


async def _own_state(events: EventStore, account: SmppAccount, message_id: str) -> MessageState | None:
    """The message's state when it belongs to the account's tenant (another tenant's id is unknown)."""
    if not message_id or len(message_id) > MAX_ID_LEN:
        return None
    state = await events.state(message_id)
    return state if state is not None and state.tenant_id == account.tenant_id else None


async def query_sm(events: EventStore, account: SmppAccount, pdu: Any) -> bytes:
    """The query_sm_resp of a query: the message's state, and the time it became final."""
    message_id = as_str(pdu.message_id) or ""
    try:
        state = await _own_state(events, account, message_id)
    except StoreError as e:
        log.warning("esme-server %s: query_sm %s failed: %s", account.system_id, message_id, e)
        return wire.response("query_sm_resp", pdu.sequence, ESME_RQUERYFAIL, message_id=message_id, message_state=0)
    if state is None:
        return wire.response("query_sm_resp", pdu.sequence, ESME_RINVMSGID, message_id=message_id, message_state=0)
    final = smpp_state(state.state) != MESSAGE_STATES["ENROUTE"]
    final_at = None
    if final:
        final_at = (await events.load_events(message_id))[-1].at
    return wire.response("query_sm_resp", pdu.sequence, message_id=message_id,
                         final_date=smpp_final_date(final_at), message_state=smpp_state(state.state), error_code=0)


async def cancel_sm(events: EventStore, account: SmppAccount, request: wire.CancelSm, seq: int,
                    now: datetime) -> bytes:
    """The cancel_sm_resp: ROK once `canceled` is committed, ESME_RCANCELFAIL when the message has
    moved on (or moves on while we commit), ESME_RINVMSGID for an unknown id. Only by message_id
    (cancelling every message of a source/destination pair is not supported)."""
    try:
        state = await _own_state(events, account, request.message_id)
        if state is None:
            return wire.header_only(wire.CANCEL_SM_RESP, seq, ESME_RINVMSGID)
        if state.state not in CANCELABLE:
            log.info("esme-server %s: cancel_sm of %s refused: it is %s", account.system_id, state.message_id,
                     state.state)
            return wire.header_only(wire.CANCEL_SM_RESP, seq, ESME_RCANCELFAIL)
        doc = event_doc(state, EventType.CANCELED, now, {"reason": "canceled by the ESME (cancel_sm)",
                                                          "attempted": False})
        result = await events.log.commit([Write(state.message_id, [doc], clear_timer=True)])
    except StoreError as e:
        log.warning("esme-server %s: cancel_sm %s failed: %s", account.system_id, request.message_id, e)
        return wire.header_only(wire.CANCEL_SM_RESP, seq, ESME_RCANCELFAIL)
    if state.message_id in result.conflicts:
        log.info("esme-server %s: cancel_sm of %s lost the race", account.system_id, state.message_id)
        return wire.header_only(wire.CANCEL_SM_RESP, seq, ESME_RCANCELFAIL)
    log.info("esme-server %s: message %s canceled", account.system_id, state.message_id)
    return wire.header_only(wire.CANCEL_SM_RESP, seq)
