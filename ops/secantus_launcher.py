"""Runs SecantusDB's own command line with a shorter idle-transaction lifetime.

A worker killed in the middle of a transaction leaves it open on the server, holding the heads it
wrote; every other writer of those heads conflicts until the server reaps it. MongoDB and SecantusDB
both reap after 60 s idle (`transactionLifetimeLimitSeconds`), which stalls a stage for a minute
after a crash. Our transactions idle for milliseconds, so the embedded server gets 10 s. (On a
production replica set: `setParameter transactionLifetimeLimitSeconds`.) SecantusDB's CLI has no
flag for it; its server class takes the value, so this sets that default and hands over to the CLI.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

TRANSACTION_LIFETIME_S = 10.0


def main() -> int:
    import secantus.server
    from secantus.cli import main as secantus_main

    original = secantus.server.SecantusDBServer.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("transaction_lifetime_seconds", TRANSACTION_LIFETIME_S)
        original(self, *args, **kwargs)

    secantus.server.SecantusDBServer.__init__ = init  # type: ignore[method-assign]
    return int(secantus_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
