"""Token buckets per subject in one worker: the local limit.

Theory of operation. A bucket holds up to `burst` tokens and gains `rate` tokens a second; a request
takes one token. No timer refills a bucket: its level is computed when it is used, from its level and
time at its last use, so an idle bucket costs nothing. `peek` brings a bucket up to date (creating a
full one for a new subject) and says how many tokens it holds; `take` then spends one: the step peeks
every limit of a route first and takes only when all of them admit (a request refused or parked by
another limit spends nothing). A bucket idle for `burst / rate` seconds is full again, the same as a
new one, so `sweep` drops those: memory follows the subjects seen within that time. The table holds
at most `limit` buckets: when it is full and a sweep frees nothing, the oldest quarter (creation order)
goes, and those subjects start again with a full bucket (`evicted` counts them). Times are seconds of
a monotonic clock given by the caller: nothing here reads a clock.
"""

from __future__ import annotations


class TokenBucket:
    """One subject's tokens at `stamp`."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class BucketTable:
    """Subject -> `TokenBucket`, at most `limit` of them, all with the same `rate` and `burst`."""

    __slots__ = ("buckets", "burst", "evicted", "full_after", "last", "limit", "rate")

    def __init__(self, rate: float, burst: int, limit: int) -> None:
        assert rate > 0 and burst >= 1 and limit >= 1, "validated by the config"
        self.rate = rate
        self.burst = float(burst)
        self.limit = limit
        self.full_after = burst / rate  # seconds an empty bucket takes to fill up
        self.buckets: dict[bytes, TokenBucket] = {}
        self.evicted = 0
        self.last = TokenBucket(0.0, 0.0)  # the bucket of the last `peek` (what `take` spends from)

    def peek(self, subject: bytes, now: float) -> float:
        """The tokens `subject` holds at `now` (its bucket brought up to date; `take` spends from it)."""
        bucket = self.buckets.get(subject)
        if bucket is None:
            if len(self.buckets) >= self.limit:
                self._make_room(now)
            bucket = TokenBucket(self.burst, now)
            self.buckets[subject] = bucket
        else:
            elapsed = now - bucket.stamp
            if elapsed > 0.0:
                tokens = bucket.tokens + elapsed * self.rate
                bucket.tokens = tokens if tokens < self.burst else self.burst
                bucket.stamp = now
        self.last = bucket
        return bucket.tokens

    def take(self) -> float:
        """Spend one token of the bucket the last `peek` returned (which held at least one); the tokens left."""
        bucket = self.last
        bucket.tokens -= 1.0
        return bucket.tokens

    def wait(self, tokens: float) -> float:
        """Seconds until a bucket holding `tokens` (< 1) holds one."""
        return (1.0 - tokens) / self.rate

    def reset_after(self, tokens: float) -> float:
        """Seconds until a bucket holding `tokens` is full again."""
        return (self.burst - tokens) / self.rate

    def sweep(self, now: float) -> int:
        """Drop the buckets that are full again at `now` (as good as new); how many were dropped."""
        horizon = now - self.full_after
        idle = [subject for subject, bucket in self.buckets.items() if bucket.stamp <= horizon]
        for subject in idle:
            del self.buckets[subject]
        return len(idle)

    def _make_room(self, now: float) -> None:
        if self.sweep(now):
            return
        oldest = list(self.buckets)[: max(1, self.limit // 4)]
        for subject in oldest:
            del self.buckets[subject]
        self.evicted += len(oldest)

    def __len__(self) -> int:
        return len(self.buckets)
