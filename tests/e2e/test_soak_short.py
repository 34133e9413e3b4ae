"""A short soak (ops/soak.py) on the session's servers: about two minutes at a low rate.

The soak tool judges drift itself (RSS and open-file growth, p99 trend, backlog growth: thresholds are
about leaks, not speed); this test asserts its verdict and the facts behind it: nothing lost, the
backlog back to zero, `msgcore verify` clean.
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


def test_short_soak_loses_nothing_drains_and_shows_no_drift(server_urls: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    env = {**os.environ, "MSGCORE_MONGO_URL": server_urls["mongo"], "MSGCORE_PG_URL": server_urls["pg"]}
    proc = subprocess.run([sys.executable, "-m", "ops.soak", "--rate", "5", "--minutes", "2", "--interval", "20",
                           "--warmup", "2", "--drain-timeout", "60", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert result["fails"] == []
    assert result["accepted"] > 0 and result["billed_total"] == result["accepted"]  # nothing lost
    assert result["drained"]  # backlog back to zero
    assert result["verify_ok"]
    assert len(result["samples"]) == 6
    assert not result["died"]
