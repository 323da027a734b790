"""Metrics pieces without processes: config, histogram buckets, the multiprocess files, the status report."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.auth.introspect import Introspector
from proxy.auth.jwks import JwksSource
from proxy.auth.jwt import JwtAuthority
from proxy.auth.step import FAILURE_REASONS, MISSING_TOKEN, AuthStep, Verdict
from proxy.config import build
from proxy.errors import ConfigError, ProxyError
from proxy.metrics import BUCKETS, Histogram, RequestCounts
from proxy.metricsio import MetricsDirectory, ProcessFiles, SupervisorCollector
from proxy.status import StatsHistory, Totals, quantile
from tests.fakes import FakeDownstream, make_exchange, worker_state

BASE = {"upstreams": {"b": {"servers": ["127.0.0.1:9"]}}, "routes": [{"prefix": "/", "upstream": "b"}]}


def _problems(metrics: object) -> list[tuple[str, object, str]]:
    with pytest.raises(ConfigError) as info:
        build({**BASE, "metrics": metrics})
    return info.value.problems


def test_metrics_config_defaults_and_errors_name_the_key(tmp_path: Path) -> None:
    config = build(BASE)
    assert config.metrics.enabled and config.metrics.directory == "" and config.metrics.interval == 1.0
    assert build({**BASE, "metrics": {"enabled": False}}).metrics.enabled is False
    assert [p[0] for p in _problems({"enable": True})] == ["metrics.enable"]
    assert [p[0] for p in _problems({"directory": "relative/dir"})] == ["metrics.directory"]
    assert [p[0] for p in _problems({"interval": "2m"})] == ["metrics.interval"]
    assert [p[0] for p in _problems({"interval": 0})] == ["metrics.interval"]
    assert [p[0] for p in _problems("on")] == ["metrics"]
    assert build({**BASE, "metrics": {"directory": str(tmp_path / "new")}}).metrics.directory.endswith("new")


def test_histogram_buckets_are_le_bounds() -> None:
    histogram = Histogram()
    for value in (BUCKETS[0], BUCKETS[0] * 1.01, 0.0, 1e9):
        histogram.observe(value)
    assert histogram.counts[0] == 2  # 0 and exactly the first bound (le: less than or equal)
    assert histogram.counts[1] == 1
    assert histogram.counts[-1] == 1  # +Inf
    assert histogram.total == pytest.approx(BUCKETS[0] * 2.01 + 1e9)


def test_quantile_interpolates_within_buckets() -> None:
    counts = [0.0] * (len(BUCKETS) + 1)
    assert math.isnan(quantile(0.5, counts))
    counts[4] = 100  # all in (0.5 ms, 1 ms]
    assert quantile(0.5, counts) == pytest.approx(0.00075)
    assert quantile(0.99, counts) == pytest.approx(0.0005 + 0.0005 * 0.99)
    counts[-1] = 100  # half beyond the last bound: reported as that bound
    assert quantile(0.99, counts) == BUCKETS[-1]


def _exposed(directory: MetricsDirectory) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(directory.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_dead_process_files_are_merged_once_and_live_gauges_dropped(tmp_path: Path) -> None:
    directory = MetricsDirectory(str(tmp_path), SupervisorCollector(lambda: 3, compiled=False))
    try:
        histogram = Histogram()
        histogram.observe(0.0002)
        for pid, count in ((101, 5), (102, 7)):
            files = ProcessFiles(directory.path, pid)
            values = ("r", "GET", "200")
            files.write(
                "counter", "uvgate_requests", "uvgate_requests_total", ("route", "method", "code"), values, count
            )
            files.histogram("uvgate_request_duration_seconds", ("route",), ("r",), histogram)
            files.write("gauge_livesum", "uvgate_open_connections", "uvgate_open_connections", (), (), 2)
            files.close()
        key = ("uvgate_requests_total", (("code", "200"), ("method", "GET"), ("route", "r")))
        before = _exposed(directory)
        assert before[key] == 12 and before[("uvgate_open_connections", ())] == 4
        assert before[("uvgate_worker_restarts_total", ())] == 3

        directory.process_dead(101)
        after = _exposed(directory)
        assert after[key] == 12, "a dead process's counts stay, once"
        assert after[("uvgate_request_duration_seconds_count", (("route", "r"),))] == 2
        assert after[("uvgate_open_connections", ())] == 2, "its live gauges are gone"
        assert sorted(os.listdir(tmp_path)) == [
            "counter_102.db",
            "counter_archive.db",
            "gauge_livesum_102.db",
            "histogram_102.db",
            "histogram_archive.db",
        ]
        directory.process_dead(102)
        assert _exposed(directory)[key] == 12
        totals = directory.totals()
        assert totals[key] == 12
    finally:
        directory.close()
    assert os.listdir(tmp_path) == [], "a configured directory is emptied at exit, not removed"


def test_owned_directory_is_removed() -> None:
    directory = MetricsDirectory("", SupervisorCollector(lambda: 0, compiled=True))
    path = directory.path
    assert os.path.isdir(path)
    directory.close()
    assert not os.path.exists(path)


def test_stats_window_compares_with_the_oldest_sample_in_the_last_minute() -> None:
    history = StatsHistory(window=60.0, every=5.0)
    key = ("uvgate_requests_total", (("code", "200"), ("method", "GET"), ("route", "r")))
    history.add(0.0, {})
    for t in range(5, 125, 5):
        assert history.due(float(t))
        history.add(float(t), {key: float(t * 10)})
    report = history.report(
        125.0,
        {key: 1250.0},
        workers=[],
        generation=1,
        uptime=125.0,
        draining=False,
        restarts=0,
    )
    (route,) = report["routes"]  # type: ignore[misc]
    assert route["requests"] == 1250 and route["rps"] == pytest.approx(10.0)
    assert report["window"] == 60.0
    assert report["status_classes"] == {"total": {"2xx": 1250}, "window": {"2xx": 600}}


def test_stats_report_rate_limit_rejections_by_route_limit_and_kind_and_the_redis_sync() -> None:
    history = StatsHistory(window=60.0, every=5.0)
    local = ("uvgate_ratelimit_rejections_total", (("kind", "local"), ("limit", "burst"), ("route", "api")))
    shared = ("uvgate_ratelimit_rejections_total", (("kind", "global"), ("limit", "shared"), ("route", "api")))
    history.add(0.0, {local: 2.0})

    def report_of(totals: Totals) -> dict[str, object]:
        return history.report(10.0, totals, workers=[], generation=1, uptime=10.0, draining=False, restarts=0)

    report = report_of({local: 7.0, shared: 3.0})
    assert report["ratelimit_rejections"] == [
        {"route": "api", "limit": "burst", "kind": "local", "total": 7, "window": 5},
        {"route": "api", "limit": "shared", "kind": "global", "total": 3, "window": 3},
    ]
    assert report["redis"] is None, "no worker syncs: no global limit"
    redis: Totals = {
        ("uvgate_redis_errors_total", ()): 2.0,
        ("uvgate_redis_fail_open_total", ()): 9.0,
        ("uvgate_redis_sync_seconds_bucket", (("le", "0.001"),)): 40.0,
        ("uvgate_redis_sync_seconds_bucket", (("le", "+Inf"),)): 2.0,
        ("uvgate_redis_sync_seconds_sum", ()): 0.5,
    }
    report = report_of(redis)
    assert report["redis"] == {"round_trips": 42, "errors": 2, "fail_open": 9}
    assert report["ratelimit_rejections"] == []


def _answers(owner: object) -> set[str]:
    """The error codes of the answers an auth object holds ready (errors, verdicts with one, dicts of them)."""
    codes: set[str] = set()
    for name in dir(owner):  # compiled classes (AuthStep) have neither __dict__ nor __slots__ to read
        value = getattr(owner, name)
        for item in value.values() if isinstance(value, dict) else (value,):
            error = item.error if isinstance(item, Verdict) else item
            if isinstance(error, ProxyError):
                codes.add(error.detail)
    return codes


def test_auth_failures_count_exactly_the_codes_the_auth_steps_answer_with() -> None:
    config = build(
        {
            **BASE,
            "auth": {
                "jwt": {"algorithms": ["RS256"], "jwks_url": "http://127.0.0.1:9/jwks"},
                "introspect": {"url": "http://127.0.0.1:9/introspect"},
            },
        }
    )
    assert config.auth.jwt is not None and config.auth.introspect is not None
    state = worker_state(config)
    jwks = JwksSource(config.auth.jwt, "api", state)
    authorities = (JwtAuthority(config.auth.jwt, "api", jwks), Introspector(config.auth.introspect, "api", state))
    answered = set().union(*(_answers(o) for o in (jwks, *authorities, AuthStep(authorities[0], ("read",), "api"))))
    assert answered == FAILURE_REASONS, "every code answered is a reason, every reason is answered"

    counts = RequestCounts()
    worker = worker_state()
    worker.finished.append(counts.exchange_finished)
    for code in [*sorted(FAILURE_REASONS), "no_route", "upstream_timeout", MISSING_TOKEN]:
        make_exchange(FakeDownstream(), worker).fail(ProxyError(code))
    assert counts.auth_failures == {code: 2 if code == MISSING_TOKEN else 1 for code in FAILURE_REASONS}
