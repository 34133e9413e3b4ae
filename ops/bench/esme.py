"""SMPP server benchmark: ESME -> msgcore SMPP server -> pipeline -> simulator -> receipt back to the ESME.

    python -m ops.bench.esme [--messages 2000] [--windows 5,20] [--binds 4] [--esme-window 100]
                             [--paced-rate 50] [--paced-messages 200]

The ESME is smpplib's client over TCP on loopback (one connection per bind, reads in a thread, at
most `--esme-window` submit_sm unanswered per bind, every receipt answered with deliver_sm_resp).
msgcore runs as processes (ops/stack.py): the simulator, a router, a connector and `msgcore
smpp-server` (the API, scheduler and projector are not started: nothing here needs them). Uses
MSGCORE_MONGO_URL / MSGCORE_PG_URL if set, else embedded servers in a temp dir. Not a test.

Configurations, each with its own SMPP account (so its own receipts topic), after an untimed warm-up
of 20 messages per bind; the server is restarted with `--commit-window-ms` for each window (the
first, 5 ms, is the server's default):
- at every window: one bind as fast as its window allows (`--messages`), and one bind paced at
  `--paced-rate` msg/s (`--paced-messages`): flat out, submit_sm -> submit_sm_resp is mostly the
  queue behind the ESME's window; paced, it is the group-commit window plus the commit;
- at the first window also `--binds` binds as fast as their windows allow (`--messages` in all).

Printed per configuration: msg/s from the first submit_sm to the last receipt, the submit rate
(first submit_sm to last submit_sm_resp), submit_sm -> submit_sm_resp latency p50/p99, and the
group commits they took: the distinct commit times of their `accepted` events (one clock reading
per group commit, smsc/esme_server/committer.py; milliseconds, so two commits in the same
millisecond count once), i.e. messages per transaction.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import smpplib.client
import smpplib.smpp

from core.domain.events import utcnow
from core.domain.routing import Route
from core.store.mongo import connect
from core.store.smpp_accounts import SmppAccountStore
from ops.bench.store_figures import PRICE, TENANT
from ops.bench.support import line, note, pct, store_servers
from ops.embedded import free_port
from ops.stack import Stack, seed
from smsc.pdu import ESME_ROK, SequenceCounter

COMPONENTS = ("smsc-sim", "router", "connector")
WARMUP_PER_BIND = 20
SERVER = "smpp-server"


class EsmeStack(Stack):
    """The stack with `msgcore smpp-server` at a given group-commit window."""

    commit_window_ms: float = 5.0

    def args_for(self, component: str) -> list[str]:
        args = super().args_for(component)
        if component == SERVER:
            args += ["--commit-window-ms", f"{self.commit_window_ms:g}"]
        return args


@dataclass
class Bind:
    """One ESME connection: submit_sm with a window, submit_sm_resp and receipts recorded with times."""

    port: int
    system_id: str
    password: str
    window: int
    sent: dict[int, float] = field(default_factory=dict)
    answered: dict[int, float] = field(default_factory=dict)
    refused: int = 0
    ids: dict[int, str] = field(default_factory=dict)  # sequence -> msgcore's message id
    receipts: dict[str, float] = field(default_factory=dict)  # receipted_message_id -> arrival

    def __post_init__(self) -> None:
        self.client = smpplib.client.Client("127.0.0.1", self.port, timeout=60, allow_unknown_opt_params=True,
                                            logger_name="bench.esme")
        self._room = threading.Semaphore(self.window)
        self._send_lock = threading.Lock()  # submit_sm (caller's thread) and deliver_sm_resp (reader)
        self._seq = itertools.count(1)
        self._resp_client = SequenceCounter()  # responses carry the request's sequence anyway
        self._reader: threading.Thread | None = None

    def bind(self) -> None:
        self.client.connect()
        self.client.bind_transceiver(system_id=self.system_id, password=self.password)
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"esme-{self.system_id}")
        self._reader.start()

    def submit(self, numbers: list[str], rate: float = 0.0) -> None:
        """Send a submit_sm to each number, never more than `window` unanswered; at `rate` per second
        on a fixed schedule when given (a late one is sent at once, not skipped)."""
        start = time.perf_counter()
        for k, number in enumerate(numbers):
            if rate:
                time.sleep(max(0.0, start + k / rate - time.perf_counter()))
            self._room.acquire()
            pdu = smpplib.smpp.make_pdu(
                "submit_sm", client=self._resp_client, source_addr_ton=5, source_addr_npi=0, source_addr="bench",
                dest_addr_ton=1, dest_addr_npi=1, destination_addr=number, short_message=b"Your code is 123456",
                registered_delivery=1, data_coding=0)
            pdu.sequence = seq = next(self._seq)
            self.sent[seq] = time.perf_counter()
            self._send(pdu)

    def _send(self, pdu: Any) -> None:
        with self._send_lock:
            self.client._socket.sendall(pdu.generate())

    def _read(self) -> None:
        try:
            while True:
                head = self.client._recv_exact(16)
                length = struct.unpack(">L", head[:4])[0]
                body = self.client._recv_exact(length - 16) if length > 16 else b""
                self._on_pdu(smpplib.smpp.parse_pdu(head + body, client=self._resp_client,
                                                    allow_unknown_opt_params=True))
        except (OSError, smpplib.exceptions.ConnectionError):
            return  # closed by `close`, or by the server (socket.timeout: nothing for 60 s)

    def _on_pdu(self, pdu: Any) -> None:
        now = time.perf_counter()
        if pdu.command in ("submit_sm_resp", "generic_nack"):
            self.answered[pdu.sequence] = now
            if pdu.status == ESME_ROK and pdu.command == "submit_sm_resp":
                self.ids[pdu.sequence] = pdu.message_id.decode()
            else:
                self.refused += 1
            self._room.release()
        elif pdu.command == "deliver_sm":
            self.receipts[pdu.receipted_message_id.decode()] = now
            self._respond("deliver_sm_resp", pdu.sequence)
        elif pdu.command == "enquire_link":
            self._respond("enquire_link_resp", pdu.sequence)

    def _respond(self, name: str, sequence: int) -> None:
        resp = smpplib.smpp.make_pdu(name, client=self._resp_client)
        resp.sequence = sequence
        self._send(resp)

    def reset(self) -> None:
        self.sent.clear()
        self.answered.clear()
        self.ids.clear()
        self.receipts.clear()
        self.refused = 0

    def close(self) -> None:
        if self.client._socket is not None:
            self.client._socket.shutdown(socket.SHUT_RDWR)  # wakes the reader blocked in recv
            self.client._socket.close()
            self.client._socket = None
        if self._reader is not None:
            self._reader.join(timeout=5)


@dataclass
class Figures:
    label: str
    messages: int
    total_s: float
    submit_s: float
    latencies_ms: list[float]
    commits: int
    refused: int


async def group_commits(db: Any, message_ids: list[str]) -> int:
    """Group commits of these messages: the distinct times of their `accepted` events."""
    times = set()
    for k in range(0, len(message_ids), 1000):
        async for e in db["events"].find({"message_id": {"$in": message_ids[k:k + 1000]}, "seq": 1}, {"at": 1}):
            times.add(e["at"])
    return len(times)


def missing_receipts(binds: list[Bind]) -> int:
    """Messages accepted and not receipted yet: a receipt comes on any of the account's binds."""
    receipted = set().union(*(b.receipts for b in binds))
    return sum(1 for b in binds for m in b.ids.values() if m not in receipted)


async def wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.2)
            continue
        writer.close()
        return
    raise TimeoutError(f"smpp-server not listening on 127.0.0.1:{port} within {timeout_s:.0f}s")


async def run_load(binds: list[Bind], n: int, first: int, timeout_s: float, rate: float = 0.0) -> tuple[float, float]:
    """Submit `n` messages spread over `binds` (at `rate` msg/s per bind, 0: as fast as the window
    allows), wait for every answer and receipt; returns (seconds to the last receipt, seconds to the
    last submit_sm_resp), from the first submit_sm."""
    numbers = [f"4917{first + i:09d}" for i in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(asyncio.to_thread(b.submit, numbers[k::len(binds)], rate) for k, b in enumerate(binds)))
    deadline = time.monotonic() + timeout_s
    while sum(len(b.answered) for b in binds) < n or missing_receipts(binds):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{missing_receipts(binds)} of {n} receipts missing after {timeout_s:.0f}s")
        await asyncio.sleep(0.02)
    last_receipt = max(t for b in binds for t in b.receipts.values())
    last_answer = max(t for b in binds for t in b.answered.values())
    return last_receipt - t0, last_answer - t0


async def configuration(db: Any, port: int, label: str, n_binds: int, rate: float, n: int,
                        args: argparse.Namespace, first: int) -> Figures:
    """One measured configuration on its own account (its own receipts topic)."""
    system_id = f"bench{first // 1_000_000}"
    _, password = await SmppAccountStore(db).create(system_id, TENANT, utcnow(), max_binds=n_binds,
                                                    window=args.esme_window)
    binds = [Bind(port, system_id, password, args.esme_window) for _ in range(n_binds)]
    try:
        for b in binds:
            await asyncio.to_thread(b.bind)
        await run_load(binds, WARMUP_PER_BIND * n_binds, first, args.timeout)
        for b in binds:
            b.reset()
        total_s, submit_s = await run_load(binds, n, first + 10_000, args.timeout, rate)
    finally:
        for b in binds:
            b.close()
    lat = [1000 * (b.answered[s] - t) for b in binds for s, t in b.sent.items() if s in b.answered]
    commits = await group_commits(db, [m for b in binds for m in b.ids.values()])
    return Figures(label, n, total_s, submit_s, lat, commits, sum(b.refused for b in binds))


def plan(args: argparse.Namespace) -> list[tuple[float, int, float]]:
    """(commit window ms, binds, rate) of each configuration: at every window one bind flat out and
    one bind paced (latency without queueing at the ESME's window); `--binds` binds at the first."""
    out: list[tuple[float, int, float]] = []
    for k, window_ms in enumerate(args.windows):
        out.append((window_ms, 1, 0.0))
        if k == 0 and args.binds > 1:
            out.append((window_ms, args.binds, 0.0))
        if args.paced_rate:
            out.append((window_ms, 1, args.paced_rate))
    return out


async def restart_server(stack: EsmeStack, window_ms: float, port: int) -> None:
    stack.stop(SERVER)
    stack.commit_window_ms = window_ms
    stack.start(SERVER)
    await wait_port(port)


async def bench(args: argparse.Namespace, mongo_url: str, pg_url: str, work: Path) -> list[Figures]:
    stamp = int(time.time())
    port = free_port()
    logs = Path(args.log_dir) if args.log_dir else work / "stack"
    stack = EsmeStack(mongo_url, pg_url, f"bench_esme_{stamp}", f"bench_esme_{stamp}", logs,
                      receipt_delay_s=args.receipt_delay,
                      extra_env={"MSGCORE_SMPP_PORT": str(port), "MSGCORE_LOG_LEVEL": "WARNING"})
    await seed(mongo_url, stack.mongo_db, [Route(id="sim", port=stack.sim_port, price_per_part=PRICE,
                                                 window=args.route_window)], [TENANT])
    client = connect(mongo_url, "bench")
    out: list[Figures] = []
    try:
        stack.start_all(COMPONENTS)
        windows = args.windows
        await restart_server(stack, windows[0], port)
        await asyncio.sleep(2)  # let the connector bind to the simulator
        for k, (window_ms, n_binds, rate) in enumerate(plan(args)):
            if window_ms != stack.commit_window_ms:
                await restart_server(stack, window_ms, port)
            n = args.paced_messages if rate else args.messages
            label = (f"{n_binds} bind{'s' if n_binds > 1 else ''}, commit window {window_ms:g} ms, "
                     + (f"paced at {rate:g} msg/s" if rate else "as fast as the window allows"))
            note(f"{label}: {n} messages ...")
            out.append(await configuration(client[stack.mongo_db], port, label, n_binds, rate, n, args,
                                           (k + 1) * 1_000_000))
    finally:
        stack.stop_all()
        await client.drop_database(stack.mongo_db)
        await client.close()
    return out


def report(args: argparse.Namespace, figures: list[Figures]) -> None:
    print(f"\nmsgcore SMPP server benchmark: ESME -> smpp-server -> router -> connector -> simulator -> receipt;"
          f" {args.messages} messages per configuration, ESME window {args.esme_window} per bind,"
          f" simulator receipt delay {args.receipt_delay:g} s")
    for f in figures:
        print(f"{f.label}:")
        line("submit to last receipt", f"{f.messages / f.total_s:7.0f} msg/s  ({f.total_s:.2f} s)")
        line("submitted (resp received)", f"{f.messages / f.submit_s:7.0f} msg/s  ({f.submit_s:.2f} s)")
        line("submit_sm -> submit_sm_resp", f"p50 {pct(f.latencies_ms, 50):6.1f} ms  p99 {pct(f.latencies_ms, 99):6.1f}"
             f" ms  (n={len(f.latencies_ms)})")
        per_commit = f.messages / f.commits if f.commits else float("nan")
        line("group commits", f"{f.commits:7d}  ({per_commit:.1f} messages per transaction)")
        if f.refused:
            line("refused submits", f"{f.refused:7d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000, help="messages per configuration")
    p.add_argument("--windows", type=lambda s: [float(x) for x in s.split(",")], default=[5.0, 20.0],
                   help="group-commit windows in ms (the first is used for the bind comparison)")
    p.add_argument("--binds", type=int, default=4)
    p.add_argument("--esme-window", type=int, default=100, help="unanswered submit_sm per bind")
    p.add_argument("--paced-rate", type=float, default=50.0, help="msg/s of the paced runs (0: none)")
    p.add_argument("--paced-messages", type=int, default=200, help="messages per paced run")
    p.add_argument("--route-window", type=int, default=50)
    p.add_argument("--receipt-delay", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a configuration's receipts")
    p.add_argument("--log-dir", default="", help="keep the components' logs here (default: a temp dir)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.getLogger("bench.esme").setLevel(logging.ERROR)  # smpplib warns of the socket `close` shuts
    with tempfile.TemporaryDirectory(prefix="msgcore-bench-esme-") as tmp, store_servers(Path(tmp)) as servers:
        report(args, asyncio.run(bench(args, servers.mongo_url, servers.pg_url, Path(tmp))))


if __name__ == "__main__":
    main()
