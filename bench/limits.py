"""The `--request limits` shape: a rate-limited route in the proxy config, and Redis commands counted.

The proxy gets the template's routes plus `[redis]` (devstack points it at the Redis it started) and one
more route, chosen by `Host: limits.bench`, with the same prefix and upstream as the template's `/api/`
route and a limit with a local bucket and a global limit far above the offered load (so nothing is ever
refused: the cost measured is the check, the headers and the sync, not answering 429s). The `proxy`
scenario sends wrk's plain GET to the `/api/` route without limits, the `limits` scenario the same GET
with that Host: the difference of the two rows is what the limits cost per request. Redis's
`total_commands_processed` (INFO stats) is read around each `limits` run: commands per 1,000 requests.
"""

from __future__ import annotations

import copy
from typing import Any

from devstack import RawHTTPConnection
from devstack.net import StackError

LIMITS = "limits"
"""With `--request limits`: the proxy's rate-limited route (same proxy and request as `proxy` but for Host)."""
LIMITS_HOST = "limits.bench"

BENCH_LIMIT: dict[str, Any] = {
    "local_rate": 10_000_000,  # per worker: never empty under wrk
    "local_burst": 10_000_000,
    "global_limit": 1_000_000_000,  # per 1 s window: never reached
    "window": "1s",
}


def with_limit_route(template: dict[str, Any], prefix: str = "/api/") -> dict[str, Any]:
    """A copy of `template` with `[redis]`, `[limits.bench]` and a limited route (Host `limits.bench`) beside
    its `prefix` route."""
    data = copy.deepcopy(template)
    data["redis"] = {"url": "redis://127.0.0.1:1/0", "sync_interval": "10ms", "timeout": "50ms"}
    data["limits"] = {"bench": dict(BENCH_LIMIT)}
    routes = data.get("routes", [])
    plain = next((route for route in routes if route.get("prefix") == prefix), None)
    if plain is None:
        raise StackError(f"the bench config has no {prefix} route to put a limited route beside")
    routes.append({"prefix": prefix, "upstream": plain["upstream"], "host": LIMITS_HOST, "limits": ["bench"]})
    return data


def check_limit_route(host: str, port: int, path: str) -> None:
    """The limited route answers 200 with the rate-limit headers; StackError otherwise."""
    with RawHTTPConnection(host, port, timeout=5.0) as conn:
        conn.request("GET", path, host=LIMITS_HOST)
        response = conn.read_response()
    if response.status != 200 or response.header("RateLimit-Policy") is None:
        raise StackError(
            f"the limited route answered {response.status} (RateLimit-Policy: {response.header('RateLimit-Policy')}),"
            f" expected 200 with the rate-limit headers: {response.body[:200]!r}"
        )


def redis_commands(host: str, port: int) -> int:
    """Redis's total_commands_processed (INFO stats), the INFO itself included."""
    import redis

    client = redis.Redis(host=host, port=port, socket_timeout=5.0)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()
