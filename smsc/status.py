"""SMPP command_status codes: their names, and whether a submit_sm error is worth retrying."""

from __future__ import annotations

from smpplib import consts

_NAMES: dict[int, str] = {
    value: name.removeprefix("SMPP_")
    for name, value in vars(consts).items()
    if name.startswith("SMPP_ESME_") and isinstance(value, int)
}

# The SMSC could not take the message now; the same message may succeed later or elsewhere.
TEMPORARY = frozenset({
    consts.SMPP_ESME_RSYSERR,
    consts.SMPP_ESME_RMSGQFUL,
    consts.SMPP_ESME_RTHROTTLED,
    consts.SMPP_ESME_RSUBMITFAIL,
    consts.SMPP_ESME_RX_T_APPN,
    consts.SMPP_ESME_RX_R_APPN,
    consts.SMPP_ESME_RUNKNOWNERR,
})
# The SMSC asks us to slow down: back off the whole route, and do not count it against the message.
THROTTLING = frozenset({consts.SMPP_ESME_RTHROTTLED, consts.SMPP_ESME_RMSGQFUL})


def status_name(code: int) -> str:
    return _NAMES.get(code, f"0x{code:08X}")


def describe(code: int) -> str:
    return str(consts.DESCRIPTIONS.get(code, "unknown status"))


def is_temporary(code: int) -> bool:
    return code in TEMPORARY
