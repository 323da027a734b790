"""The rate-limit step of a route: local token buckets, then the global view, decided without I/O.

Theory of operation. A route with `limits = [...]` gets one `LimitStep` holding one `RouteLimit` per
named limit, each with a `BucketTable` (local_rate) and/or a `Ledger` (global_limit) of its own: the
key is (route, limit, subject), the subject being `exchange.subject` (the verified identity once an
auth step passed, else the client address). `check` first peeks every limit (a bucket brought up to
date, a ledger's verdict) and spends only when all of them admit, so a request that one limit refuses
or parks costs the others nothing, and re-running the step after a wait counts nothing twice. A
local bucket without a token, or a global view at the limit, answers 429 with `Retry-After` and a
JSON body naming the limit and its scope. A ledger that must learn its count first (a new subject, a
stale or spent share; in the tail of a window, its increment reserved) parks the exchange on the
worker's `WaitList` for limits; the Redis sync wakes
it after each round trip, and the step runs again. While the sync reports Redis unreachable
(`SyncHealth.up` false), global limits are skipped (failure_mode "open": local limits only) or
answered 503 at once ("closed"); a parked exchange is woken by the failure too. Every response of
the route, a 429 included, carries `RateLimit-Policy` (pre-encoded) and `RateLimit`
(draft-ietf-httpapi-ratelimit-headers-10), and `X-RateLimit-Limit/Remaining/Reset` for the limit
with the fewest requests left. Clocks: buckets use the request's `t_start` (monotonic), windows its
Unix time (`t_start + worker.wall_offset`); nothing here reads a clock.

Counts for the metrics (plain ints, read by `proxy.metricsio.WorkerMetrics.fold`, never reset): each
`RouteLimit` counts the 429s it caused by kind (`rejected_local`: its bucket; `rejected_global`: its
ledger), and each `LimitStep` the requests it admitted while Redis was down that a global limit of
the route would have been checked against (`fail_open`: admitted on local limits only).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

from proxy.errors import ProxyError, ServiceUnavailable, TooManyRequests
from proxy.exchange import WAIT
from proxy.ratelimit.bucket import BucketTable
from proxy.ratelimit.ledger import LEARN, REJECT, Ledger
from proxy.ratelimit.window import reset_after, retry_after

if TYPE_CHECKING:
    from proxy.exchange import Exchange, WaitList

_POLICY: Final = b"ratelimit-policy"
_RATELIMIT: Final = b"ratelimit"
_X_LIMIT: Final = b"x-ratelimit-limit"
_X_REMAINING: Final = b"x-ratelimit-remaining"
_X_RESET: Final = b"x-ratelimit-reset"
_RETRY_AFTER: Final = b"retry-after"
_REFUSALS_KEPT: Final = 4096
_DIGITS: Final = tuple(b"%d" % n for n in range(4096))  # small counts and seconds, encoded once


def _item(parts: list[bytes], name: bytes, remaining: bytes, reset: bytes) -> None:
    """One `RateLimit` item (`"name";r=..;t=..`) onto `parts`, after a separator if it is not the first."""
    if parts:
        parts.append(b", ")
    parts.append(name)
    parts.append(b";r=")
    parts.append(remaining)
    parts.append(b";t=")
    parts.append(reset)


def _decimal(value: int) -> bytes:
    """`value` (>= 0) in ASCII decimal, without formatting for the small ones."""
    return _DIGITS[value] if value < 4096 else str(value).encode()


class SyncHealth:
    """Whether the worker's Redis sync gets answers (written by the sync only; read by the steps)."""

    __slots__ = ("closed", "up")

    def __init__(self, closed: bool) -> None:
        self.up = True
        self.closed = closed  # failure_mode "closed": global limits answer 503 while Redis is down

    def set(self, up: bool) -> None:
        self.up = up


def _seconds(value: float) -> int:
    """Whole seconds for a header, rounded up."""
    return math.ceil(value) if value > 0.0 else 0


class RouteLimit:
    """One `[limits.NAME]` on one route in one worker."""

    __slots__ = (
        "bucket",
        "ledger",
        "local_quota",
        "local_quoted",
        "name",
        "quota",
        "quoted",
        "rejected_global",
        "rejected_local",
        "tokens",
    )

    def __init__(self, name: str, bucket: BucketTable | None, ledger: Ledger | None) -> None:
        self.name = name
        self.quoted = b'"%s"' % name.encode()
        # The local bucket's item is NAME.local when the limit also has a global part (named NAME).
        self.local_quoted = b'"%s.local"' % name.encode() if ledger is not None else self.quoted
        self.bucket = bucket
        self.ledger = ledger
        self.quota = b"%d" % ledger.limit if ledger is not None else b""  # X-RateLimit-Limit, encoded once
        self.local_quota = b"%d" % int(bucket.burst) if bucket is not None else b""
        self.tokens = 0.0  # the bucket's tokens at the last peek (after the take, once spent)
        self.rejected_local = 0  # 429s: the bucket had no token
        self.rejected_global = 0  # 429s: the global view was at the limit

    def policy_items(self) -> list[bytes]:
        """Its `RateLimit-Policy` items: the global limit as it is named, the local bucket as NAME.local."""
        items: list[bytes] = []
        ledger = self.ledger
        if ledger is not None:
            items.append(b"%s;q=%d;w=%d" % (self.quoted, ledger.limit, _seconds(ledger.length)))
        bucket = self.bucket
        if bucket is not None:
            items.append(b"%s;q=%d;w=%d" % (self.local_quoted, int(bucket.burst), _seconds(bucket.full_after)))
        return items


class LimitStep:
    """A route's rate limits, in config order."""

    __slots__ = (
        "fail_open",
        "health",
        "limits",
        "policy",
        "refusals",
        "unavailable",
        "wait_error",
        "wait_timeout",
        "waiters",
    )

    def __init__(self, limits: list[RouteLimit], health: SyncHealth, waiters: WaitList, wait_timeout: float) -> None:
        self.limits = limits
        self.health = health
        self.waiters = waiters
        self.wait_timeout = wait_timeout
        self.policy = b", ".join([item for limit in limits for item in limit.policy_items()])
        self.unavailable = ServiceUnavailable(
            "ratelimit_unavailable", fields={"error_description": "the rate-limit store is unreachable"}
        )
        self.wait_error = ServiceUnavailable(
            "ratelimit_timeout", fields={"error_description": "the rate-limit store did not answer in time"}
        )
        # 429s by (Retry-After seconds, limit index, scope): a flood of refused requests reuses a few answers.
        self.refusals: dict[int, TooManyRequests] = {}
        self.fail_open = 0  # requests admitted with a global limit skipped (Redis down, failure_mode "open")

    def check(self, exchange: Exchange) -> ProxyError | None:
        subject = exchange.subject
        mono = exchange.t_start
        wall = mono + exchange.worker.wall_offset
        up = self.health.up
        learn = False
        skipped = False  # a global limit skipped: Redis is down (failure_mode "open")
        for limit in self.limits:
            bucket = limit.bucket
            if bucket is not None:
                tokens = bucket.peek(subject, mono)
                limit.tokens = tokens
                if tokens < 1.0:
                    return self._refuse(exchange, limit, wall, bucket.wait(tokens), b"local")
            ledger = limit.ledger
            if ledger is not None:
                if not up:
                    if self.health.closed:
                        return self.unavailable
                    skipped = True
                    continue
                verdict = ledger.peek(subject, wall)
                if verdict == REJECT:
                    entry = ledger.entry
                    wait = retry_after(
                        ledger.limit,
                        entry.previous,
                        entry.learned + entry.inflight + entry.pending,
                        wall,
                        ledger.length,
                        entry.window,
                        ledger.sliding,
                    )
                    return self._refuse(exchange, limit, wall, wait, b"global")
                if verdict == LEARN:
                    learn = True
        if learn:
            for limit in self.limits:
                ledger = limit.ledger
                if ledger is not None and up:
                    ledger.reserve()
            self.waiters.park(exchange, self.wait_timeout, self.wait_error)
            return WAIT
        for limit in self.limits:
            bucket = limit.bucket
            if bucket is not None:
                limit.tokens = bucket.take()
            ledger = limit.ledger
            if ledger is not None and up:
                ledger.commit()
        if skipped:
            self.fail_open += 1
        self._headers(exchange, wall, len(self.limits), up)
        return None

    def _refuse(self, exchange: Exchange, limit: RouteLimit, wall: float, wait: float, scope: bytes) -> ProxyError:
        """429 for `limit` (the limits before it were peeked: their headers go along)."""
        index = self.limits.index(limit)
        self._headers(exchange, wall, index + 1, self.health.up)
        seconds = _seconds(wait)
        if seconds < 1:
            seconds = 1
        is_global = scope == b"global"
        if is_global:
            limit.rejected_global += 1
        else:
            limit.rejected_local += 1
        key = (seconds * len(self.limits) + index) * 2 + (1 if is_global else 0)
        refusal = self.refusals.get(key)
        if refusal is None:
            if len(self.refusals) >= _REFUSALS_KEPT:
                self.refusals.clear()
            refusal = TooManyRequests(
                "rate_limited",
                headers=((_RETRY_AFTER, b"%d" % seconds),),
                fields={"limit": limit.name, "scope": scope.decode()},
            )
            self.refusals[key] = refusal
        return refusal

    def _headers(self, exchange: Exchange, wall: float, count: int, up: bool) -> None:
        """RateLimit and X-RateLimit-* for the first `count` limits, as their last peek (and spend) left them."""
        parts: list[bytes] = []  # the RateLimit items, flat: one join, no formatting
        least = -1
        least_quota = b""
        least_remaining = b""
        least_reset = b""
        for index in range(count):
            limit = self.limits[index]
            ledger = limit.ledger
            if ledger is not None and up:
                remaining = ledger.remaining()
                left = _decimal(remaining)
                reset = _decimal(_seconds(reset_after(wall, ledger.length, ledger.entry.window)))
                _item(parts, limit.quoted, left, reset)
                if least < 0 or remaining < least:
                    least, least_quota, least_remaining, least_reset = remaining, limit.quota, left, reset
            bucket = limit.bucket
            if bucket is not None:
                tokens = limit.tokens
                remaining = int(tokens) if tokens > 0.0 else 0
                left = _decimal(remaining)
                reset = _decimal(_seconds(bucket.reset_after(tokens)))
                _item(parts, limit.local_quoted, left, reset)
                if least < 0 or remaining < least:
                    least, least_quota, least_remaining, least_reset = remaining, limit.local_quota, left, reset
        exchange.add_response_header(_POLICY, self.policy)
        if parts:
            exchange.add_response_header(_RATELIMIT, b"".join(parts))
            exchange.add_response_header(_X_LIMIT, least_quota)
            exchange.add_response_header(_X_REMAINING, least_remaining)
            exchange.add_response_header(_X_RESET, least_reset)
