"""The rate limits in /metrics and on the status page, through a real forked proxy (2 workers) and a real Redis:
429s counted by route, limit and kind exactly as the client received them, the Redis sync's round trips, its
errors once Redis is killed, and the requests admitted on local limits only while it is down; the step's own
counts checked in-process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from devstack import ProxyFactory, ProxyService, RedisServer, Service, http_get, raw_request
from tests.integration.inprocess import Worker, request, run
from tests.integration.redisproc import RedisProcess
from tests.integration.test_metrics_counters import Samples, scrape
from tests.integration.test_ratelimit_live import fresh_window
from tests.supervisor.helpers import wait_for_log, wait_until
from tests.supervisor.test_status_page import render

Rejections = dict[tuple[str, str, str], int]  # (route, limit, kind) -> count

WORKERS = 2


def limited(redis_url: str) -> dict[str, Any]:
    """Route "api": a local bucket of 3 per worker that hardly refills; route "echo": 5 per hour across workers.
    A round trip budget of 1 s: on a loaded machine Redis never looks down unless it is."""
    return {
        "server": {"access_log": False},
        "metrics": {"interval": "100ms"},
        "upstreams": {"backend": {"servers": ["127.0.0.1:1"], "response_timeout": "5s"}},
        "redis": {"url": redis_url, "timeout": "1s", "key_prefix": f"t{uuid.uuid4().hex[:12]}:"},
        "limits": {
            "burst": {"local_rate": 0.001, "local_burst": 3},
            "shared": {"global_limit": 5, "window": "1h"},
        },
        "routes": [
            {"prefix": "/api/", "upstream": "backend", "limits": ["burst"], "name": "api"},
            {"prefix": "/echo", "upstream": "backend", "limits": ["shared"], "name": "echo"},
        ],
    }


def send(proxy: ProxyService, target: str, count: int, rejected: Counter[tuple[str, str, str]], route: str) -> int:
    """`count` requests, each on a new connection (the kernel spreads them over the workers); the 429s are
    added to `rejected` by (route, the limit and the scope their body names). Returns the 200s."""
    admitted = 0
    for _ in range(count):
        response = raw_request(proxy.host, proxy.port, "GET", target, timeout=10.0)
        if response.status == 429:
            body = orjson.loads(response.body)
            assert body["error"] == "rate_limited", body
            rejected[(route, body["limit"], body["scope"])] += 1
        else:
            assert response.status == 200, (response.status, response.body)
            admitted += 1
    return admitted


def rejections(samples: Samples) -> Rejections:
    out: Rejections = {}
    for (name, labels), value in samples.items():
        if name == "uvgate_ratelimit_rejections_total":
            label = dict(labels)
            out[(label["route"], label["limit"], label["kind"])] = int(value)
    return out


def counted_429(samples: Samples, route: str) -> int:
    return int(
        sum(
            value
            for (name, labels), value in samples.items()
            if name == "uvgate_requests_total" and ("route", route) in labels and ("code", "429") in labels
        )
    )


def stats(proxy: ProxyService) -> dict[str, Any]:
    status, body = http_get(proxy.admin_url + "/stats.json", timeout=5.0)
    assert status == 200, body
    data: dict[str, Any] = orjson.loads(body)
    return data


def test_429s_are_counted_by_route_limit_and_kind_in_metrics_and_on_the_status_page(
    proxy_factory: ProxyFactory, backend_stub: Service, redis_server: RedisServer, tmp_path: Path
) -> None:
    fresh_window()
    proxy = proxy_factory(limited(redis_server.url), workers=WORKERS)
    rejected: Counter[tuple[str, str, str]] = Counter()
    api_admitted = send(proxy, "/api/resource", 20, rejected, "api")
    echo_admitted = send(proxy, "/echo", 20, rejected, "echo")
    assert api_admitted <= 3 * WORKERS and echo_admitted <= 5 + WORKERS - 1, (api_admitted, echo_admitted)
    expected: Rejections = {
        ("api", "burst", "local"): 20 - api_admitted,
        ("echo", "shared", "global"): 20 - echo_admitted,
    }
    assert dict(rejected) == expected, "each route's limit refuses with its own scope"

    def all_counted() -> Samples | None:
        samples = scrape(proxy)
        counted = rejections(samples)
        assert set(counted) <= set(expected), f"series of limits and kinds that do not exist: {counted}"
        assert all(counted[key] <= expected[key] for key in counted), f"more than received: {counted} {expected}"
        return samples if counted == expected else None

    samples = wait_until(all_counted, 10.0, f"{expected} in /metrics", proxy)
    assert counted_429(samples, "api") == expected[("api", "burst", "local")]
    assert counted_429(samples, "echo") == expected[("echo", "shared", "global")]
    assert samples[("uvgate_redis_sync_seconds_count", ())] >= 1, "the global limit learned its counts from Redis"
    assert samples[("uvgate_redis_sync_seconds_sum", ())] > 0

    def page_counted() -> dict[str, Any] | None:
        report = stats(proxy)
        rows = {(r["route"], r["limit"], r["kind"]): r for r in report["ratelimit_rejections"]}
        return report if {key: row["total"] for key, row in rows.items()} == expected else None

    report = wait_until(page_counted, 10.0, f"{expected} in /stats.json", proxy)
    for row in report["ratelimit_rejections"]:
        assert 0 <= row["window"] <= row["total"], row
    assert report["redis"]["round_trips"] >= 1 and report["redis"]["fail_open"] == 0, report["redis"]

    rows = render(proxy.admin_url + "/", tmp_path / "chromium")
    assert rows.loaded, "the page loaded /stats.json"
    local = rows.tables["ratelimits"]["api burst local"]
    assert local[:3] == ["api", "burst", "local"] and local[4] == str(expected[("api", "burst", "local")]), local
    shared = rows.tables["ratelimits"]["echo shared global"]
    assert shared[4] == str(expected[("echo", "shared", "global")]), shared
    assert int(rows.tables["redis"]["redis"][0]) >= 1, rows.tables["redis"]


def test_redis_killed_counts_errors_and_the_requests_admitted_on_local_limits_only(
    proxy_factory: ProxyFactory, backend_stub: Service, own_redis: RedisProcess
) -> None:
    data = limited(own_redis.url)
    data["limits"]["shared"]["global_limit"] = 1_000_000
    proxy = proxy_factory(data, workers=WORKERS)
    rejected: Counter[tuple[str, str, str]] = Counter()
    before = 10
    assert send(proxy, "/echo", before, rejected, "echo") == before

    def requests_folded() -> Samples | None:
        samples = scrape(proxy)
        served = sum(
            value
            for (name, labels), value in samples.items()
            if name == "uvgate_requests_total" and ("route", "echo") in labels
        )
        return samples if served == before else None

    # The requests counters are written last in a fold: once they are all there, so are the Redis counts.
    samples = wait_until(requests_folded, 10.0, f"{before} requests in /metrics", proxy)
    assert samples[("uvgate_redis_errors_total", ())] == 0
    assert samples[("uvgate_redis_fail_open_total", ())] == 0, "Redis answered: no request skipped the global limit"
    assert samples[("uvgate_redis_sync_seconds_count", ())] >= 1

    failures_before = proxy.read_log().count("sync failed")
    own_redis.kill()
    # Idle workers notice within a PING probe (1 s) and each logs the failure once.
    wait_for_log(proxy, "sync failed", timeout=15.0, count=failures_before + WORKERS)

    def errors_counted() -> float | None:
        errors = scrape(proxy)[("uvgate_redis_errors_total", ())]
        return errors if errors >= WORKERS else None  # each worker failed at least once

    errors = wait_until(errors_counted, 10.0, "the failed round trips of both workers in /metrics", proxy)

    during = 12
    assert send(proxy, "/echo", during, rejected, "echo") == during, "failure_mode open: served on local limits"
    assert not rejected

    def fail_open_counted() -> Samples | None:
        samples = scrape(proxy)
        fail_open = samples[("uvgate_redis_fail_open_total", ())]
        assert fail_open <= during, f"{fail_open} counted for {during} requests"
        return samples if fail_open == during else None

    wait_until(fail_open_counted, 10.0, f"{during} requests admitted on local limits only", proxy)
    # The sync keeps trying (with backoff, at most a second apart): the errors keep growing.
    more = "more errors while Redis is down"
    wait_until(lambda: scrape(proxy)[("uvgate_redis_errors_total", ())] > errors, 10.0, more, proxy)

    def page_counted() -> dict[str, Any] | None:
        report = stats(proxy)
        return report if report["redis"] is not None and report["redis"]["fail_open"] == during else None

    report = wait_until(page_counted, 10.0, "the Redis figures in /stats.json", proxy)
    assert report["redis"]["errors"] > errors, report["redis"]
    assert report["ratelimit_rejections"] == [
        {"route": "api", "limit": "burst", "kind": "local", "total": 0, "window": 0},
        {"route": "echo", "limit": "shared", "kind": "global", "total": 0, "window": 0},
    ], "no 429: every limit of every route listed with the kinds it has, at zero"


def test_the_step_counts_each_429_by_its_limit_and_kind_and_fail_open_only_for_requests_it_admits(
    backend_stub: Service, own_redis: RedisProcess
) -> None:
    """In-process: a route checking a global limit, then a local bucket of 4. A 429 counts for the limit and kind
    that refused it; with Redis gone, a request admitted on the bucket alone counts as fail-open, one the bucket
    then refuses does not."""
    data = limited(own_redis.url)
    data["limits"]["burst"]["local_burst"] = 4
    data["limits"]["shared"]["global_limit"] = 1_000_000
    data["routes"] = [{"prefix": "/echo", "upstream": "backend", "limits": ["shared", "burst"], "name": "echo"}]
    data["upstreams"] = {"backend": {"response_timeout": "5s"}}  # the Worker points it at backend_stub

    async def main() -> None:
        async with Worker(data, backend_stub.address) as worker:
            limits = worker.limits
            assert limits is not None
            (step,) = limits.limit_steps
            counts = {limit.name: limit for _, limit in limits.route_limits}

            async def statuses(count: int) -> list[int]:
                client = await worker.client()
                out: list[int] = []
                for _ in range(count):
                    client.send(request("/echo"))
                    out.append((await client.response()).status)
                return out

            assert await statuses(3) == [200, 200, 200]
            own_redis.kill()
            deadline = time.monotonic() + 10.0
            while limits.health.up:  # the sync's next PING (within a second) fails
                assert time.monotonic() < deadline, "the sync did not notice Redis gone"
                await asyncio.sleep(0.02)
            assert await statuses(2) == [200, 429]
            assert step.fail_open == 1, "the request the bucket admitted alone; not the one it refused"
            assert (counts["burst"].rejected_local, counts["burst"].rejected_global) == (1, 0)
            assert (counts["shared"].rejected_local, counts["shared"].rejected_global) == (0, 0)
            assert limits.sync is not None and limits.sync.errors >= 1
            assert sum(limits.sync.latency.counts) >= 2, "round trips answered, then the one that failed"

    run(main)
