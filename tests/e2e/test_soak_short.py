"""A short soak (ops/soak.py): about two minutes at a low rate, with an SMSC that drops its binds and a
restart of the MongoDB-wire server on the way.

The soak starts its own embedded MongoDB-wire server (MSGCORE_MONGO_URL left out: the session's server
is not the soak's to restart) and uses the session's PostgreSQL. The soak tool judges drift itself
(RSS and open-file growth, p99 trend, backlog growth: thresholds are about leaks, not speed); this test
asserts its verdict and the facts behind it: both faults happened and the stack came back from them,
nothing lost, the backlog back to zero, `msgcore verify` clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak_with_faults_loses_nothing_drains_and_shows_no_drift(server_urls: dict[str, str],
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if k != "MSGCORE_MONGO_URL"}
    env["MSGCORE_PG_URL"] = server_urls["pg"]
    proc = subprocess.run([sys.executable, "-m", "ops.soak", "--rate", "5", "--minutes", "2", "--interval", "20",
                           "--warmup", "1", "--drain-timeout", "60", "--fault-every", "2",
                           "--faults", "smsc-drop,store-restart", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert result["fails"] == []
    # After samples 2 and 4 (none after the last): the connector bound again, the api was ready again.
    assert [(f["after_sample"], f["kind"], f["ok"]) for f in result["faults"]] == [
        (2, "smsc-drop", True), (4, "store-restart", True)]
    assert result["accepted"] > 0 and result["billed_total"] == result["accepted"]  # nothing lost
    assert result["unknown"] == 0  # every batch got its answer, across the store restart too
    assert result["drained"]  # backlog back to zero
    assert result["verify_ok"]
    assert len(result["samples"]) == 6
    assert not result["died"]
