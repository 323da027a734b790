"""The status page's data (`/stats.json`) and the page itself (`/`), served by the supervisor.

Theory of operation: the supervisor samples the metric totals of every process (`MetricsDirectory.totals`:
counters and histogram buckets summed over live and archived workers, live gauges) every
`SAMPLE_EVERY` seconds and keeps the samples of the last `WINDOW`. A report compares the totals read
now with the oldest sample still in the window: requests per second per route, p50 and p99 per route
(interpolated inside the histogram buckets, as Prometheus' `histogram_quantile` does) and status
classes over that span, next to the all-time totals, the upstream servers' live state, auth failures,
rate-limit rejections by route, limit and kind (all time and over the span), the Redis sync's
round trips, errors and fail-open admissions (when some limit is global), and the workers the
supervisor knows. Everything is computed from what `/metrics` exports: the page shows
nothing Prometheus could not. prometheus-client (through `proxy.metricsio`) is imported only by a
report, i.e. when metrics are on: with them off, the supervisor, and the workers it forks, never load it.
"""

from __future__ import annotations

import math
from collections import deque
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, TypeAlias

from proxy.metrics import BUCKETS

if TYPE_CHECKING:
    from proxy.metricsio import Sample

WINDOW = 60.0
SAMPLE_EVERY = 5.0
MIN_SPAN = 1.0  # a rate is never computed over less (right after start)

Totals: TypeAlias = "dict[Sample, float]"


class StatsHistory:
    """Metric totals sampled every `SAMPLE_EVERY` seconds over the last `WINDOW`."""

    def __init__(self, window: float = WINDOW, every: float = SAMPLE_EVERY) -> None:
        self.window = window
        self.every = every
        self.samples: deque[tuple[float, Totals]] = deque()

    def due(self, now: float) -> bool:
        return not self.samples or now - self.samples[-1][0] >= self.every

    def add(self, now: float, totals: Totals) -> None:
        self.samples.append((now, totals))
        # Keep one sample at least `window` old: the base of the full window.
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def base(self, now: float) -> tuple[float, Totals]:
        """The oldest sample within the window (the first one ever while younger than the window)."""
        for at, totals in self.samples:
            if now - at <= self.window:
                return at, totals
        return (now, {}) if not self.samples else self.samples[-1]

    def report(
        self,
        now: float,
        totals: Totals,
        *,
        workers: list[dict[str, object]],
        generation: int,
        uptime: float,
        draining: bool,
        restarts: int,
    ) -> dict[str, object]:
        """The /stats.json document."""
        at, base = self.base(now)
        span = max(MIN_SPAN, now - at)
        return {
            "uptime": round(uptime, 1),
            "generation": generation,
            "draining": draining,
            "worker_restarts": restarts,
            "window": round(span, 1),
            "workers": workers,
            "open_connections": int(_value(totals, "uvgate_open_connections")),
            "routes": _routes(totals, base, span),
            "status_classes": _classes(totals, base),
            "upstreams": _upstreams(totals),
            "auth_failures": _by_label(totals, "uvgate_auth_failures_total", "reason"),
            "jwt_cache": _by_label(totals, "uvgate_jwt_cache_total", "result"),
            "ratelimit_rejections": _rejections(totals, base),
            "redis": _redis(totals),
        }


def _value(totals: Totals, sample: str, **labels: str) -> float:
    return totals.get((sample, tuple(sorted(labels.items()))), 0.0)


def _label(pairs: tuple[tuple[str, str], ...], name: str) -> str:
    for key, value in pairs:
        if key == name:
            return value
    return ""


def _by_label(totals: Totals, sample: str, label: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for (name, pairs), value in totals.items():
        if name == sample:
            key = _label(pairs, label)
            out[key] = out.get(key, 0) + int(value)
    return dict(sorted(out.items()))


def _rejections(totals: Totals, base: Totals) -> list[dict[str, object]]:
    """429s of the rate limits per (route, limit, kind): all time, and within the window."""
    rows: list[dict[str, object]] = []
    for key, value in totals.items():
        name, pairs = key
        if name != "uvgate_ratelimit_rejections_total":
            continue
        rows.append(
            {
                "route": _label(pairs, "route"),
                "limit": _label(pairs, "limit"),
                "kind": _label(pairs, "kind"),
                "total": int(value),
                "window": int(value - base.get(key, 0.0)),
            }
        )
    return sorted(rows, key=lambda row: (str(row["route"]), str(row["limit"]), str(row["kind"])))


def _redis(totals: Totals) -> dict[str, int] | None:
    """The Redis sync of global limits, summed over workers (None: no worker syncs)."""
    if ("uvgate_redis_errors_total", ()) not in totals:
        return None
    from proxy.metricsio import LE_VALUES

    round_trips = sum(_value(totals, "uvgate_redis_sync_seconds_bucket", le=le) for le in LE_VALUES)
    return {
        "round_trips": int(round_trips),
        "errors": int(_value(totals, "uvgate_redis_errors_total")),
        "fail_open": int(_value(totals, "uvgate_redis_fail_open_total")),
    }


def _routes(totals: Totals, base: Totals, span: float) -> list[dict[str, object]]:
    requests: dict[str, float] = {}
    recent: dict[str, float] = {}
    codes: dict[str, dict[str, int]] = {}
    for key, value in totals.items():
        name, pairs = key
        if name != "uvgate_requests_total":
            continue
        route = _label(pairs, "route")
        requests[route] = requests.get(route, 0.0) + value
        recent[route] = recent.get(route, 0.0) + value - base.get(key, 0.0)
        by_class = codes.setdefault(route, {})
        status_class = _status_class(_label(pairs, "code"))
        by_class[status_class] = by_class.get(status_class, 0) + int(value)
    out: list[dict[str, object]] = []
    for route in sorted(requests):
        now_buckets = _buckets(totals, route)
        then_buckets = _buckets(base, route)
        window = [a - b for a, b in zip(now_buckets, then_buckets, strict=True)]
        out.append(
            {
                "route": route,
                "requests": int(requests[route]),
                "rps": round(recent[route] / span, 2),
                "p50_ms": _ms(quantile(0.5, window)),
                "p99_ms": _ms(quantile(0.99, window)),
                "status_classes": dict(sorted(codes[route].items())),
            }
        )
    return out


def _classes(totals: Totals, base: Totals) -> dict[str, dict[str, int]]:
    """Status classes: all time, and within the window."""
    total: dict[str, int] = {}
    recent: dict[str, int] = {}
    for key, value in totals.items():
        name, pairs = key
        if name != "uvgate_requests_total":
            continue
        status_class = _status_class(_label(pairs, "code"))
        total[status_class] = total.get(status_class, 0) + int(value)
        recent[status_class] = recent.get(status_class, 0) + int(value - base.get(key, 0.0))
    return {"total": dict(sorted(total.items())), "window": dict(sorted(recent.items()))}


def _status_class(code: str) -> str:
    return f"{code[0]}xx" if len(code) == 3 and code.isdigit() else "other"


def _buckets(totals: Totals, route: str) -> list[float]:
    from proxy.metricsio import LE_VALUES

    return [_value(totals, "uvgate_request_duration_seconds_bucket", route=route, le=le) for le in LE_VALUES]


def quantile(q: float, counts: list[float]) -> float:
    """The `q` quantile of observations counted per bucket (not cumulative; the last is +Inf), linear
    within a bucket; NaN without observations. Beyond the last finite bound: that bound."""
    total = sum(counts)
    if total <= 0:
        return math.nan
    rank = q * total
    seen = 0.0
    for index, count in enumerate(counts):
        if count > 0 and seen + count >= rank:
            if index >= len(BUCKETS):
                return BUCKETS[-1]
            lower = BUCKETS[index - 1] if index > 0 else 0.0
            return lower + (BUCKETS[index] - lower) * (rank - seen) / count
        seen += count
    return BUCKETS[-1]


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


def _upstreams(totals: Totals) -> list[dict[str, object]]:
    servers: dict[tuple[str, str], dict[str, object]] = {}
    for (name, pairs), value in totals.items():
        if name not in (
            "uvgate_upstream_connections",
            "uvgate_upstream_ejected",
            "uvgate_upstream_connect_errors_total",
        ):
            continue
        key = (_label(pairs, "upstream"), _label(pairs, "server"))
        row = servers.setdefault(
            key, {"upstream": key[0], "server": key[1], "open": 0, "idle": 0, "ejected": 0, "connect_errors": 0}
        )
        if name == "uvgate_upstream_connections":
            row[_label(pairs, "state")] = int(value)
        elif name == "uvgate_upstream_ejected":
            row["ejected"] = int(value)
        else:
            row["connect_errors"] = int(value)
    return [servers[key] for key in sorted(servers)]


@cache
def status_page() -> bytes:
    """The static status page (one file: HTML, CSS and JS; nothing fetched but /stats.json)."""
    return resources.files("proxy").joinpath("static/status.html").read_bytes()
