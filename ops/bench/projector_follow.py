"""Step 2 of the projector benchmark: a Projector replays the loaded log, then follows the change
stream while more events are inserted at a steady rate."""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection

from ops.bench.projector_load import EVENTS_PER_MESSAGE, Lifecycles
from ops.bench.projector_support import Figures, RssSampler, checkpoint_applied
from ops.bench.support import pct
from projections.projector import Projector


async def _wait_applied(projector: Projector, task: asyncio.Task[None], target: int, timeout_s: float,
                        poll_s: float = 0.005) -> float:
    deadline = time.perf_counter() + timeout_s
    while projector.stats.applied < target:
        if task.done():
            task.result()
            raise RuntimeError("the projector stopped")
        if time.perf_counter() > deadline:
            raise RuntimeError(f"projector applied {projector.stats.applied} of {target} within {timeout_s:.0f}s")
        await asyncio.sleep(poll_s)
    return time.perf_counter()


@dataclass
class FollowRun:
    """What the follow phase recorded; times are time.perf_counter() values."""

    m: int  # events inserted while following
    rate: float  # the insert schedule, events/s
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, applied since following began)
    inserted_at: list[tuple[float, int]] = field(default_factory=list)  # (insert returned, events inserted so far)
    t_first: float = 0.0
    t_last_insert: float = 0.0
    t_done: float = 0.0
    ck_base: int | None = None
    ck_end: int | None = None


async def projector_steps(args: argparse.Namespace, events: AsyncCollection[dict[str, Any]], pg_url: str, schema: str,
                          gen: Lifecycles, n_loaded: int, load_rate: float, sampler: RssSampler,
                          fig: Figures) -> int:
    """Step 2: replay the loaded log, then follow while inserting; figures go to `fig`. Returns the
    number of events inserted while following."""
    rate, batches = _follow_batches(args, gen, load_rate)
    run = FollowRun(m=sum(len(b) for b in batches), rate=rate)
    print(f"\n2. Projector on a fresh schema, batch {args.batch}: replay of {n_loaded} events, "
          f"then following while {run.m} events are inserted at {rate:.0f} events/s")
    sampler.set_phase("replay")
    projector = Projector(events, pg_url, schema, batch_size=args.batch)
    stop = asyncio.Event()
    t0 = time.perf_counter()
    task = asyncio.create_task(projector.run(stop), name="bench-projector")
    try:
        t_replayed = await _wait_applied(projector, task, n_loaded, timeout_s=args.timeout, poll_s=0.05)
        replay_s = t_replayed - t0
        fig.add("replay (fresh schema, sorted scan)", f"{n_loaded / replay_s:9.0f} events/s   ({replay_s:.1f} s)")
        sampler.set_phase("follow")
        await asyncio.sleep(1.0)  # the follow loop is waiting on the change stream
        await _follow(projector, task, events, batches, run, (pg_url, schema), args.timeout)
    finally:
        stop.set()
        await task
    del batches
    gc.collect()
    _follow_figures(run, projector, fig)
    return run.m


def _follow_batches(args: argparse.Namespace, gen: Lifecycles,
                    load_rate: float) -> tuple[float, list[list[dict[str, Any]]]]:
    """The insert rate and the follow phase's insert batches, generated before any clock starts
    (`at` spread over the insertion window, starting now)."""
    follow_messages = max(1, args.follow_events // EVENTS_PER_MESSAGE)
    rate = args.rate if args.rate > 0 else max(500.0, 0.5 * load_rate)
    follow_s = follow_messages * EVENTS_PER_MESSAGE / rate
    per_chunk = max(1, args.follow_batch // EVENTS_PER_MESSAGE)
    batches = list(gen.chunks(10**9, follow_messages, datetime.now(UTC) + timedelta(seconds=30),
                              follow_s / follow_messages, per_chunk))
    return rate, batches


async def _follow(projector: Projector, task: asyncio.Task[None], events: AsyncCollection[dict[str, Any]],
                  batches: list[list[dict[str, Any]]], run: FollowRun, reporting: tuple[str, str],
                  timeout_s: float) -> None:
    """Insert `batches` on `run.rate`'s schedule while sampling the projector's applied counter (for
    per-batch lag and windowed rates), until it has applied them all. `reporting`: (pg_url, schema)."""
    base = projector.stats.applied
    run.ck_base = await checkpoint_applied(*reporting)
    done = asyncio.Event()

    async def sample_applied() -> None:
        while not done.is_set():
            run.samples.append((time.perf_counter(), projector.stats.applied - base))
            await asyncio.sleep(0.005)

    sampler_task = asyncio.create_task(sample_applied())
    try:
        total = 0
        run.t_first = time.perf_counter()
        for k, docs in enumerate(batches):
            delay = run.t_first + k * len(batches[0]) / run.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await events.insert_many(docs, ordered=False)
            total += len(docs)
            run.inserted_at.append((time.perf_counter(), total))
        run.t_last_insert = run.inserted_at[-1][0]
        run.t_done = await _wait_applied(projector, task, base + run.m, timeout_s=timeout_s)
    finally:
        done.set()
        await sampler_task
    run.samples.append((run.t_done, projector.stats.applied - base))
    run.ck_end = await checkpoint_applied(*reporting)


def _batch_lags(run: FollowRun) -> list[float]:
    """Lag of each insert batch: from its insert returning to the projector having applied it."""
    lags: list[float] = []
    j = 0
    for t_ins, cum in run.inserted_at:
        while j < len(run.samples) and run.samples[j][1] < cum:
            j += 1
        if j < len(run.samples):
            lags.append(max(0.0, run.samples[j][0] - t_ins))
    return lags


def _window_rates(run: FollowRun) -> list[int]:
    """Events applied per 1 s window while inserting, the first and last second dropped."""
    rates = []
    w0 = run.t_first + 1.0
    while w0 + 1.0 <= run.t_last_insert:
        a0 = max((a for t, a in run.samples if t <= w0), default=0)
        a1 = max((a for t, a in run.samples if t <= w0 + 1.0), default=0)
        rates.append(a1 - a0)
        w0 += 1.0
    return rates


def _follow_figures(run: FollowRun, projector: Projector, fig: Figures) -> None:
    m, samples, inserted_at = run.m, run.samples, run.inserted_at
    t_first, t_last_insert, t_done = run.t_first, run.t_last_insert, run.t_done
    insert_s = t_last_insert - t_first
    lags = _batch_lags(run)
    applied_in_window = max((a for t, a in samples if t <= t_last_insert), default=0)
    backlog = max((cum - next((a for t, a in samples if t >= t_ins), m)) for t_ins, cum in inserted_at)
    rates = _window_rates(run)
    fig.add("follow: insert rate achieved", f"{m / max(insert_s, 1e-9):9.0f} events/s   ({insert_s:.1f} s, "
            f"batches of {batches_size(inserted_at)})")
    fig.add("follow: applied while inserting", f"{applied_in_window / max(insert_s, 1e-9):9.0f} events/s")
    if rates:
        fig.add("follow: applied per 1 s window (p50/min/max)",
                f"{statistics.median(rates):9.0f} / {min(rates):.0f} / {max(rates):.0f} events/s")
    fig.add("follow: applied, first insert -> all applied", f"{m / (t_done - t_first):9.0f} events/s   "
            f"({t_done - t_first:.1f} s)")
    fig.add("follow: lag per insert batch (p50/p95/max)",
            f"{pct(lags, 50):9.3f} / {pct(lags, 95):.3f} / {max(lags, default=float('nan')):.3f} s")
    fig.add("follow: max backlog (inserted, not applied)", f"{backlog:9d} events")
    fig.add("follow: lag at end (last insert -> applied)", f"{t_done - t_last_insert:9.3f} s")
    # Kept up: it applied (nearly) everything while the inserts went on and drained the rest at once.
    kept_up = t_done - t_last_insert < 2.0 and applied_in_window >= 0.95 * m
    fig.add("follow: projector kept up with the inserts", "      yes   (applied rate = insert rate: a lower bound "
            "of its capacity)" if kept_up else "       no   (applied rate while inserting = its capacity)")
    fig.add("follow: checkpoint events_applied delta", f"{(run.ck_end or 0) - (run.ck_base or 0):9d}   "
            f"(stats: {m} new, {projector.stats.batches} batches in all, "
            f"{projector.stats.streams_opened} stream(s) opened)")


def batches_size(inserted_at: list[tuple[float, int]]) -> int:
    return inserted_at[0][1] if inserted_at else 0

