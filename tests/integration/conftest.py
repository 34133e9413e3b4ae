from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smsc.sim.server import Simulator


@pytest.fixture
async def simulator(tmp_path: Path) -> AsyncIterator[Simulator]:
    """An SMSC simulator on an ephemeral loopback port, journaling to tmp_path/journal.jsonl."""
    sim = Simulator(port=0, receipt_delay_s=0.05, journal_path=tmp_path / "journal.jsonl")
    await sim.start()
    yield sim
    await sim.stop()
