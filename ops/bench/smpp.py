"""Throughput of SmppSession against the simulator: per window over one bind, and over several binds. Not a test.

The simulator runs in a child process (as `msgcore smsc-sim` would), so the two sides do not share a
GIL; on a machine with fewer than three cores the client and the simulator still compete for CPU,
which the numbers include. Receipts flow (registered_delivery 1, receipt delay 50 ms) and are
acknowledged, as msgcore's connector does. Each point sends at most `--count` messages and stops
early after `--max-seconds`, after a short untimed warm-up; msg/s counts submit_sm answered ESME_ROK.

- one bind, window 1, 10, 50, 100;
- 1, 2 and 4 binds (each its own SmppSession and TCP connection, same system_id), window `--bind-window`.

    python -m ops.bench.smpp [--count 20000] [--windows 1,10,50,100] [--binds 1,2,4] [--bind-window 50]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from smsc.session import DeliverSm, SmppSession
from smsc.sim.server import Simulator

WARMUP = 300


def _simulator_process(conn: Connection) -> None:
    async def serve() -> None:
        sim = Simulator(port=0, receipt_delay_s=0.05)
        await sim.start()
        conn.send(sim.port)
        # Block in a thread until the parent says stop.
        await asyncio.to_thread(conn.recv)
        await sim.stop()

    asyncio.run(serve())


@dataclass
class Point:
    label: str
    sent: int
    seconds: float
    receipts: int

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class _Bind:
    def __init__(self, port: int, system_id: str, window: int) -> None:
        self.receipts = 0
        self.session = SmppSession("127.0.0.1", port, system_id=system_id, password="x", window=window,
                                   on_deliver=self._on_deliver)

    def _on_deliver(self, d: DeliverSm) -> None:
        self.receipts += 1
        self.session.respond_deliver(d.sequence)

    async def send(self, count: int, deadline: float | None) -> int:
        """Send up to `count` submit_sm with enough concurrent senders to keep the window full."""
        window = self.session.window
        done = 0

        async def worker(k: int) -> None:
            nonlocal done
            for i in range(k, count, window):
                if deadline is not None and time.monotonic() > deadline:
                    return
                result = await self.session.submit(source="bench", destination=f"4917{i:07d}",
                                                   short_message=b"benchmark message", data_coding=0)
                if result.status != 0:
                    raise RuntimeError(f"status 0x{result.status:02x}")
                done += 1

        await asyncio.gather(*(worker(k) for k in range(window)))
        return done


async def _measure(port: int, label: str, binds: int, window: int, count: int, max_s: float) -> Point:
    sessions = [_Bind(port, "bench", window) for _ in range(binds)]
    await asyncio.gather(*(b.session.open() for b in sessions))
    try:
        await asyncio.gather(*(b.send(WARMUP, None) for b in sessions))
        receipts0 = sum(b.receipts for b in sessions)
        started = time.perf_counter()
        deadline = time.monotonic() + max_s
        per_bind = count // binds
        sent = await asyncio.gather(*(b.send(per_bind, deadline) for b in sessions))
        elapsed = time.perf_counter() - started
        return Point(label, sum(sent), elapsed, sum(b.receipts for b in sessions) - receipts0)
    finally:
        await asyncio.gather(*(b.session.close() for b in sessions))


def _print(point: Point) -> None:
    print(f"{point.label:<22} {point.rate:8.0f} msg/s   ({point.sent} submit_sm in {point.seconds:5.2f} s, "
          f"{point.receipts} receipts during the run)", flush=True)


async def _main(count: int, windows: list[int], binds: list[int], bind_window: int, max_s: float) -> None:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_simulator_process, args=(child,), daemon=True)
    proc.start()
    port = parent.recv()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"simulator in pid {proc.pid} on 127.0.0.1:{port}; {os.cpu_count()} CPUs, load {load}; "
          f"at most {count} messages or {max_s:.0f} s per point", flush=True)
    try:
        print("-- one bind, by window", flush=True)
        for window in windows:
            _print(await _measure(port, f"1 bind, window {window}", 1, window, count, max_s))
        print(f"-- by binds (window {bind_window} each)", flush=True)
        for n in binds:
            _print(await _measure(port, f"{n} bind{'s' if n > 1 else ''}, window {bind_window}", n, bind_window,
                                  count, max_s))
    finally:
        parent.send("stop")
        proc.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20000, help="messages per point at most")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="time per point at most")
    parser.add_argument("--windows", default="1,10,50,100")
    parser.add_argument("--binds", default="1,2,4")
    parser.add_argument("--bind-window", type=int, default=50)
    args = parser.parse_args()
    asyncio.run(_main(args.count, [int(w) for w in args.windows.split(",")],
                      [int(b) for b in args.binds.split(",")], args.bind_window, args.max_seconds))


if __name__ == "__main__":
    main()
