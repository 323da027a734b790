"""[redis], [limits.NAME] and route `limits`: what the config check accepts and how it names each problem."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy.config import FAIL_CLOSED, SLIDING_WINDOW, build
from proxy.errors import ConfigError

BASE: dict[str, Any] = {
    "upstreams": {"backend": {"servers": ["127.0.0.1:8000"]}},
    "routes": [{"prefix": "/api/", "upstream": "backend", "limits": ["per_key"]}],
    "redis": {"url": "redis://127.0.0.1:6379/0"},
    "limits": {"per_key": {"local_rate": 500, "local_burst": 100, "global_limit": 2000, "window": "1s"}},
}


def config(redis: dict[str, Any] | None = None, **limit: Any) -> dict[str, Any]:
    """BASE with `limits.per_key` keys changed (None removes one) and `redis` keys changed."""
    data = copy.deepcopy(BASE)
    for key, value in limit.items():
        if value is None:
            data["limits"]["per_key"].pop(key, None)
        else:
            data["limits"]["per_key"][key] = value
    data["redis"].update(redis or {})
    return data


def problems(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        build(data)
    return {key: reason for key, _, reason in info.value.problems}


def test_the_issue_example_is_read_with_its_defaults() -> None:
    built = build(config(redis={"failure_mode": "closed", "sync_interval": "10ms", "timeout": "50ms"}))
    limit = built.limits["per_key"]
    assert (limit.local_rate, limit.local_burst, limit.global_limit, limit.window) == (500.0, 100, 2000, 1.0)
    assert (limit.algorithm, limit.max_subjects) == ("fixed_window", 100_000)
    assert built.routes[0].limits == ("per_key",) and built.routes[0].name == "/api/"
    redis = built.redis
    assert (redis.url, redis.cluster, redis.failure_mode) == ("redis://127.0.0.1:6379/0", False, FAIL_CLOSED)
    assert (redis.sync_interval, redis.timeout, redis.key_prefix) == (0.01, 0.05, "uvgate:rl:")


def test_a_local_only_limit_needs_no_redis_and_its_burst_defaults_to_the_rate() -> None:
    data = config(global_limit=None, local_burst=None, local_rate=2.5)
    del data["redis"]
    limit = build(data).limits["per_key"]
    assert (limit.local_rate, limit.local_burst, limit.global_limit) == (2.5, 3, 0)


def test_sliding_windows_and_cluster_urls() -> None:
    built = build(config(algorithm="sliding_window", redis={"cluster": True}))
    assert built.limits["per_key"].algorithm == SLIDING_WINDOW and built.redis.cluster
    sentinel = build(config(redis={"url": "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0"}))
    assert sentinel.redis.url.startswith("redis+sentinel://")


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        ({"local_rate": 0}, "limits.per_key.local_rate", "positive"),
        ({"local_rate": "fast"}, "limits.per_key.local_rate", "tokens per second"),
        ({"local_burst": 0}, "limits.per_key.local_burst", "at least 1"),
        ({"global_limit": -1}, "limits.per_key.global_limit", "at least 1"),
        ({"window": "soon"}, "limits.per_key.window", "expected seconds"),
        ({"window": "15ms"}, "limits.per_key.window", "twice redis.sync_interval"),
        ({"algorithm": "leaky"}, "limits.per_key.algorithm", '"fixed_window" or "sliding_window"'),
        ({"burst": 3}, "limits.per_key.burst", "unknown key"),
        ({"local_rate": None}, "limits.per_key.local_burst", "needs local_rate"),
    ],
)
def test_limit_problems_name_the_key(change: dict[str, Any], key: str, reason: str) -> None:
    assert reason in problems(config(**change))[key]


def test_a_limit_without_any_bound_a_global_limit_without_redis_and_unknown_route_limits() -> None:
    assert (
        "needs local_rate or global_limit"
        in problems(config(local_rate=None, local_burst=None, global_limit=None))["limits.per_key"]
    )
    data = config()
    del data["redis"]
    assert "[redis]" in problems(data)["limits.per_key.global_limit"]
    data = config()
    data["routes"][0]["limits"] = ["per_key", "nope"]
    assert "no such [limits.nope]" in problems(data)["routes[0].limits"]
    data["routes"][0]["limits"] = "per_key"
    assert "list of limit names" in problems(data)["routes[0].limits"]


@pytest.mark.parametrize(
    ("change", "key", "reason"),
    [
        ({"url": "http://cache:6379"}, "redis.url", "expected a redis://"),
        ({"url": "redis+sentinel://h:26379"}, "redis.url", "/service"),
        ({"url": "redis+sentinel://h:26379/m", "cluster": True}, "redis.cluster", "Sentinel"),
        ({"failure_mode": "maybe"}, "redis.failure_mode", '"open" or "closed"'),
        ({"sync_interval": 0}, "redis.sync_interval", "greater than zero"),
        ({"sync_interval": "20s"}, "redis.sync_interval", "1ms to 10s"),
        ({"timeout": "0s"}, "redis.timeout", "greater than zero"),
        ({"key_prefix": "a b"}, "redis.key_prefix", "letters"),
        ({"pool": 3}, "redis.pool", "unknown key"),
    ],
)
def test_redis_problems_name_the_key(change: dict[str, Any], key: str, reason: str) -> None:
    assert reason in problems(config(redis=change))[key]
