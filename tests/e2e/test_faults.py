"""A smaller version of the fault-injection suite (ops/faults): real processes on loopback, a process
killed (-9) or paused mid-run, and then: nothing lost, every duplicate at the SMSC explained by the
route's policy, and `msgcore verify` clean across both stores (topics gapless, every position below a
checkpoint with its outcome, no attempt left open, nothing billed twice, the spend equal to the bills).
The paused connector's scenario also checks that the standby took the route over while it slept (a
note otherwise), so the resumed one could only be fenced."""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.faults.run import SCENARIOS, Servers, run_scenario

IN_CI = ["graceful restarts", "kill -9 api", "kill -9 router", "kill -9 connector", "kill -9 scheduler",
         "kill -9 projector", "two connectors race", "connector paused past lease"]
MESSAGES = 200


@pytest.mark.parametrize("name", IN_CI)
async def test_fault_scenario(name: str, server_urls: dict[str, str], tmp_path: Path) -> None:
    scenario = next(s for s in SCENARIOS if s.name == name)
    outcome = await run_scenario(scenario, Servers(server_urls["mongo"], server_urls["pg"]), MESSAGES, tmp_path,
                                 deadline_s=240)
    assert outcome.notes == [], outcome.notes
    assert outcome.accepted == MESSAGES
    assert outcome.lost == 0
    assert outcome.delivered + outcome.expired == MESSAGES
    assert outcome.smsc_duplicates <= outcome.explained
    assert outcome.verify == "clean"
    if name == "graceful restarts":
        assert outcome.smsc_duplicates == 0 and outcome.explained == 0
