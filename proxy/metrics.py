"""Request metrics counted in plain Python on the hot path (compiled), folded into files elsewhere.

Theory of operation: `RequestCounts.exchange_finished` is a worker `finished` hook (called once per
exchange, whatever its outcome). It only adds to plain ints and floats owned by this module: per route,
requests by (method, status) and a duration histogram; per upstream, a histogram of the time from the
request head sent to the end; the pool wait of exchanges that queued for a connection; auth failures
by their error code. Nothing here does I/O or knows Prometheus: `proxy.metricsio.WorkerMetrics` (a
tick subscriber) reads these counts every `metrics.interval` and writes them into the worker's
prometheus-client multiprocess files. Every label value is bounded: route and upstream names come from
the config, methods outside `METHODS` count as "OTHER", statuses are what was answered (three digits), auth reasons
are the auth steps' error codes (`proxy.auth.step.FAILURE_REASONS`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy.auth.step import FAILURE_REASONS

if TYPE_CHECKING:
    from proxy.exchange import Exchange

# Histogram upper bounds in seconds (`le`), from 50 µs to 30 s; one more bucket holds +Inf. A list, not
# a tuple: compiled code indexes it in place.
BUCKETS: Final[list[float]] = [
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
]
METHODS: Final[list[str]] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER"]
_METHOD_INDEX: Final[dict[bytes, int]] = {name.encode(): index for index, name in enumerate(METHODS[:-1])}
assert METHODS[0] == "GET", "exchange_finished counts GET at index 0 without the dictionary"
OTHER_METHOD: Final = len(METHODS) - 1


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum of observed values."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # A scan from the smallest bound (most requests take well under a millisecond): in compiled code
        # a few unboxed compares, cheaper than calling bisect with a boxed float.
        index = 0
        for bound in BUCKETS:
            if value <= bound:
                break
            index += 1
        counts = self.counts
        counts[index] = counts[index] + 1  # (`+=` on a list item is a generic in-place add in compiled code)
        self.total += value


class RouteCounts:
    """One route's requests by method and status, and their durations."""

    __slots__ = ("duration", "name", "requests")

    def __init__(self, name: str) -> None:
        self.name = name
        # Per method index (`METHODS`): status -> count (keys below 257 are Python's cached small ints).
        self.requests: list[dict[int, int]] = [{} for _ in METHODS]
        self.duration = Histogram()


class RequestCounts:
    """Per-worker counts of finished exchanges (the finished hook), read by the metrics fold."""

    __slots__ = ("auth_failures", "pool_wait", "routes", "upstreams")

    def __init__(self) -> None:
        self.routes: dict[str, RouteCounts] = {}  # route name ("" for requests no route took) -> counts
        self.upstreams: dict[str, Histogram] = {}  # upstream name -> request head sent .. end
        self.pool_wait = Histogram()  # exchanges that queued for a pooled connection
        self.auth_failures: dict[str, int] = {}

    def exchange_finished(self, exchange: Exchange) -> None:
        """A worker `finished` hook."""
        route = exchange.route
        name = route.name if route is not None else ""
        counts = self.routes.get(name)
        if counts is None:
            counts = RouteCounts(name)
            self.routes[name] = counts
        method = exchange.method
        # GET, the usual method, is compared (a few instructions) before the dictionary (a hash of new bytes).
        requests = counts.requests[0 if method == b"GET" else _METHOD_INDEX.get(method, OTHER_METHOD)]
        status = exchange.status
        requests[status] = requests.get(status, 0) + 1
        counts.duration.observe(exchange.t_end - exchange.t_start)
        if exchange.t_upstream != 0.0 and route is not None:
            upstream = self.upstreams.get(route.upstream)
            if upstream is None:
                upstream = Histogram()
                self.upstreams[route.upstream] = upstream
            upstream.observe(exchange.t_end - exchange.t_upstream)
        if exchange.t_queued != 0.0:
            waited = exchange.pool_wait
            self.pool_wait.observe(waited if waited != 0.0 else exchange.t_end - exchange.t_queued)
        error = exchange.error
        if error and error in FAILURE_REASONS:
            self.auth_failures[error] = self.auth_failures.get(error, 0) + 1
