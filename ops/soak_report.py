"""The soak's figures and judgement (ops/soak.py): one Sample per interval, the Run they add up to,
the checks that turn them into a verdict, and the printed table and summary."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field


@dataclass
class Sample:
    t_s: float  # seconds since the start of posting
    accepted: int  # in this interval
    billed: int  # in this interval (reporting)
    p50_ms: float | None
    p99_ms: float | None
    rss_mb: dict[str, float]
    cpu_pct: dict[str, float]
    fds: dict[str, int]
    backlog: dict[str, int]  # stage -> waiting
    lag_s: float | None


@dataclass
class FaultResult:
    after_sample: int  # the fault came right after this sample (1-based)
    kind: str  # kill | smsc-drop | store-restart
    target: str  # the process, or what was skipped
    ok: bool  # the stack came back as it should (for a skipped fault: True)
    detail: str
    seconds: float  # from the fault to the stack back (0 when skipped)


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    unknown: int = 0  # messages of batches whose outcome the api never told (retried in vain)
    billed_total: int = 0
    drained: bool = False
    verify_ok: bool = False
    verify_counts: dict[str, int] = field(default_factory=dict)
    restarts: dict[str, list[int]] = field(default_factory=dict)  # process -> sample indexes of restarts
    faults: list[FaultResult] = field(default_factory=list)
    died: dict[str, int | None] = field(default_factory=dict)


# ---- verdict ---------------------------------------------------------------------------------------


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour; 0 with fewer than two points."""
    if len(ts) < 2 or len(set(ts)) < 2:
        return 0.0
    return statistics.linear_regression(ts, ys).slope * 3600


def verdict(run: Run, args: argparse.Namespace) -> list[str]:
    """The failed checks, each as one line; empty when the run passes."""
    fails = []
    if run.billed_total != run.accepted:
        fails.append(f"lost: {run.accepted} accepted, {run.billed_total} billed")
    if not run.drained:
        fails.append(f"drained: backlog not back to 0 within {args.drain_timeout:.0f}s")
    if not run.verify_ok:
        fails.append(f"verify: discrepancies {run.verify_counts}")
    if run.unknown:
        fails.append(f"unknown: {run.unknown} messages posted whose outcome the api never told")
    if run.died:
        fails.append(f"alive: components died: {run.died}")
    fails += [f"fault: {f.kind} {f.target} after sample {f.after_sample}: {f.detail}" for f in run.faults if not f.ok]
    fails += _memory_fails(run, args)
    fails += _trend_fails(run, args)
    return fails


def _steady(run: Run, name: str, warmup: int) -> list[Sample]:
    """The samples of `name` after warm-up and after its last restart (a restart resets its RSS)."""
    first = max([warmup, *(i + warmup for i in run.restarts.get(name, []))])
    return [s for s in run.samples[first:] if name in s.rss_mb]


def _memory_fails(run: Run, args: argparse.Namespace) -> list[str]:
    fails = []
    names = sorted({n for s in run.samples for n in s.rss_mb})
    for name in names:
        steady = _steady(run, name, args.warmup)
        if len(steady) < 2:
            continue
        rss = [s.rss_mb[name] for s in steady]
        slope = slope_per_hour([s.t_s for s in steady], rss)
        if slope > args.max_rss_mb_per_hour and rss[-1] - rss[0] > args.rss_noise_mb:
            fails.append(f"rss: {name} grows {slope:.0f} MB/h ({rss[0]:.0f} -> {rss[-1]:.0f} MB)")
        fds = [s.fds.get(name, 0) for s in steady]
        if fds[-1] - fds[0] > args.max_fd_growth:
            fails.append(f"fds: {name} open files {fds[0]} -> {fds[-1]}")
    return fails


def _trend_fails(run: Run, args: argparse.Namespace) -> list[str]:
    fails = []
    # The sample right after a fault carries its spike (a rebind, a store restart): not a trend.
    hit = {f.after_sample for f in run.faults}  # 0-based index of the sample that follows the fault
    steady = [s for i, s in enumerate(run.samples) if i >= args.warmup and i not in hit]
    p99 = [s.p99_ms for s in steady if s.p99_ms is not None]
    if len(p99) >= 3:
        third = len(p99) // 3
        first, last = statistics.median(p99[:third]), statistics.median(p99[-third:])
        if last > args.max_p99_ratio * first and last > args.p99_floor_ms:
            fails.append(f"p99: {first:.0f} ms in the first third -> {last:.0f} ms in the last")
    waiting = [s.backlog["route"] + s.backlog["send"] for s in steady]
    if len(waiting) >= 3:
        # Medians of thirds: a spike (a restarted connector catching up) is not a trend.
        third = len(waiting) // 3
        first_b, last_b = statistics.median(waiting[:third]), statistics.median(waiting[-third:])
        if last_b - first_b > args.max_backlog_growth:
            fails.append(f"backlog: {first_b:.0f} waiting in the first third -> {last_b:.0f} in the last")
    return fails


# ---- report ----------------------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def print_row(i: int, s: Sample) -> None:
    if i == 0:
        print(f"{'min':>5} {'acc':>6} {'billed':>6} {'p50ms':>6} {'p99ms':>6} {'route':>6} {'send':>6} {'lag s':>6}"
              "  RSS MB / CPU % / fds per process", flush=True)
    procs = "  ".join(f"{n}={s.rss_mb[n]:.0f}/{s.cpu_pct.get(n, 0):.0f}/{s.fds.get(n, 0)}" for n in sorted(s.rss_mb))
    lag = "-" if s.lag_s is None else f"{s.lag_s:.1f}"
    print(f"{s.t_s / 60:5.1f} {s.accepted:6d} {s.billed:6d} {_ms(s.p50_ms):>6} {_ms(s.p99_ms):>6} "
          f"{s.backlog['route']:6d} {s.backlog['send']:6d} {lag:>6}  {procs}", flush=True)


def print_summary(run: Run, args: argparse.Namespace, fails: list[str]) -> None:
    print(f"\nsoak: {run.accepted} accepted ({run.rejected} refused), {run.billed_total} billed, "
          f"{len(run.samples)} samples of {args.interval:.0f}s, restarts {run.restarts or 'none'}")
    for f in run.faults:
        print(f"  fault after sample {f.after_sample}: {f.kind} {f.target}: {'ok' if f.ok else 'FAILED'}, "
              f"{f.detail} ({f.seconds:.1f}s)")
    for name in sorted({n for s in run.samples for n in s.rss_mb}):
        steady = _steady(run, name, args.warmup)
        if len(steady) >= 2:
            slope = slope_per_hour([s.t_s for s in steady], [s.rss_mb[name] for s in steady])
            print(f"  RSS {name:10} {steady[0].rss_mb[name]:6.0f} -> {steady[-1].rss_mb[name]:6.0f} MB"
                  f"  ({slope:+.1f} MB/h after warm-up)")
    print(f"  verify: {'clean' if run.verify_ok else 'DISCREPANCIES'} {run.verify_counts}")
    print("VERDICT: " + ("PASS" if not fails else "FAIL\n  " + "\n  ".join(fails)), flush=True)
