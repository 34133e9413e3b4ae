"""The queue cursor's windows: shallow queues sweep from the epoch, deep ones only ever in slices."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.store.cursor import EPOCH, QueueCursor

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_a_shallow_queue_sweeps_everything_first() -> None:
    cursor = QueueCursor()
    assert cursor.window(NOW) == (EPOCH, NOW)


def test_a_deep_queue_starts_at_its_floor_and_never_reads_more_than_a_slice_where_heads_are() -> None:
    floor = NOW - timedelta(hours=5)
    cursor = QueueCursor(slice_s=0.2, deep=True, floor=floor, max_slice_s=3600)
    lo, hi = cursor.window(NOW)
    assert lo == floor and hi - lo <= timedelta(seconds=2.2)
    # A full slice keeps the width at one slice, and the cursor at the last head taken.
    cursor.advance(NOW, hi, True, floor + timedelta(seconds=1))
    lo, hi = cursor.window(NOW)
    assert hi - lo == timedelta(seconds=0.2) and lo == floor + timedelta(seconds=1)


def test_empty_slices_double_so_crossing_hours_costs_few_probes() -> None:
    cursor = QueueCursor(slice_s=0.2, deep=True, floor=NOW - timedelta(hours=5), max_slice_s=3600)
    probes = 0
    while True:
        _, hi = cursor.window(NOW)
        probes += 1
        if not cursor.advance(NOW, hi, False, None):
            break
    assert hi == NOW and probes < 25


def test_a_sweep_of_a_deep_queue_goes_back_to_the_floor_not_to_the_epoch() -> None:
    floor = NOW - timedelta(minutes=10)
    cursor = QueueCursor(deep=True, floor=floor, sweep_s=30)
    cursor.window(NOW)
    cursor.advance(NOW, NOW, False, None)
    lo, _ = cursor.window(NOW + timedelta(seconds=31))
    assert lo == floor


def test_rewind_looks_again_from_the_last_head_used() -> None:
    cursor = QueueCursor(position=NOW)
    cursor.rewind(NOW - timedelta(seconds=5))
    assert cursor.position == NOW - timedelta(seconds=5)
