"""Global limit accounting without Redis or a loop: shares, early syncs, replies, window edges, and the
accuracy of several workers against one shared counter (a discrete-event simulation with a round trip)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.accuracy import simulate, within_bar
from proxy.ratelimit.ledger import ADMIT, LEARN, REJECT, Ledger, Sent


def ledger(limit: int = 100, length: float = 1.0, sliding: bool = False, workers: int = 1, **kw: object) -> Ledger:
    options: dict[str, object] = {"share_ttl": 0.05, "max_entries": 1000, **kw}
    return Ledger(limit=limit, length=length, sliding=sliding, min_workers=workers, **options)  # type: ignore[arg-type]


class Counter:
    """What Redis does for a batch: INCRBY per key, the totals back."""

    def __init__(self) -> None:
        self.counts: dict[tuple[bytes, int], int] = {}

    def run(self, batch: list[Sent]) -> tuple[list[int], list[int]]:
        totals, previous = [], []
        for sent in batch:
            key = (sent.subject, sent.window)
            self.counts[key] = self.counts.get(key, 0) + sent.count
            totals.append(self.counts[key])
            previous.append(self.counts.get((sent.subject, sent.window - 1), 0))
        return totals, previous


def sync(book: Ledger, counter: Counter, wall: float) -> list[Sent]:
    batch = book.take_batch(wall)
    totals, previous = counter.run(batch)
    book.apply(batch, totals, previous if book.sliding else None, wall)
    return batch


def test_a_new_subject_learns_first_then_admits_its_share_and_asks_early_when_it_runs_out() -> None:
    urged: list[int] = []
    book = ledger(limit=100, workers=4, on_urgent=lambda: urged.append(1))
    counter = Counter()
    assert book.peek(b"k", 10.0) == LEARN and urged == [1]
    sync(book, counter, 10.0)
    # A fresh subject: half a fair share of the limit over this host's 4 workers (SPREAD = 2).
    assert book.entries[b"k"].share == 12
    for _ in range(12):
        assert book.peek(b"k", 10.001) == ADMIT
        book.commit()
    assert urged == [1, 1], "the last of the share asks for an early sync"
    assert book.remaining() == 88
    assert book.peek(b"k", 10.001) == LEARN
    batch = sync(book, counter, 10.002)
    assert [(s.subject, s.window, s.count, s.expire) for s in batch] == [(b"k", 10, 12, False)]
    entry = book.entries[b"k"]
    assert (entry.learned, entry.inflight, entry.pending) == (12, 0, 0)
    assert entry.share == int(88 / (2 * entry.workers))


def admit_all(book: Ledger, counter: Counter, count: int, wall: float) -> None:
    """Admit `count` requests at `wall`, syncing whenever the ledger must learn."""
    for _ in range(count):
        for _ in range(3):  # learn, then (in the tail) reserve
            verdict = book.peek(b"k", wall)
            if verdict != LEARN:
                break
            book.reserve()
            sync(book, counter, wall)
        assert verdict == ADMIT
        book.commit()


def test_the_view_includes_other_workers_increments_and_rejects_at_the_limit() -> None:
    book = ledger(limit=10, workers=1)
    counter = Counter()
    counter.counts[(b"k", 10)] = 7  # other workers spent 7
    assert book.peek(b"k", 10.5) == LEARN
    sync(book, counter, 10.5)
    entry = book.entries[b"k"]
    # Others' growth and none of its own: as many workers as it can think of (64), so 3 left is the tail.
    assert entry.learned == 7 and entry.workers == 64.0 and entry.tail and entry.share == 0
    admit_all(book, counter, 3, 10.55)  # each reserved first, then admitted
    assert book.remaining() == 0 and counter.counts[(b"k", 10)] == 10
    assert book.peek(b"k", 10.6) == REJECT
    assert book.peek(b"k", 11.0) == ADMIT, "a new window starts known at zero"


def test_in_the_tail_redis_decides_each_request_so_two_workers_never_overshoot() -> None:
    counter = Counter()
    counter.counts[(b"k", 10)] = 9
    first, second = ledger(limit=10, workers=2), ledger(limit=10, workers=2)
    for book in (first, second):
        assert book.peek(b"k", 10.5) == LEARN
        sync(book, counter, 10.5)
        assert book.entries[b"k"].tail and book.entries[b"k"].share == 0
    # Both have the last request in view: each reserves it (counted), Redis says which one fits.
    assert first.peek(b"k", 10.5) == LEARN and second.peek(b"k", 10.5) == LEARN
    assert first.entries[b"k"].reserved == 0, "nothing reserved until the request does wait"
    first.reserve()
    second.reserve()
    assert first.peek(b"k", 10.5) == REJECT and first.entries[b"k"].reserved == 1, "its view holds the reservation"
    sync(first, counter, 10.5)
    sync(second, counter, 10.5)
    assert first.peek(b"k", 10.5) == ADMIT
    first.commit()
    assert second.peek(b"k", 10.5) == REJECT, "its reservation came second: over the limit"
    assert first.peek(b"k", 10.5) == REJECT and first.entries[b"k"].prepaid == 0
    assert counter.counts[(b"k", 10)] == 11, "the refused reservation stays counted (never admitted)"


def test_a_stale_share_learns_again_before_admitting() -> None:
    book = ledger(limit=100, workers=1, share_ttl=0.05)
    counter = Counter()
    book.peek(b"k", 10.0)
    sync(book, counter, 10.0)
    assert book.peek(b"k", 10.04) == ADMIT
    assert book.peek(b"k", 10.06) == LEARN


def test_far_from_its_limit_a_subject_defers_a_small_share_good_to_the_window_end() -> None:
    urged: list[int] = []
    book = ledger(limit=100_000, workers=2, share_ttl=0.05, on_urgent=lambda: urged.append(1))
    counter = Counter()
    book.peek(b"k", 10.0)
    sync(book, counter, 10.0)
    entry = book.entries[b"k"]
    # 100,000 / 6,400: a share every one of 64 workers could hold unseen with 1 % of the budget in all.
    assert entry.deferred and entry.share == 15 and entry.fresh_until == entry.flush_at == 11.0
    for _ in range(7):
        assert book.peek(b"k", 10.9) == ADMIT, "no share life but the window's"
        book.commit()
    assert book.take_batch(10.9) == [], "deferred: nothing sent while less than half the share is spent"
    assert book.peek(b"k", 10.9) == ADMIT
    book.commit()
    assert urged == [1, 1], "half the share spent asks for an early sync"
    batch = sync(book, counter, 10.9)
    assert [s.count for s in batch] == [8]
    assert entry.share == int((100_000 - 8) / 6400) and entry.deferred
    counter.counts[(b"k", 10)] += 90_000  # others spent: about 10,000 left, too little to defer on
    for _ in range(8):
        assert book.peek(b"k", 10.95) == ADMIT
        book.commit()
    sync(book, counter, 10.95)
    assert counter.counts[(b"k", 10)] == 90_016
    assert not entry.deferred and entry.fresh_until == pytest.approx(11.0) and entry.flush_at == 10.95
    assert entry.workers == 64.0, "the estimate starts over from the most workers after deferring"


def test_a_subject_spending_half_a_deferring_share_within_share_ttl_stops_deferring_for_the_window() -> None:
    book = ledger(limit=1_000_000, workers=2, share_ttl=0.05)
    counter = Counter()
    book.peek(b"k", 10.0)
    sync(book, counter, 10.0)
    entry = book.entries[b"k"]
    assert entry.deferred and entry.share == 156
    for _ in range(78):  # half of it within 10 ms: a busy subject, not a sparse one
        assert book.peek(b"k", 10.01) == ADMIT
        book.commit()
    assert entry.fast
    sync(book, counter, 10.01)
    assert not entry.deferred and entry.fresh_until == pytest.approx(10.06)
    assert entry.share == int((1_000_000 - 78) / (2 * 64)), "the worker estimate starts from the most workers"
    assert book.peek(b"k", 11.01) == ADMIT and entry.deferred, "a new window defers again"


def test_the_last_batch_at_a_stop_sends_the_deferred_increments_too() -> None:
    book = ledger(limit=1_000_000, workers=1)
    counter = Counter()
    book.peek(b"k", 10.0)
    sync(book, counter, 10.0)
    for _ in range(3):
        book.peek(b"k", 10.1)
        book.commit()
    assert book.take_batch(10.1) == [] and book.holds(), "deferred: held (the sync probes Redis meanwhile)"
    assert [s.count for s in book.take_batch(math.inf)] == [3]
    assert not book.holds()


def test_near_the_limit_a_share_lives_share_ttl_and_is_sent_every_sync() -> None:
    book = ledger(limit=100, workers=1, share_ttl=0.05)
    counter = Counter()
    admit_all(book, counter, 90, 10.5)
    sync(book, counter, 10.5)
    entry = book.entries[b"k"]
    assert entry.fresh_until == pytest.approx(10.55) and entry.flush_at == pytest.approx(10.5)
    assert book.peek(b"k", 10.51) == ADMIT
    book.commit()
    assert [s.count for s in book.take_batch(10.51)] == [1]


def test_a_sparse_subject_far_from_its_limit_costs_one_increment_per_window_and_never_waits() -> None:
    """Many subjects at a few requests each per window: no learning past the first, one key per window."""
    book = ledger(limit=1_000_000, workers=1, share_ttl=0.07)
    counter = Counter()
    assert book.peek(b"k", 10.0) == LEARN
    sync(book, counter, 10.0)
    sent: list[tuple[int, int]] = []
    wall = 10.0
    for _ in range(45):  # 15 requests per second for 3 windows, a sync every 10 ms in between
        wall += 1 / 15
        assert book.peek(b"k", wall) == ADMIT, wall
        book.commit()
        for tick in range(6):
            batch = sync(book, counter, wall + tick * 0.01)
            sent += [(s.window, s.count) for s in batch if s.count]
    assert sent == [(10, 15), (11, 15), (12, 15)], "one increment per window, at its end or edge"


def test_an_edge_carries_unsent_increments_to_the_old_key_and_the_sliding_previous_count() -> None:
    counter = Counter()
    book = ledger(limit=100, sliding=True, workers=1, share_ttl=2.0)
    book.peek(b"k", 10.0)
    sync(book, counter, 10.0)
    for _ in range(30):
        assert book.peek(b"k", 10.9) == ADMIT
        book.commit()
    # The edge: the 30 unsent increments go under window 10, the new window counts them as previous.
    assert book.peek(b"k", 11.2) == ADMIT
    entry = book.entries[b"k"]
    assert entry.window == 11 and entry.previous == 30 and entry.pending == 0
    assert book.view == pytest.approx(30 * 0.8)
    batch = sync(book, counter, 11.2)
    assert [(s.window, s.count) for s in batch] == [(10, 30), (11, 0)]
    assert counter.counts[(b"k", 10)] == 30
    assert entry.previous == 30


def test_a_fixed_window_rejects_until_the_edge_and_a_sliding_one_frees_up_as_it_slides() -> None:
    fixed, sliding = (
        ledger(limit=10, workers=1, share_ttl=10.0),
        ledger(limit=10, sliding=True, workers=1, share_ttl=10.0),
    )
    counters = [Counter(), Counter()]
    for book, counter in zip((fixed, sliding), counters, strict=True):
        admit_all(book, counter, 10, 20.5)
        assert book.peek(b"k", 20.9) == REJECT
        sync(book, counter, 20.95)
    assert fixed.peek(b"k", 21.05) == ADMIT
    # Sliding: 10 * (1 - 0.05) = 9.5 used at 21.05: one more fits only once f >= 0.1.
    assert sliding.peek(b"k", 21.05) in (REJECT, LEARN) and sliding.view == pytest.approx(9.5)
    # The share a reply gave at 9.5 used was nothing: the first request once one fits learns again.
    assert sliding.peek(b"k", 21.11) == LEARN
    sync(sliding, counters[1], 21.11)
    assert sliding.entries[b"k"].previous == 10
    assert sliding.entries[b"k"].tail, "1.1 left: the tail, Redis decides"
    admit_all(sliding, counters[1], 1, 21.11)
    assert sliding.peek(b"k", 21.11) == REJECT


def test_a_failed_batch_is_dropped_not_resent_and_the_entry_learns_again() -> None:
    book = ledger(limit=100, workers=1)
    counter = Counter()
    book.peek(b"k", 10.0)
    sync(book, counter, 10.0)
    for _ in range(5):
        book.peek(b"k", 10.01)
        book.commit()
    batch = book.take_batch(10.01)
    assert book.entries[b"k"].inflight == 5
    book.failed(batch)
    entry = book.entries[b"k"]
    assert entry.inflight == 0 and entry.pending == 0
    assert book.peek(b"k", 10.02) == LEARN
    assert [s.count for s in book.take_batch(10.02)] == [0]


def test_sweep_and_the_bound_on_entries_never_lose_unsent_increments() -> None:
    book = ledger(limit=1000, workers=1, max_entries=8, share_ttl=10.0)
    for i in range(8):
        book.peek(b"s%d" % i, 10.0)
    sync(book, Counter(), 10.0)
    for i in range(8):
        assert book.peek(b"s%d" % i, 10.1) == ADMIT
        book.commit()
    book.peek(b"new", 10.2)  # full, all current: the oldest quarter goes, their counts carried
    assert len(book) == 7 and book.evicted == 2
    batch = book.take_batch(10.2)
    assert sorted((s.subject, s.count) for s in batch if s.entry is None) == [(b"s0", 1), (b"s1", 1)]
    totals, _ = Counter().run(batch)
    book.apply(batch, totals, None, 10.3)
    assert len(book) == 7 and book.sweep(11.5) == 7, "entries of a past window with nothing to send go"
    assert len(book) == 0


# ---------------------------------------------------------------------------------------------- simulation


@pytest.mark.parametrize(
    ("workers", "limit", "windows"), [(4, 2000, 8), (4, 200, 8), (8, 1000, 8), (2, 50, 8), (4, 20000, 8), (4, 60000, 3)]
)
def test_simulated_workers_hold_the_accuracy_bar(workers: int, limit: int, windows: int) -> None:
    """(60,000: the first part of each window deferred, far from the limit.)"""
    counts = simulate(
        workers=workers, host_workers=2, limit=limit, length=1.0, load=3.0, interval=0.01, rtt=0.001, windows=windows
    )
    assert within_bar(counts, limit), counts


def test_naive_batching_overshoots_by_about_workers_times_rate_times_interval() -> None:
    common: dict[str, Any] = {"workers": 4, "host_workers": 2, "limit": 2000, "length": 1.0, "load": 3.0}
    counts = simulate(**common, interval=0.01, rtt=0.001, windows=6, naive=True)
    assert max(counts) > 1.02 * 2000 and not within_bar(counts, 2000), counts
