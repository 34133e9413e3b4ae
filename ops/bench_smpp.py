"""Throughput of one SmppSession against the simulator, per window size. Not a test.

The simulator runs in a child process (as `msgcore smsc-sim` would), so the two sides do not share
a GIL. Prints submit_sm/s (responses received) for each window, with receipts flowing.

    python -m ops.bench_smpp [--count 20000] [--windows 1,10,50,100]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from multiprocessing.connection import Connection

from smsc.session import DeliverSm, SmppSession
from smsc.simulator import Simulator


def _simulator_process(conn: Connection) -> None:
    async def serve() -> None:
        sim = Simulator(port=0, receipt_delay_s=0.05)
        await sim.start()
        conn.send(sim.port)
        # Block in a thread until the parent says stop.
        await asyncio.to_thread(conn.recv)
        await sim.stop()

    asyncio.run(serve())


async def _measure(port: int, window: int, count: int) -> tuple[float, int]:
    received = 0

    def on_deliver(d: DeliverSm) -> None:
        nonlocal received
        received += 1
        session.respond_deliver(d.sequence)

    session = SmppSession("127.0.0.1", port, system_id=f"bench{window}", password="x", window=window,
                          on_deliver=on_deliver)
    await session.open()
    try:
        # Enough concurrent senders to keep the window full; the semaphore does the pacing.
        per_worker = count // window

        async def worker(n: int) -> None:
            for i in range(n):
                result = await session.submit(source="bench", destination=f"4917{i:07d}",
                                              short_message=b"benchmark message", data_coding=0)
                if result.status != 0:
                    raise RuntimeError(f"status 0x{result.status:02x}")

        started = time.perf_counter()
        await asyncio.gather(*(worker(per_worker) for _ in range(window)))
        elapsed = time.perf_counter() - started
        return (per_worker * window) / elapsed, received
    finally:
        await session.close()


async def _main(count: int, windows: list[int]) -> None:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=_simulator_process, args=(child,), daemon=True)
    proc.start()
    port = parent.recv()
    try:
        for window in windows:
            rate, receipts = await _measure(port, window, count)
            print(f"window {window:>4}: {rate:8.0f} submit_sm/s  ({receipts} receipts during the run)")
    finally:
        parent.send("stop")
        proc.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--windows", default="1,10,50,100")
    args = parser.parse_args()
    asyncio.run(_main(args.count, [int(w) for w in args.windows.split(",")]))


if __name__ == "__main__":
    main()
