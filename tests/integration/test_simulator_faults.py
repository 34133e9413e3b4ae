"""The simulator's switchable faults, each observed by a real SmppSession over loopback (no mocks)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from smsc.pdu import (
    ESME_RBINDFAIL,
    ESME_RINVDSTADR,
    ESME_RINVSRCADR,
    ESME_RMSGQFUL,
    ESME_ROK,
    ESME_RSYSERR,
    ESME_RTHROTTLED,
    MESSAGE_STATES,
)
from smsc.session import BindFailed, DeliverSm, SessionClosed, SmppSession, SubmitResult
from smsc.sim.faults import MALFORMED_KINDS, FaultSettings
from smsc.sim.server import Simulator

TEMPORARY = {ESME_RMSGQFUL, ESME_RSYSERR}
PERMANENT = {ESME_RINVDSTADR, ESME_RINVSRCADR}


async def _eventually(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


class _Client:
    """One SmppSession plus what it received, in order; acknowledges every deliver_sm."""

    def __init__(self, sim: Simulator, system_id: str = "msgcore", **kwargs: Any) -> None:
        self.delivered: list[DeliverSm] = []
        self.events: list[tuple[str, str | None]] = []
        self.session = SmppSession("127.0.0.1", sim.port, system_id=system_id, password="pw",
                                   on_deliver=self._on_deliver, **kwargs)

    def _on_deliver(self, deliver: DeliverSm) -> None:
        self.delivered.append(deliver)
        self.events.append(("deliver", deliver.receipted_message_id))
        self.session.respond_deliver(deliver.sequence, ESME_ROK)

    async def submit(self, i: int, registered_delivery: int = 1) -> SubmitResult:
        result = await self.session.submit(source="MSGCORE", destination=f"4917{i:07d}", short_message=b"hi",
                                           data_coding=0, registered_delivery=registered_delivery)
        self.events.append(("resp", result.message_id))
        return result

    async def submit_many(self, n: int, registered_delivery: int = 1) -> list[SubmitResult]:
        return list(await asyncio.gather(*(self.submit(i, registered_delivery) for i in range(n))))

    async def __aenter__(self) -> _Client:
        await self.session.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator(port=0, receipt_delay_s=0.05, faults={"seed": 42}, control_port=0)
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


async def test_defaults_mean_no_faults_and_old_constructor_still_works() -> None:
    assert FaultSettings().active() == []
    simulator = Simulator(port=0, receipt_delay_s=0.05, receipt_stat="UNDELIV")
    assert simulator.faults.receipt_stat == "UNDELIV" and simulator.faults.receipt_delay_s == 0.05
    assert simulator.faults.active() == []
    # Fields set explicitly in `faults` win over the constructor's receipt arguments, the rest stay.
    other = Simulator(port=0, receipt_delay_s=0.05, receipt_stat="UNDELIV",
                      faults=FaultSettings(receipt_stat="EXPIRED"))
    assert other.faults.receipt_stat == "EXPIRED" and other.faults.receipt_delay_s == 0.05
    with pytest.raises(ValidationError):
        Simulator(port=0, faults={"error_ratio": 1.5})
    with pytest.raises(ValidationError):
        FaultSettings(receipt_stat_mix={"NOPE": 1.0})


async def test_error_ratio_gives_the_expected_mix_of_statuses(sim: Simulator) -> None:
    sim.set_faults(error_ratio=0.3, permanent_share=0.5, seed=7)
    async with _Client(sim, window=50) as client:
        results = await client.submit_many(2000, registered_delivery=0)
    statuses = Counter(r.status for r in results)
    ok = statuses.pop(ESME_ROK, 0)
    temporary = sum(n for code, n in statuses.items() if code in TEMPORARY)
    permanent = sum(n for code, n in statuses.items() if code in PERMANENT)
    assert set(statuses) <= TEMPORARY | PERMANENT, statuses
    # Expected 1400 / 300 / 300; a binomial standard deviation is about 20 and 15.
    assert abs(ok - 1400) < 100 and abs(temporary - 300) < 75 and abs(permanent - 300) < 75, (ok, statuses)
    assert all(r.message_id for r in results if r.status == ESME_ROK)
    assert all(r.message_id is None for r in results if r.status != ESME_ROK)
    stats = sim.stats()
    assert (stats["submit_sm_ok"], stats["submit_sm_failed_temporary"], stats["submit_sm_failed_permanent"]) == (
        ok, temporary, permanent)


async def test_error_sequence_is_reproducible_with_a_seed() -> None:
    async def run() -> list[int]:
        simulator = Simulator(port=0, faults={"error_ratio": 0.5, "permanent_share": 0.5, "seed": 123})
        await simulator.start()
        try:
            async with _Client(simulator, window=1) as client:
                return [(await client.submit(i, 0)).status for i in range(200)]
        finally:
            await simulator.stop()

    first, second = await run(), await run()
    assert first == second
    assert len(set(first)) > 2


async def test_throttle_answers_0x58_above_the_rate_counted_at_the_simulator(sim: Simulator) -> None:
    limit = 50
    sim.set_faults(throttle_tps=limit)
    statuses: Counter[int] = Counter()
    async with _Client(sim, window=10) as client:
        deadline = time.monotonic() + 2.5

        async def sender(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                statuses[(await client.submit(i, 0)).status] += 1
                i += 10

        await asyncio.gather(*(sender(k) for k in range(10)))
    assert set(statuses) == {ESME_ROK, ESME_RTHROTTLED}, statuses
    assert statuses[ESME_RTHROTTLED] > statuses[ESME_ROK]
    # Accepted submits never exceed the limit in any wall-clock second, as counted by the simulator.
    per_second = sim.stats()["submit_per_second"]["msgcore"]
    assert sum(row["ok"] for row in per_second) == statuses[ESME_ROK]
    assert sum(row["throttled"] for row in per_second) == statuses[ESME_RTHROTTLED]
    assert all(row["ok"] <= limit for row in per_second), per_second
    assert statuses[ESME_ROK] >= 2 * limit  # the window slides: the rate recovers every second
    assert len(per_second) >= 2


async def test_drop_after_pdus_closes_the_connection_and_new_binds_are_accepted(sim: Simulator) -> None:
    sim.set_faults(drop_after_pdus=5)  # the bind is PDU 1; submits are PDUs 2..5
    for _ in range(2):
        async with _Client(sim, window=1) as client:
            for i in range(3):
                assert (await client.submit(i, 0)).status == ESME_ROK
            with pytest.raises(SessionClosed):
                await client.submit(3, 0)  # PDU 5: accepted, but its response is lost with the connection
            await _eventually(lambda: not client.session.is_up)
    stats = sim.stats()
    assert stats["connections_dropped"] == 2
    assert stats["submit_sm_ok"] == 8
    sim.set_faults(drop_after_pdus=None)
    async with _Client(sim, window=1) as client:
        results = [await client.submit(i, 0) for i in range(10)]
        assert all(r.status == ESME_ROK for r in results) and client.session.is_up


async def test_refused_binds_for_a_while(sim: Simulator) -> None:
    sim.set_faults(refuse_binds_s=0.5)
    client = _Client(sim)
    with pytest.raises(BindFailed) as info:
        await client.session.open()
    assert info.value.status == ESME_RBINDFAIL
    assert sim.stats()["binds_refused"] == 1
    await asyncio.sleep(0.6)
    async with _Client(sim) as client:
        assert client.session.is_up


async def test_receipts_never_sent(sim: Simulator) -> None:
    sim.set_faults(receipt_mode="never")
    async with _Client(sim) as client:
        results = await client.submit_many(20)
        assert all(r.status == ESME_ROK for r in results)
        await asyncio.sleep(0.5)
        assert client.delivered == []
        assert sim.stats()["receipts_withheld"] == 20
        sim.set_faults(receipt_mode="normal")
        later = await client.submit_many(5)
        await _eventually(lambda: len(client.delivered) == 5)
        assert {d.receipted_message_id for d in client.delivered} == {r.message_id for r in later}


async def test_receipts_out_of_order(sim: Simulator) -> None:
    sim.set_faults(receipt_mode="out_of_order", reorder_window=8)
    async with _Client(sim, window=1) as client:
        ids = [(await client.submit(i)).message_id for i in range(40)]
        await _eventually(lambda: len(client.delivered) == 40)
    received = [d.receipted_message_id for d in client.delivered]
    assert set(received) == set(ids) and len(received) == 40
    assert received != ids
    assert sim.stats()["receipts_reordered"] >= 2


async def test_receipt_delay_and_jitter(sim: Simulator) -> None:
    sim.set_faults(receipt_delay_s=0.3, receipt_jitter_s=0.2)
    async with _Client(sim) as client:
        await client.submit_many(20)
        await asyncio.sleep(0.2)
        assert client.delivered == []  # none before the 0.3 s delay (a slow machine only makes them later)
        await _eventually(lambda: len(client.delivered) == 20)


async def test_receipt_before_response_arrives_first_at_the_client(sim: Simulator) -> None:
    sim.set_faults(receipt_mode="before_response")
    async with _Client(sim, window=1) as client:
        ids = [(await client.submit(i)).message_id for i in range(20)]
        await asyncio.sleep(0.2)
    assert all(ids) and sim.stats()["receipts_before_response"] == 20
    order = {(kind, mid): n for n, (kind, mid) in enumerate(client.events)}
    for mid in ids:
        assert order[("deliver", mid)] < order[("resp", mid)], mid
    assert len(client.delivered) == 20  # and none is sent a second time later


async def test_receipt_stat_mix(sim: Simulator) -> None:
    sim.set_faults(receipt_stat_mix={"DELIVRD": 0.9, "UNDELIV": 0.05, "EXPIRED": 0.05}, seed=3)
    async with _Client(sim, window=50) as client:
        await client.submit_many(1000)
        await _eventually(lambda: len(client.delivered) == 1000)
    stats = Counter(d.receipt.stat for d in client.delivered if d.receipt is not None)
    assert sum(stats.values()) == 1000 and set(stats) == {"DELIVRD", "UNDELIV", "EXPIRED"}
    assert abs(stats["DELIVRD"] - 900) < 60 and 15 < stats["UNDELIV"] < 90 and 15 < stats["EXPIRED"] < 90, stats
    assert all(d.message_state == MESSAGE_STATES[d.receipt.stat] for d in client.delivered if d.receipt is not None)


@pytest.mark.parametrize("kind", MALFORMED_KINDS)
async def test_malformed_pdus_do_not_break_the_simulator_and_the_session_copes(sim: Simulator, kind: str) -> None:
    """Every malformed PDU keeps the byte stream in step. The session skips a well-framed one and stays
    up; for a command_length it cannot trust it may instead drop the bind (a clear error), and then
    the receipts still unacknowledged come again on the next bind."""
    sim.set_faults(malformed_ratio=1.0, malformed_kinds=[kind], receipt_delay_s=0.2)
    async with _Client(sim, window=10) as client:
        results = await client.submit_many(10)
        await _eventually(lambda: len(client.delivered) == 10 or not client.session.is_up)
        survived = client.session.is_up
        if survived:
            # The stream stayed in step: the session still submits and gets answers.
            assert (await client.submit(99, 0)).status == ESME_ROK
    assert sim.stats()["malformed_sent"] >= 1
    if kind != "short_length":
        assert survived and sim.stats()["malformed_sent"] == 10
    received = {d.receipted_message_id for d in client.delivered}
    sim.set_faults(malformed_ratio=0.0)
    async with _Client(sim) as again:
        assert (await again.submit(1, 0)).status == ESME_ROK
        if not survived:
            await _eventually(lambda: received | {d.receipted_message_id for d in again.delivered}
                              >= {r.message_id for r in results})
    assert received | {d.receipted_message_id for d in again.delivered} == {r.message_id for r in results}


async def test_control_api_get_put_reset(sim: Simulator) -> None:
    base = f"http://127.0.0.1:{sim.control_port}"
    async with httpx.AsyncClient(base_url=base, timeout=5) as http:
        got = (await http.get("/faults")).json()
        assert got["smsc_port"] == sim.port
        assert got["faults"]["error_ratio"] == 0 and got["faults"]["receipt_delay_s"] == 0.05

        put = await http.put("/faults", json={"error_ratio": 1.0, "temporary_codes": ["0x14"]})
        assert put.status_code == 200, put.text
        assert put.json()["faults"]["error_ratio"] == 1.0 and put.json()["faults"]["temporary_codes"] == [0x14]
        assert (await http.get("/faults")).json()["faults"]["receipt_delay_s"] == 0.05  # merged, not replaced
        async with _Client(sim) as client:
            assert (await client.submit(1)).status == ESME_RMSGQFUL
        stats = (await http.get("/stats")).json()
        assert stats["submit_sm_failed_temporary"] == 1
        assert stats["submit_per_second"]["msgcore"][-1]["failed"] == 1

        for bad in ({"error_ratio": 2}, {"no_such_fault": 1}, {"receipt_mode": "sometimes"},
                    {"receipt_stat_mix": {"DELIVRD": -1}}, {"temporary_codes": [0]}, [1, 2]):
            response = await http.put("/faults", json=bad)
            assert response.status_code == 422, (bad, response.text)
            assert response.json()["error"]["code"] == "validation_error"
        assert (await http.put("/faults", content=b"{nope")).status_code == 400
        assert (await http.delete("/faults")).status_code == 405
        assert (await http.get("/nothing")).status_code == 404
        assert sim.faults.error_ratio == 1.0  # bad input changed nothing

        replaced = await http.put("/faults", params={"replace": "true"}, json={"throttle_tps": 10})
        assert replaced.json()["faults"]["error_ratio"] == 0 and replaced.json()["faults"]["throttle_tps"] == 10
        assert replaced.json()["faults"]["receipt_delay_s"] == 0.2  # replaced: model defaults

        reset = await http.post("/reset")
        assert reset.status_code == 200
        assert reset.json()["faults"] == FaultSettings(receipt_delay_s=0.05, seed=42).model_dump()
        assert reset.json()["stats"]["submit_per_second"] == {}
    async with _Client(sim) as client:
        assert (await client.submit(2)).status == ESME_ROK


async def test_two_simulators_at_once_with_their_own_faults() -> None:
    failing = Simulator(port=0, faults={"error_ratio": 1.0, "permanent_share": 1.0}, control_port=0)
    healthy = Simulator(port=0, receipt_delay_s=0.05, control_port=0)
    await failing.start()
    await healthy.start()
    try:
        assert failing.port != healthy.port and failing.control_port != healthy.control_port
        async with _Client(failing) as a, _Client(healthy) as b:
            ra, rb = await asyncio.gather(a.submit_many(20), b.submit_many(20))
            assert all(r.status in PERMANENT for r in ra)
            assert all(r.status == ESME_ROK for r in rb)
            await _eventually(lambda: len(b.delivered) == 20)
            assert a.delivered == []
        async with httpx.AsyncClient(timeout=5) as http:
            fa = (await http.get(f"http://127.0.0.1:{failing.control_port}/faults")).json()
            fb = (await http.get(f"http://127.0.0.1:{healthy.control_port}/faults")).json()
        assert fa["faults"]["error_ratio"] == 1.0 and fa["stats"]["submit_sm_failed_permanent"] == 20
        assert fb["faults"]["error_ratio"] == 0.0 and fb["stats"]["submit_sm_ok"] == 20
    finally:
        await failing.stop()
        await healthy.stop()


async def test_throttle_per_bind_counts_each_connection_alone(sim: Simulator) -> None:
    sim.set_faults(throttle_tps=20, throttle_scope="bind")
    async with _Client(sim, window=5) as a, _Client(sim, window=5) as b:
        started = time.monotonic()
        ra, rb = await asyncio.gather(a.submit_many(60, 0), b.submit_many(60, 0))
        elapsed = time.monotonic() - started
    ok_a, ok_b = sum(r.status == ESME_ROK for r in ra), sum(r.status == ESME_ROK for r in rb)
    # Each bind gets its own 20 (system-wide it would be 20 in all); exactly 20 if it all took under a second.
    assert ok_a >= 20 and ok_b >= 20
    if elapsed < 0.9:
        assert ok_a == 20 and ok_b == 20
    assert {r.status for r in ra + rb} == {ESME_ROK, ESME_RTHROTTLED}


async def test_failure_only_receipts_follow_the_stat_mix(sim: Simulator) -> None:
    sim.set_faults(receipt_stat_mix={"DELIVRD": 0.5, "UNDELIV": 0.5}, seed=11)
    async with _Client(sim, window=20) as client:
        await client.submit_many(200, registered_delivery=2)  # receipt on failure only
        await asyncio.sleep(0.3)
        await _eventually(lambda: sim.stats()["receipts_outstanding"] == 0 and sim.stats()["receipts_pending"] == 0)
    stats = Counter(d.receipt.stat for d in client.delivered if d.receipt is not None)
    assert set(stats) == {"UNDELIV"} and 60 < stats["UNDELIV"] < 140, stats


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_two_smsc_sim_processes_configured_by_flags(tmp_path: Path) -> None:
    """`msgcore smsc-sim` with fault flags, twice at once on different ports, each with its control API."""
    ports = [(_free_port(), _free_port()) for _ in range(2)]
    flags = [["--error-ratio", "1", "--permanent-share", "1", "--seed", "5"],
             ["--throttle-tps", "7", "--receipt-mode", "before_response",
              "--receipt-stat", "DELIVRD=0.9,UNDELIV=0.05,EXPIRED=0.05", "--malformed-ratio", "0.1"]]
    procs, logs = [], []
    for (port, control), extra in zip(ports, flags, strict=True):
        logs.append((tmp_path / f"sim-{port}.log").open("wb"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "smsc-sim", "--port", str(port), "--control-port", str(control),
             "--receipt-delay", "0.05", *extra], stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            states = []
            for _, control in ports:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        states.append((await http.get(f"http://127.0.0.1:{control}/faults")).json())
                        break
                    except httpx.TransportError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.1)
        first, second = states
        assert first["smsc_port"] == ports[0][0] and second["smsc_port"] == ports[1][0]
        assert first["faults"]["error_ratio"] == 1 and first["faults"]["permanent_share"] == 1
        assert first["faults"]["seed"] == 5 and first["faults"]["receipt_delay_s"] == 0.05
        assert second["faults"]["throttle_tps"] == 7 and second["faults"]["receipt_mode"] == "before_response"
        assert second["faults"]["receipt_stat_mix"] == {"DELIVRD": 0.9, "UNDELIV": 0.05, "EXPIRED": 0.05}
        assert second["faults"]["malformed_ratio"] == 0.1 and second["faults"]["error_ratio"] == 0
        for (port, _), expect in zip(ports, (PERMANENT, {ESME_ROK, ESME_RTHROTTLED}), strict=True):
            session = SmppSession("127.0.0.1", port, system_id="cli", password="x", on_deliver=lambda d: None)
            await session.open()
            try:
                statuses = {(await session.submit(source="a", destination=f"49{i}", short_message=b"x",
                                                  data_coding=0, registered_delivery=0)).status for i in range(20)}
            finally:
                await session.close()
            assert statuses <= expect and statuses
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=15) for proc in procs]
        for f in logs:
            f.close()
    assert codes == [0, 0], [(tmp_path / f"sim-{port}.log").read_text() for port, _ in ports]
