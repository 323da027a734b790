"""The rate-limit scenarios: `limited` (limits that never refuse) and `rejecting` (a limit that mostly does).

`limited`: the proxy gets the template's routes, the JWT route of bench/jwt.py (Host `jwt.bench`) and
`[redis]` (devstack points it at the Redis the bench started) plus one more route, chosen by
`Host: limits.bench`, with the same prefix, upstream and JWT auth as the JWT route and a limit with a
local bucket and a global limit far above the offered load: nothing is ever refused, so what is measured
is the check, the headers and the sync, not answering 429s. The same tokens go to the `/api/` route
without auth (`proxy`), to the JWT route (`jwt`) and to the limited one (`limits`): `limits - jwt`, paired
by round, is what the limits cost per request (issue 9's bar: at most 4 µs). Redis's
`total_commands_processed` (INFO stats) is read around each `limits` run: commands per 1,000 requests
(bar: at most 20).

`rejecting`: the template's `/api/` route itself gets a local bucket (per worker, no Redis) whose rate is
a share (10 %) of the load the same proxy forwarded without it in a short calibration run, so most
answers are 429s: the cost of saying no fast. wrk counts them with bench/wrk/rejecting.lua.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.jwt import with_jwt_route
from devstack import RawHTTPConnection
from devstack.net import StackError

__all__ = [
    "COMMANDS_BAR",
    "LIMITS",
    "LIMITS_HOST",
    "LIMIT_COST_BAR_US",
    "REJECT_SHARE",
    "RejectLimit",
    "check_limit_route",
    "commands_per_1000",
    "limited_lines",
    "redis_commands",
    "reject_limit",
    "rejecting_line",
    "with_limit_route",
    "with_limited_routes",
    "with_reject_limit",
]

LIMITS = "limits"
"""In the limited scenario: uvgate's JWT route with limits (same proxy and request as `jwt` but for Host)."""
LIMITS_HOST = "limits.bench"
REJECT_SHARE = 0.1
"""`rejecting`: the limit as a share of the load the proxy forwarded without it."""
LIMIT_COST_BAR_US = 4.0
"""Issue 9: local + global limits cost at most this much proxy CPU per request over the same route."""
COMMANDS_BAR = 20.0
"""Issue 9: at most this many Redis commands per 1,000 proxied requests at full load."""

BENCH_LIMIT: dict[str, Any] = {
    "local_rate": 10_000_000,  # per worker: never empty under wrk
    "local_burst": 10_000_000,
    "global_limit": 1_000_000_000,  # per 1 s window: never reached
    "window": "1s",
}


def with_limit_route(template: dict[str, Any], prefix: str = "/api/", auth: str | None = None) -> dict[str, Any]:
    """A copy of `template` with `[redis]`, `[limits.bench]` and a limited route (Host `limits.bench`, with
    `auth` if given) beside its `prefix` route."""
    data = copy.deepcopy(template)
    data["redis"] = {"url": "redis://127.0.0.1:1/0", "sync_interval": "10ms", "timeout": "50ms"}
    data["limits"] = {"bench": dict(BENCH_LIMIT)}
    routes = data.get("routes", [])
    plain = next((route for route in routes if route.get("prefix") == prefix and "host" not in route), None)
    if plain is None:
        raise StackError(f"the bench config has no {prefix} route to put a limited route beside")
    route: dict[str, Any] = {"prefix": prefix, "upstream": plain["upstream"], "host": LIMITS_HOST, "limits": ["bench"]}
    if auth is not None:
        route["auth"] = auth
    routes.append(route)
    return data


def with_limited_routes(template: dict[str, Any]) -> dict[str, Any]:
    """The limited scenario's config: the JWT route and the same route with limits (`limits.bench`)."""
    return with_limit_route(with_jwt_route(template), auth="jwt")


@dataclass(frozen=True, slots=True)
class RejectLimit:
    """The rejecting scenario's local bucket, from the load the proxy forwarded without it."""

    offered_rps: float
    """Requests per second the proxy forwarded without the limit (calibration run)."""
    rate: int
    """Tokens per second per worker (local_rate)."""
    burst: int
    """local_burst: 10 ms of the rate, at least 1."""
    workers: int

    @property
    def total_rate(self) -> int:
        """The limit over every worker, requests per second."""
        return self.rate * self.workers


def reject_limit(offered_rps: float, workers: int, share: float = REJECT_SHARE) -> RejectLimit:
    """The local bucket admitting `share` of `offered_rps` over `workers` workers; ValueError without load."""
    if offered_rps <= 0 or workers < 1 or not 0 < share < 1:
        raise ValueError(f"no limit from {offered_rps} req/s over {workers} workers at share {share}")
    rate = max(1, round(offered_rps * share / workers))
    return RejectLimit(offered_rps, rate, max(1, rate // 100), workers)


def with_reject_limit(template: dict[str, Any], limit: RejectLimit, prefix: str = "/api/") -> dict[str, Any]:
    """A copy of `template` whose `prefix` route has the local bucket `limit` (no global limit, no Redis)."""
    data = copy.deepcopy(template)
    data.setdefault("limits", {})["reject"] = {"local_rate": limit.rate, "local_burst": limit.burst}
    routes = [route for route in data.get("routes", []) if route.get("prefix") == prefix and "host" not in route]
    if not routes:
        raise StackError(f"the bench config has no {prefix} route to limit")
    routes[0]["limits"] = [*routes[0].get("limits", []), "reject"]
    return data


def check_limit_route(host: str, port: int, path: str, token: str) -> None:
    """The limited route answers 200 with the rate-limit headers to `token`; StackError otherwise."""
    with RawHTTPConnection(host, port, timeout=5.0) as conn:
        conn.request("GET", path, host=LIMITS_HOST, headers=[("Authorization", f"Bearer {token}")])
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


def commands_per_1000(before: int, after: int, requests: int) -> float | None:
    """Redis commands per 1,000 requests between two `redis_commands` readings (the second INFO is not the
    proxy's); None without requests."""
    return 1000 * (after - before - 1) / requests if requests > 0 else None


def limited_lines(cost_us: float | None, commands: Sequence[float]) -> list[str]:
    """The limited scenario's footer: the paired limit cost and the Redis commands, each against its bar."""
    lines = []
    if cost_us is not None:
        verdict = "within" if cost_us <= LIMIT_COST_BAR_US else "OVER"
        lines.append(
            f"limited: rate limits (limits - jwt) CPU µs/req, paired by round: median {cost_us:+.2f} "
            f"({verdict} the bar of {LIMIT_COST_BAR_US:g})"
        )
    if commands:
        middle = statistics.median(commands)
        verdict = "within" if middle <= COMMANDS_BAR else "OVER"
        runs = ", ".join(f"{value:.1f}" for value in commands)
        lines.append(
            f"limited: Redis commands per 1,000 requests: median {middle:.1f} (runs: {runs}; "
            f"{verdict} the bar of {COMMANDS_BAR:g})"
        )
    return lines


def rejecting_line(limit: RejectLimit, requests: int, rejected: int) -> str:
    """The rejecting scenario's footer: the limit, where it came from, and the share it admitted."""
    admitted = (requests - rejected) / requests if requests else 0.0
    return (
        f"rejecting: limit {limit.total_rate:,}/s ({limit.rate:,}/s per worker, burst {limit.burst:,}) = "
        f"{REJECT_SHARE:.0%} of the {limit.offered_rps:,.0f} req/s the proxy forwarded without it; "
        f"proxy runs admitted {admitted:.1%} of {requests:,} requests ({rejected:,} answered 429)"
    )
