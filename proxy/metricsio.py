"""Metrics across processes: prometheus-client multiprocess files, written by workers, read by the supervisor.

Theory of operation. The supervisor owns one directory (`MetricsDirectory`: `metrics.directory`, or a
fresh temporary one) for its whole life: it removes stale files at start, and everything at exit.
Its path reaches the workers in their config (`config.with_metrics_directory`), never through the
environment: nothing here uses prometheus-client's metric classes (which choose their storage from
`PROMETHEUS_MULTIPROC_DIR` when imported) but its file format directly: `MmapedDict` files named
`counter_<pid>.db`, `histogram_<pid>.db` and `gauge_livesum_<pid>.db`, keyed by `mmap_key`, exactly
what `MultiProcessCollector(path=...)` reads.

A worker counts in plain Python (`proxy.metrics.RequestCounts`, the finished hook; counters kept by
the pools, the token caches, the rate-limit steps and the Redis sync); `WorkerMetrics.tick` (a tick
subscriber) writes every `metrics.interval` the absolute value of each of its counters and histogram
buckets into its own files, plus the live gauges (open client connections, upstream connections,
ejected servers). A worker that stops writes once more at exit.

When a worker is reaped the supervisor calls `MetricsDirectory.process_dead(pid)`: its live gauges
are removed (`mark_process_dead`), and its counter and histogram files are added into the
supervisor's archive files (`counter_archive.db`, `histogram_archive.db`) and removed, in one step
of the supervisor's single-threaded loop, which is also the only reader: a scrape sees the dead
worker's totals exactly once, before or after, and the directory does not grow with restarts. Counts
a worker made after its last write are lost when it is killed (at most one interval's worth): totals
never go backwards. `/metrics` is `MultiProcessCollector` over the directory plus the supervisor's
own metrics (`uvgate_worker_restarts_total`, `uvgate_build_info`).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from proxy import __version__
from proxy.metrics import BUCKETS, METHODS, Histogram, RequestCounts

if TYPE_CHECKING:
    from proxy.auth.step import TokenCache
    from proxy.config import MetricsConfig
    from proxy.ratelimit.services import LimitServices
    from proxy.server import WorkerState
    from proxy.upstream.pool import Cluster

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
LE_VALUES = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]  # type: ignore[no-untyped-call]

# name -> help text (the metric names of the multiprocess files; counters get "_total" on their sample).
HELP: dict[str, str] = {
    "uvgate_requests": "Requests finished, by route, method and status code (499: the client went away).",
    "uvgate_request_duration_seconds": "Time from the request head parsed to the end of the exchange, by route.",
    "uvgate_upstream_request_duration_seconds": "Time from the request head sent upstream to the end, by upstream.",
    "uvgate_upstream_connect_errors": "Failed connects to upstream servers (refused, reset, timed out).",
    "uvgate_upstream_pool_wait_seconds": "Time exchanges waited in an upstream's queue for a pooled connection.",
    "uvgate_open_connections": "Open client connections, summed over the live workers.",
    "uvgate_upstream_connections": "Upstream connections by state (open: all, idle: kept for reuse).",
    "uvgate_upstream_ejected": "Workers that currently have the server ejected after failed connects.",
    "uvgate_auth_failures": "Requests refused by an auth step, by error code.",
    "uvgate_jwt_cache": "JWT verdict cache lookups by the auth steps (hit, miss).",
    "uvgate_introspection_cache": "Introspection verdict cache lookups by the auth steps (hit, miss).",
    "uvgate_ratelimit_rejections": (
        "Requests answered 429 by a rate limit, by route, limit and kind "
        "(local: the worker's token bucket; global: the count shared through Redis)."
    ),
    "uvgate_redis_sync_seconds": "Duration of the rate-limit sync round trips to Redis, answered or failed.",
    "uvgate_redis_errors": (
        "Rate-limit sync round trips that failed (refused, reset, slower than redis.timeout) "
        "and commands Redis refused within answered ones."
    ),
    "uvgate_redis_fail_open": (
        "Requests admitted on local limits only: a global limit was skipped because Redis was down "
        '(failure_mode "open").'
    ),
}


class ProcessFiles:
    """One process's multiprocess files (created on first write), with the encoded keys cached."""

    def __init__(self, directory: str, pid: int) -> None:
        self.directory = directory
        self.pid = pid
        self._files: dict[str, MmapedDict] = {}
        self._keys: dict[tuple[str, tuple[str, ...]], str] = {}

    def _file(self, prefix: str) -> MmapedDict:
        file = self._files.get(prefix)
        if file is None:
            path = os.path.join(self.directory, f"{prefix}_{self.pid}.db")
            # Made under another name, then renamed into place: a scrape reading the directory never
            # finds the file before its header is written (the reader fails on a file shorter than
            # 4 bytes: a /metrics 500 seen once during a reload). The mapping follows the inode.
            made = path + ".new"
            file = MmapedDict(made)  # type: ignore[no-untyped-call]
            os.rename(made, path)
            self._files[prefix] = file
        return file

    def write(
        self, prefix: str, metric: str, sample: str, labels: tuple[str, ...], values: tuple[str, ...], value: float
    ) -> None:
        """Set one sample of `metric` (its labels `labels` = `values`) in the file `<prefix>_<pid>.db`."""
        cache_key = (sample, values)
        key = self._keys.get(cache_key)
        if key is None:
            key = self._keys[cache_key] = mmap_key(metric, sample, list(labels), list(values), HELP[metric])
        self._file(prefix).write_value(key, float(value), 0.0)  # type: ignore[no-untyped-call]

    def histogram(self, metric: str, labels: tuple[str, ...], values: tuple[str, ...], histogram: Histogram) -> None:
        names = (*labels, "le")
        for le, count in zip(LE_VALUES, histogram.counts, strict=True):
            self.write("histogram", metric, metric + "_bucket", names, (*values, le), count)
        self.write("histogram", metric, metric + "_sum", labels, values, histogram.total)

    def close(self) -> None:
        for file in self._files.values():
            file.close()  # type: ignore[no-untyped-call]
        self._files.clear()


class WorkerMetrics:
    """A worker's fold of its counts into its multiprocess files (a tick subscriber)."""

    def __init__(
        self,
        config: MetricsConfig,
        counts: RequestCounts,
        state: WorkerState,
        clusters: Mapping[str, Cluster],
        caches: Mapping[str, TokenCache],
        pid: int,
        limits: LimitServices | None = None,
    ) -> None:
        self.interval = config.interval
        self.counts = counts
        self.state = state
        self.clusters = clusters
        self.caches = caches
        self.limits = limits
        self.files = ProcessFiles(config.directory, pid)
        self._next = 0.0

    def tick(self, now: float) -> None:
        if now >= self._next:
            self._next = now + self.interval
            self.fold()

    def fold(self) -> None:
        """Write every count as it is now. The requests counters go last: a reader that sees a request
        counted also sees the histograms and gauges written with it (a fold is not atomic for readers)."""
        self._gauges()
        files = self.files
        for route in list(self.counts.routes.values()):
            files.histogram("uvgate_request_duration_seconds", ("route",), (route.name,), route.duration)
        for name, histogram in list(self.counts.upstreams.items()):
            files.histogram("uvgate_upstream_request_duration_seconds", ("upstream",), (name,), histogram)
        files.histogram("uvgate_upstream_pool_wait_seconds", (), (), self.counts.pool_wait)
        for reason, count in list(self.counts.auth_failures.items()):
            files.write("counter", "uvgate_auth_failures", "uvgate_auth_failures_total", ("reason",), (reason,), count)
        for kind, cache in self.caches.items():
            metric = "uvgate_jwt_cache" if kind == "jwt" else "uvgate_introspection_cache"
            files.write("counter", metric, metric + "_total", ("result",), ("hit",), cache.hits)
            files.write("counter", metric, metric + "_total", ("result",), ("miss",), cache.misses)
        if self.limits is not None:
            self._limits(self.limits)
        for route in list(self.counts.routes.values()):
            for method, by_status in zip(METHODS, route.requests, strict=True):
                for code, count in list(by_status.items()):
                    request = (route.name, method, str(code))
                    files.write("counter", "uvgate_requests", "uvgate_requests_total", _REQUEST_LABELS, request, count)

    def _limits(self, limits: LimitServices) -> None:
        """The rate limits' rejections (per route, limit and the kinds it has) and the Redis sync's counts."""
        files = self.files
        metric, sample = "uvgate_ratelimit_rejections", "uvgate_ratelimit_rejections_total"
        for route, limit in limits.route_limits:
            if limit.bucket is not None:
                values = (route, limit.name, "local")
                files.write("counter", metric, sample, _LIMIT_LABELS, values, limit.rejected_local)
            if limit.ledger is not None:
                values = (route, limit.name, "global")
                files.write("counter", metric, sample, _LIMIT_LABELS, values, limit.rejected_global)
        sync = limits.sync
        if sync is None:
            return  # no global limit: no Redis
        files.histogram("uvgate_redis_sync_seconds", (), (), sync.latency)
        errors = sync.errors + sync.key_errors
        files.write("counter", "uvgate_redis_errors", "uvgate_redis_errors_total", (), (), errors)
        fail_open = sum(step.fail_open for step in limits.limit_steps)
        files.write("counter", "uvgate_redis_fail_open", "uvgate_redis_fail_open_total", (), (), fail_open)

    def _gauges(self) -> None:
        """The live state: upstream servers (with their connect failures) and open client connections."""
        files = self.files
        now = self.state.now
        for cluster in self.clusters.values():
            for server in cluster.servers:
                values = (cluster.name, str(server.address))
                files.write(
                    "counter",
                    "uvgate_upstream_connect_errors",
                    "uvgate_upstream_connect_errors_total",
                    _SERVER_LABELS,
                    values,
                    server.connect_errors,
                )
                ejected = 1 if server.ejected_until > now else 0
                files.write(
                    "gauge_livesum",
                    "uvgate_upstream_ejected",
                    "uvgate_upstream_ejected",
                    _SERVER_LABELS,
                    values,
                    ejected,
                )
                for state, count in (("open", server.open), ("idle", len(server.idle))):
                    files.write(
                        "gauge_livesum",
                        "uvgate_upstream_connections",
                        "uvgate_upstream_connections",
                        _CONNECTION_LABELS,
                        (*values, state),
                        count,
                    )
        open_connections = len(self.state.connections)
        files.write("gauge_livesum", "uvgate_open_connections", "uvgate_open_connections", (), (), open_connections)

    def close(self) -> None:
        """Write the final counts and close the files (the worker is about to exit)."""
        self.fold()
        self.files.close()


_REQUEST_LABELS = ("route", "method", "code")
_SERVER_LABELS = ("upstream", "server")
_CONNECTION_LABELS = ("upstream", "server", "state")
_LIMIT_LABELS = ("route", "limit", "kind")


# ---------------------------------------------------------------------------------------------- supervisor


class SupervisorCollector(Collector):
    """The supervisor's own metrics."""

    def __init__(self, restarts: Callable[[], int], compiled: bool) -> None:
        self.restarts = restarts
        self.build = "mypyc" if compiled else "python"

    def collect(self) -> Iterable[Metric]:
        restarts = CounterMetricFamily(
            "uvgate_worker_restarts", "Workers replaced after a crash or a missed heartbeat.", value=self.restarts()
        )
        info = GaugeMetricFamily(
            "uvgate_build_info", "The running uvgate: version, build (mypyc or python) and Python version.",
            labels=["version", "build", "python"],
        )  # fmt: skip
        info.add_metric([__version__, self.build, platform.python_version()], 1.0)
        return [restarts, info]


Sample = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted label pairs)


class MetricsDirectory:
    """The supervisor's multiprocess directory: made, cleaned, merged on worker death, read for scrapes."""

    def __init__(self, configured: str, collector: Collector) -> None:
        self.owned = not configured  # made here: removed whole at exit
        if configured:
            os.makedirs(configured, mode=0o750, exist_ok=True)
            self.path = configured
            self._remove_files()
        else:
            self.path = tempfile.mkdtemp(prefix="uvgate-metrics-")
        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, path=self.path)  # type: ignore[no-untyped-call]
        self.registry.register(collector)
        self._archives: dict[str, MmapedDict] = {}
        self._parsed: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {}

    def _remove_files(self) -> None:
        for pattern in ("*.db", "*.db.new"):  # (.new: a worker killed while it made a file)
            for name in glob.glob(os.path.join(self.path, pattern)):
                os.remove(name)

    def exposition(self) -> bytes:
        """The /metrics body (Prometheus text format) for the whole proxy."""
        return generate_latest(self.registry)

    def process_dead(self, pid: int) -> None:
        """A worker is gone: drop its live gauges, add its counters and histograms into the archive."""
        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]
        for prefix in ("counter", "histogram"):
            name = os.path.join(self.path, f"{prefix}_{pid}.db")
            if not os.path.exists(name):
                continue
            archive = self._archives.get(prefix)
            if archive is None:
                path = os.path.join(self.path, f"{prefix}_archive.db")
                archive = self._archives[prefix] = MmapedDict(path)  # type: ignore[no-untyped-call]
            for key, value, _, _ in MmapedDict.read_all_values_from_file(name):  # type: ignore[no-untyped-call]
                current, _ = archive.read_value(key)  # type: ignore[no-untyped-call]
                archive.write_value(key, current + value, 0.0)  # type: ignore[no-untyped-call]
            os.remove(name)

    def totals(self) -> dict[Sample, float]:
        """Every sample of the multiprocess files summed over processes (counters, histogram buckets not
        cumulative, live gauges): what the status page computes from."""
        out: dict[Sample, float] = {}
        for name in glob.glob(os.path.join(self.path, "*.db")):
            try:
                values: list[tuple[str, float, float, int]] = MmapedDict.read_all_values_from_file(name)  # type: ignore[no-untyped-call]
            except FileNotFoundError:
                continue  # a live gauge file removed meanwhile
            for key, value, _, _ in values:
                sample = self._parse(key)
                out[sample] = out.get(sample, 0.0) + value
        return out

    def _parse(self, key: str) -> Sample:
        parsed = self._parsed.get(key)
        if parsed is None:
            _, sample, labels, _ = json.loads(key)
            parsed = self._parsed[key] = (sample, tuple(sorted(_labels(labels).items())))
        return parsed

    def close(self) -> None:
        for archive in self._archives.values():
            archive.close()  # type: ignore[no-untyped-call]
        self._archives.clear()
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self._remove_files()


def _labels(raw: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
