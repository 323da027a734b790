"""Global limit accounting of one (route, limit) in one worker: what it may admit without asking Redis.

Theory of operation. Per active subject an `Entry` holds, for the current window, the global count
learned at the last sync reply (`learned`: every worker's synced increments, this one's included), this
worker's increments sent and not yet answered (`inflight`) and those not yet sent (`pending`). Its view
of the count is their sum (plus the weighted previous window when sliding), and it admits while the
view is under the limit and its `share` lasts. The share is set at every reply: the remaining budget,
less what the other workers added between two replies (which this view is likely missing again), over
`SPREAD` x the workers spending on the subject, estimated from the counts themselves (how much the
global count grew between two replies over what this worker added: the workers' rates as seen from
here; at least `min_workers`, the workers of this host). So between two syncs the workers together
spend at most about half the remaining budget, whatever their number; when a share runs out the entry
is queued and the ledger asks for an early sync (`on_urgent`), and requests wait for the reply.

When less than one request per worker is left (the *tail*: the share comes out under 1), no share is
given: one waiting request per round trip reserves its increment instead (`reserve`: counted as
pending, sent at once); Redis applies this worker's increments of a batch together, the reservation
last, so the total it answers says whether the reservation fit under the limit: if so a request is
admitted from `prepaid`, else the view is at the limit and the waiting requests are refused. The last
requests of a window are decided by Redis itself: a subject's sequential requests slower than one per
sync interval get exactly the limit whatever the number of workers (faster ones may also be admitted
from a share another worker's spending has made stale: the README's bound).

A share is good for `share_ttl` seconds after its reply, and the entry's increments go with every
sync: an entry idle longer learns again before it admits (a subject never seen also learns first), as
a stale share could admit what the other workers spent meanwhile. That costs sparse subjects (many
subjects, few requests each) a Redis command per request, and a wait when they come back; so a subject
far from its limit *defers* instead: while the remaining budget gives a share of at least
`DEFER_MIN_SHARE` when divided by `DEFER_DIVISOR` (100 x the largest worker count), its share is that
(whatever the worker estimate), good to the end of the window, and its increments are sent when half of
it is spent (an early sync) or with the window's end; a subject that spends half such a share within
`share_ttl` is no sparse one (its requests would wait a round trip every few dozen) and gets the shares
above for the rest of the window. Up to `MAX_WORKERS` workers deferring on one subject then hold at
most 1 % of the remaining budget unseen by each other, whatever their rates do, and need no worker
estimate (it is not updated while deferring, and starts again from `MAX_WORKERS` when the entry stops
deferring). Once the remaining budget is smaller, the entry is back to the shares above, sent every
sync. At a window edge an entry rolls over: what it had not sent goes in the next batch under the old
window's key, and the new window starts known at zero if the edge is less than `share_ttl` ago (every
worker's share of a fresh window comes from the full limit), else it learns first.

`take_batch` hands the sync the increments to send (moving them from pending to in flight), `apply`
takes the totals Redis answered, `failed` forgets a batch that got no answer (its increments are not
sent again: Redis may have applied them). `sweep` drops entries of past windows that hold nothing to
send, and the table never holds more than `max_entries` (the oldest quarter goes when it is full).
Nothing here reads a clock or does I/O: times are Unix seconds given by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from proxy.ratelimit.window import elapsed_fraction, used, window_of

# What `peek` says.
ADMIT: Final = 0  # within the limit and this worker's share: `commit` counts it
REJECT: Final = 1  # the view is at the limit: 429
LEARN: Final = 2  # not known well enough (new subject, stale share, share spent): a sync is asked for; wait
# (the caller then calls `reserve` if the request does wait)

MAX_WORKERS: Final = 64.0  # the largest worker-count estimate (the smallest share is remaining / 64)
_SMOOTHING: Final = 0.5  # weight of the past in the rate estimates
SPREAD: Final = 2.0  # a share is the remaining budget over SPREAD x the workers: half a fair share
DEFER_DIVISOR: Final = 100.0 * MAX_WORKERS  # a deferring share: remaining / 6,400 (64 of them: 1 % unseen)
DEFER_MIN_SHARE: Final = 4  # a subject defers while its deferring share would be at least this


def _nothing() -> None:
    pass


class Entry:
    """One subject's view of its global count in the current window."""

    __slots__ = (
        "asked",
        "deferred",
        "expiry_set",
        "fast",
        "flush_at",
        "fresh_until",
        "granted",
        "granted_at",
        "grown",
        "inflight",
        "known",
        "learned",
        "own",
        "pending",
        "prepaid",
        "previous",
        "queued",
        "reserved",
        "reserving",
        "share",
        "subject",
        "tail",
        "window",
        "workers",
    )

    def __init__(self, subject: bytes, window: int, workers: float) -> None:
        self.subject = subject
        self.window = window
        self.learned = 0  # the global count of `window` at the last reply
        self.previous = 0  # the global count of the window before (sliding windows)
        self.inflight = 0  # sent, not answered yet
        self.pending = 0  # admitted, not sent yet
        self.share = 0  # how many more this worker may admit before the next reply
        self.tail = False  # less than one request per worker left: requests reserve their increment first
        self.reserved = 0  # of `pending`: a reservation of a waiting request (tail), not sent yet
        self.reserving = 0  # reservations sent, not answered yet
        self.prepaid = 0  # reservations Redis answered within the limit, not yet taken by a request
        self.known = False  # `learned` was answered for `window` (or the window is fresh)
        self.fresh_until = 0.0  # the share is good until this Unix time
        self.flush_at = 0.0  # pending increments are sent by the first batch from this Unix time
        self.granted = 0  # the share given at the last reply (half of it spent: an early sync)
        self.deferred = False  # far from the limit: a share of remaining / DEFER_DIVISOR, sent when half spent
        self.granted_at = 0.0  # when the share was given (a reply, or a window edge)
        self.fast = False  # half a deferring share went within share_ttl: no deferring for the rest of the window
        self.queued = False  # in the ledger's queue (something to send, now or at `flush_at`)
        self.asked = False  # to be sent in the next batch whatever `flush_at` says (learn, share low)
        self.expiry_set = False  # this worker sent the key's expiry for `window`
        self.workers = workers  # estimated workers spending on this subject
        self.own = 0.0  # smoothed increments of this worker per reply
        self.grown = 0.0  # smoothed growth of the global count per reply

    def __repr__(self) -> str:
        return (
            f"<Entry {self.subject!r} w={self.window} learned={self.learned} inflight={self.inflight} "
            f"pending={self.pending} share={self.share} workers={self.workers:.1f}>"
        )


class Sent:
    """One key of a batch: `count` increments of `subject` in `window` (`entry` None once it is gone)."""

    __slots__ = ("count", "entry", "expire", "reserved", "subject", "window")

    def __init__(
        self, entry: Entry | None, subject: bytes, window: int, count: int, expire: bool, reserved: int = 0
    ) -> None:
        self.entry = entry
        self.subject = subject
        self.window = window
        self.count = count  # increments, `reserved` of them reservations (the last ones)
        self.expire = expire  # set the key's expiry with this increment (the first this worker sends)
        self.reserved = reserved


class Ledger:
    """The accounting of one global limit (`limit` requests per `length` seconds per subject) in one worker."""

    __slots__ = (
        "carry",
        "entries",
        "entry",
        "evicted",
        "length",
        "limit",
        "max_entries",
        "min_workers",
        "on_urgent",
        "prepaid_hit",
        "queue",
        "share_ttl",
        "sliding",
        "tail_hit",
        "urgent",
        "view",
        "wall",
    )

    def __init__(
        self,
        *,
        limit: int,
        length: float,
        sliding: bool,
        min_workers: int,
        share_ttl: float,
        max_entries: int,
        on_urgent: Callable[[], None] = _nothing,
    ) -> None:
        self.limit = limit
        self.length = length
        self.sliding = sliding
        self.min_workers = float(min_workers)
        self.share_ttl = share_ttl
        self.max_entries = max_entries
        self.on_urgent = on_urgent
        self.entries: dict[bytes, Entry] = {}
        self.queue: list[Entry] = []  # entries with something to send or to learn
        self.carry: list[Sent] = []  # increments of windows that ended before they were sent
        self.urgent = False  # an early sync was asked for and has not been taken yet
        self.evicted = 0
        self.entry = Entry(b"", 0, 1.0)  # the entry of the last `peek` (what `commit` counts on)
        self.view = 0.0  # the count the last `peek` saw (remaining = limit - view)
        self.wall = 0.0  # the time of the last `peek`
        self.prepaid_hit = False  # the last `peek` admitted a reservation Redis answered (counted already)
        self.tail_hit = False  # the last `peek` said LEARN in the tail: `reserve` may reserve

    # ------------------------------------------------------------------ hot path

    def peek(self, subject: bytes, wall: float) -> int:
        """ADMIT, REJECT or LEARN for one more request of `subject` at Unix time `wall`; sets `entry` and `view`."""
        window = window_of(wall, self.length)
        entry = self.entries.get(subject)
        if entry is None:
            entry = self._new(subject, window, wall)
        elif entry.window != window:
            self._roll(entry, window, wall)
        self.entry = entry
        self.wall = wall
        count = entry.learned + entry.inflight + entry.pending
        if self.sliding:
            view = used(entry.previous, count, elapsed_fraction(wall, self.length, window), True)
        else:
            view = float(count)
        self.view = view
        self.prepaid_hit = False
        self.tail_hit = False
        if not entry.known:
            self._ask(entry)
            return LEARN
        if entry.prepaid > 0:
            self.prepaid_hit = True
            return ADMIT
        if view + 1.0 > self.limit:
            return REJECT
        if wall > entry.fresh_until:
            self._ask(entry)
            return LEARN
        if entry.share <= 0:
            # In the tail, one reservation per round trip (`reserve`, once every limit of the route let
            # the request wait rather than refused it): counted, admitted once Redis says it fits.
            self.tail_hit = entry.tail and not entry.reserved and not entry.reserving
            self._ask(entry)
            return LEARN
        return ADMIT

    def commit(self) -> None:
        """Count one request on the entry the last `peek` admitted."""
        entry = self.entry
        if self.prepaid_hit:  # a reservation: counted in Redis already
            self.prepaid_hit = False
            entry.prepaid -= 1
            return
        entry.pending += 1
        entry.share -= 1
        self.view += 1.0
        if not entry.queued:
            entry.queued = True
            self.queue.append(entry)
        if entry.share <= 0:
            self._urge()
        elif entry.deferred and entry.share * 2 <= entry.granted and not entry.asked:
            # Half a deferring share is spent: send it and renew it before it runs out (requests would wait);
            # spent that fast, the subject is no sparse one: worker-estimate shares for the rest of the window.
            entry.asked = True
            entry.fast = self.wall - entry.granted_at < self.share_ttl
            self._urge()

    def reserve(self) -> None:
        """The request the last `peek` told to wait (LEARN) waits: in the tail, reserve its increment."""
        if self.tail_hit:
            self.tail_hit = False
            entry = self.entry
            entry.pending += 1
            entry.reserved = 1
            self.view += 1.0

    def remaining(self) -> int:
        """What the last `peek` left of the limit (after `commit`, if it was called)."""
        left = self.limit - self.view
        return int(left) if left > 0.0 else 0

    # ------------------------------------------------------------------ entries

    def _new(self, subject: bytes, window: int, wall: float) -> Entry:
        if len(self.entries) >= self.max_entries:
            self._make_room(window)
        entry = Entry(subject, window, self.min_workers)
        self.entries[subject] = entry
        return entry

    def _roll(self, entry: Entry, window: int, wall: float) -> None:
        """`entry` moves to `window`: its unsent increments go in the next batch under the old key."""
        old = entry.window
        if entry.pending:
            self.carry.append(Sent(entry, entry.subject, old, entry.pending, not entry.expiry_set, entry.reserved))
        entry.previous = entry.learned + entry.inflight + entry.pending if window == old + 1 else 0
        entry.window = window
        entry.learned = 0
        entry.inflight = 0
        entry.pending = 0
        entry.reserved = 0
        entry.reserving = 0
        entry.prepaid = 0
        entry.expiry_set = False
        edge = window * self.length
        # A window that began less than a share's life ago is known: nobody can have spent more of it
        # than the shares of a fresh window give.
        entry.fast = False
        entry.known = wall - edge < self.share_ttl
        if entry.known:
            self._grant(entry, edge, wall)

    def _ask(self, entry: Entry) -> None:
        entry.asked = True
        if not entry.queued:
            entry.queued = True
            self.queue.append(entry)
        self._urge()

    def _urge(self) -> None:
        if not self.urgent:
            self.urgent = True
            self.on_urgent()

    def _grant(self, entry: Entry, since: float, wall: float) -> None:
        """A new share for `entry` from a view of `since` (a reply, or a window edge known at zero)."""
        count = entry.learned + entry.inflight + entry.pending
        fraction = elapsed_fraction(wall, self.length, entry.window)
        deferring = int((self.limit - used(entry.previous, count, fraction, self.sliding)) / DEFER_DIVISOR)
        entry.granted_at = since
        if deferring >= DEFER_MIN_SHARE and not entry.fast:
            entry.deferred = True
            entry.tail = False
            entry.share = deferring
            entry.fresh_until = entry.flush_at = (entry.window + 1) * self.length
        else:
            if entry.deferred:  # the growth seen while deferring says nothing of the workers: start over
                entry.deferred = False
                entry.own = entry.grown = 0.0
                entry.workers = MAX_WORKERS
            entry.share = self._share(entry, wall)
            entry.fresh_until = since + self.share_ttl
            entry.flush_at = since
        entry.granted = entry.share

    def _share(self, entry: Entry, wall: float) -> int:
        count = entry.learned + entry.inflight + entry.pending
        fraction = elapsed_fraction(wall, self.length, entry.window)
        remaining = self.limit - used(entry.previous, count, fraction, self.sliding)
        entry.tail = False
        if remaining < 1.0:
            return 0
        # What the other workers added between two replies and this one has not seen yet comes off first.
        unseen = entry.grown - entry.own
        share = int((remaining - unseen if unseen > 0.0 else remaining) / (SPREAD * entry.workers))
        if share < 1:
            entry.tail = True
            return 0
        return share

    def sweep(self, wall: float) -> int:
        """Drop entries of past windows with nothing to send or in flight; how many were dropped."""
        window = window_of(wall, self.length)
        stale = [
            subject
            for subject, entry in self.entries.items()
            if entry.window < window and not entry.pending and not entry.inflight and not entry.queued
        ]
        for subject in stale:
            del self.entries[subject]
        return len(stale)

    def _make_room(self, window: int) -> None:
        entries = self.entries
        stale = [s for s, e in entries.items() if e.window < window and not e.pending and not e.queued]
        if not stale:
            stale = list(entries)[: max(1, self.max_entries // 4)]
            self.evicted += len(stale)
        for subject in stale:
            entry = entries.pop(subject)
            if entry.pending:  # counted, never sent: goes with the next batch
                self.carry.append(
                    Sent(None, subject, entry.window, entry.pending, not entry.expiry_set, entry.reserved)
                )
                entry.pending = 0
        if len(self.queue) > len(entries):
            self.queue = [entry for entry in self.queue if entries.get(entry.subject) is entry]

    # ------------------------------------------------------------------ sync (slow path)

    def take_batch(self, wall: float) -> list[Sent]:
        """The increments to send at Unix time `wall` (pending -> in flight: those asked for and those
        whose `flush_at` has come), and the entries that want to learn their count (sent with 0). Clears
        the early-sync request."""
        batch = self.carry
        self.carry = []
        kept: list[Entry] = []
        for entry in self.queue:
            if entry.deferred and not entry.asked and not entry.pending:
                entry.queued = False  # what it had went with a window edge (`carry`), nothing to learn
                continue
            if not entry.asked and wall < entry.flush_at:
                kept.append(entry)  # far from its limit: sent later, with what else it admits meanwhile
                continue
            entry.queued = False
            entry.asked = False
            count = entry.pending
            entry.pending = 0
            entry.inflight += count
            batch.append(Sent(entry, entry.subject, entry.window, count, not entry.expiry_set, entry.reserved))
            entry.reserving += entry.reserved
            entry.reserved = 0
            entry.expiry_set = True
        self.queue = kept
        self.urgent = False
        return batch

    def apply(self, batch: list[Sent], totals: list[int], previous: list[int] | None, wall: float) -> None:
        """Redis answered `batch`: `totals[i]` is the count of batch[i]'s key after its increment
        (`previous[i]` the count of the window before, for sliding windows)."""
        for index, sent in enumerate(batch):
            entry = sent.entry
            if entry is None:
                continue
            total = totals[index]
            if entry.window != sent.window:
                if entry.window == sent.window + 1 and total > entry.previous:
                    entry.previous = total  # what the window before came to (sliding windows)
                continue
            entry.inflight -= sent.count
            entry.reserving -= sent.reserved
            grown = total - entry.learned if entry.known else total
            if not entry.deferred and (sent.count or grown > 0):
                entry.own = entry.own * _SMOOTHING + sent.count
                entry.grown = entry.grown * _SMOOTHING + (grown if grown > sent.count else sent.count)
                workers = entry.grown / entry.own if entry.own >= 0.5 else MAX_WORKERS
                if workers < self.min_workers:
                    workers = self.min_workers
                entry.workers = workers if workers < MAX_WORKERS else MAX_WORKERS
            entry.learned = total
            if previous is not None:
                entry.previous = previous[index]
            if sent.reserved:
                # Redis applied this worker's increments together: the reservations, last, took the
                # counts total - reserved + 1 .. total; those within the limit are admitted.
                fraction = elapsed_fraction(wall, self.length, entry.window)
                before = used(entry.previous, total - sent.reserved, fraction, self.sliding)
                fits = int(self.limit - before)
                if fits > sent.reserved:
                    fits = sent.reserved
                if fits > 0:
                    entry.prepaid += fits
            entry.known = True
            self._grant(entry, wall, wall)

    def failed(self, batch: list[Sent]) -> None:
        """`batch` got no answer: its in-flight increments are dropped (not sent again), its entries learn again."""
        for sent in batch:
            entry = sent.entry
            if entry is not None and entry.window == sent.window:
                entry.inflight -= sent.count
                entry.reserving -= sent.reserved
                entry.expiry_set = False
                entry.fresh_until = 0.0

    def holds(self) -> bool:
        """Whether increments wait in the queue for a later batch (deferred: far from the limit)."""
        return bool(self.queue)

    def __len__(self) -> int:
        return len(self.entries)
