"""Token buckets and window arithmetic, on an injected clock (no loop, no sockets)."""

from __future__ import annotations

import pytest

from proxy.ratelimit.bucket import BucketTable
from proxy.ratelimit.window import elapsed_fraction, reset_after, retry_after, used, window_of


def admit(table: BucketTable, subject: bytes, now: float) -> bool:
    if table.peek(subject, now) >= 1.0:
        table.take()
        return True
    return False


def test_a_new_subject_starts_with_a_full_bucket_and_spends_its_burst_then_waits_for_the_rate() -> None:
    table = BucketTable(rate=10.0, burst=5, limit=100)
    assert [admit(table, b"a", 100.0) for _ in range(6)] == [True] * 5 + [False]
    assert table.peek(b"a", 100.0) == pytest.approx(0.0)
    assert table.wait(table.peek(b"a", 100.0)) == pytest.approx(0.1)
    assert not admit(table, b"a", 100.09)
    assert admit(table, b"a", 100.1 + 1e-9)
    assert not admit(table, b"a", 100.1 + 2e-9)


def test_refill_is_capped_at_the_burst_and_reset_after_says_when_it_is_full() -> None:
    table = BucketTable(rate=2.0, burst=4, limit=100)
    for _ in range(4):
        assert admit(table, b"a", 0.0)
    assert table.peek(b"a", 1.0) == pytest.approx(2.0)
    assert table.reset_after(2.0) == pytest.approx(1.0)
    assert table.peek(b"a", 100.0) == 4.0
    assert [admit(table, b"a", 100.0) for _ in range(5)] == [True] * 4 + [False]


def test_peek_spends_nothing_and_subjects_are_independent() -> None:
    table = BucketTable(rate=1.0, burst=1, limit=100)
    for _ in range(3):
        assert table.peek(b"a", 5.0) == 1.0
    assert admit(table, b"a", 5.0) and not admit(table, b"a", 5.0)
    assert admit(table, b"b", 5.0)


def test_a_clock_that_steps_back_never_adds_tokens() -> None:
    table = BucketTable(rate=1.0, burst=2, limit=100)
    assert admit(table, b"a", 10.0) and admit(table, b"a", 10.0)
    assert table.peek(b"a", 9.0) == 0.0
    assert table.peek(b"a", 10.5) == pytest.approx(0.5)


def test_sweep_drops_only_buckets_that_are_full_again() -> None:
    table = BucketTable(rate=10.0, burst=10, limit=100)
    admit(table, b"old", 0.0)
    admit(table, b"new", 0.5)
    assert table.sweep(1.2) == 1
    assert list(table.buckets) == [b"new"]


def test_the_table_is_bounded_idle_buckets_go_first_then_the_oldest_quarter() -> None:
    table = BucketTable(rate=1.0, burst=1, limit=8)
    for i in range(8):
        admit(table, b"s%d" % i, 0.0)
    admit(table, b"late", 0.5)  # nothing is full again at 0.5: the oldest quarter goes
    assert len(table) == 7 and table.evicted == 2 and b"s0" not in table.buckets and b"s2" in table.buckets
    for i in range(100):
        admit(table, b"x%d" % i, 10.0 + i)  # each earlier one is full again: swept, never evicted
    assert len(table) <= 8 and table.evicted == 2


def test_fixed_windows_are_aligned_on_the_epoch() -> None:
    assert window_of(9.999, 10.0) == 0 and window_of(10.0, 10.0) == 1
    assert window_of(1_700_000_000.25, 0.5) == 3_400_000_000
    assert elapsed_fraction(12.5, 10.0, 1) == pytest.approx(0.25)
    assert reset_after(12.5, 10.0, 1) == pytest.approx(7.5)
    assert used(100, 7, 0.25, sliding=False) == 7.0


def test_a_sliding_window_weighs_the_previous_window_by_what_still_overlaps() -> None:
    assert used(100, 10, 0.0, sliding=True) == pytest.approx(110.0)
    assert used(100, 10, 0.25, sliding=True) == pytest.approx(85.0)
    assert used(100, 10, 1.0, sliding=True) == pytest.approx(10.0)


def test_retry_after_across_a_window_edge() -> None:
    # Fixed: the end of the window.
    assert retry_after(10, 0, 10, 12.0, 10.0, 1, sliding=False) == pytest.approx(8.0)
    # Sliding, limit 10, previous 20, current 0 at 25% of the window: 15 used; one more fits once
    # 20 * (1 - f) + 1 <= 10, i.e. f >= 0.55: 3 s later.
    assert retry_after(10, 20, 0, 12.5, 10.0, 1, sliding=True) == pytest.approx(3.0)
    # Sliding with the current window itself full: its end.
    assert retry_after(10, 20, 10, 12.5, 10.0, 1, sliding=True) == pytest.approx(7.5)
