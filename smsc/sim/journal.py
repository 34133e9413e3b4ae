"""The simulator's journal: one JSON line per accepted submit_sm, buffered and flushed every 0.2 s.

Benchmarks and tests read it to learn when a message reached the SMSC and what it carried.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import IO, Any

JOURNAL_FLUSH_S = 0.2


class Journal:
    """Appends to `path` (created with its directory on `open`); without a path it records nothing."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._buf: list[str] = []
        self._file: IO[str] | None = None

    def open(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        """Flush what is buffered and close the file."""
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def active(self) -> bool:
        """Whether lines are being recorded (a path was given and the journal is open)."""
        return self._file is not None

    def write(self, entry: dict[str, Any]) -> None:
        if self._file is not None:
            self._buf.append(json.dumps(entry, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        if self._file is None or not self._buf:
            return
        lines, self._buf = self._buf, []
        # A few hundred KB at most per flush: a blocking write is cheaper than a thread hop.
        self._file.write("".join(lines))
        self._file.flush()

    async def flusher(self) -> None:
        """Flush every JOURNAL_FLUSH_S until cancelled."""
        while True:
            await asyncio.sleep(JOURNAL_FLUSH_S)
            self.flush()
