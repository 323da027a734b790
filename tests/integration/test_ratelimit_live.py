"""Rate limits through real forked proxies and real Redis-protocol servers: the 429 and its headers across
workers, the accuracy bar at a small scale (2 instances x 2 workers), Redis killed under load with
failure_mode "open" (no 5xx) and "closed" (503 within the timeout), and Redis restarted (limiting resumes
without a proxy restart)."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from bench.accuracy import OVER, SLACK, UNDER, PacedLoad, run_live
from devstack import ProxyFactory, RawHTTPConnection, RedisServer, Service, Stack
from tests.integration.redisproc import RedisClusterProcesses, RedisProcess, SentinelProcess
from tests.supervisor.helpers import wait_for_log, wait_until

WINDOW = 3600.0


def limited(
    redis_url: str, limit: int, *, window: str = "1h", failure_mode: str = "open", timeout: str = "2s"
) -> dict[str, Any]:
    """A config limiting both routes per client address. `timeout`: the sync round trip's budget; generous
    by default, since a round trip slower than it on a loaded machine (fail open) admits beyond the limit."""
    return {
        "server": {"access_log": False},
        "upstreams": {"backend": {"servers": ["127.0.0.1:1"], "response_timeout": "5s"}},
        "redis": {
            "url": redis_url,
            "failure_mode": failure_mode,
            "timeout": timeout,
            "key_prefix": f"t{uuid.uuid4().hex[:12]}:",
        },
        "limits": {"per_key": {"global_limit": limit, "window": window}},
        "routes": [
            {"prefix": "/api/", "upstream": "backend", "limits": ["per_key"]},
            {"prefix": "/echo", "upstream": "backend", "limits": ["per_key"]},
        ],
    }


def within_bar(admitted: int, limit: int) -> bool:
    """The issue's accuracy bar (bench.accuracy's): limit <= admitted <= 1.01 x limit + 4 in a window.

    Sequential requests over 2 workers mostly get the limit or one more, but they come at r x I above 1
    here, and a share a worker computed before the other one's spending can admit a few more when round
    trips slow down (the README's bound: (W - 1) / (2W) x r x (I + RTT)): 22 and 23 of 20 were seen on a
    loaded machine."""
    return limit <= admitted <= OVER * limit + SLACK


def fresh_window() -> None:
    """Wait (bounded) until at least 30 s are left in the current 1 h window: counts cannot reset mid-test."""
    left = WINDOW - time.time() % WINDOW
    if left < 30.0:
        time.sleep(left + 0.05)


def get(port: int, target: str = "/api/resource") -> tuple[int, dict[str, str]]:
    """One request on a new connection (so the kernel spreads them over the workers)."""
    with RawHTTPConnection("127.0.0.1", port, timeout=5.0) as conn:
        conn.request("GET", target)
        response = conn.read_response()
    return response.status, {name.lower(): value for name, value in response.headers}


def test_a_global_limit_holds_across_workers_and_answers_429_with_headers(
    proxy_factory: ProxyFactory, backend_stub: Service, redis_server: RedisServer
) -> None:
    fresh_window()
    workers, limit = 2, 10
    proxy = proxy_factory(limited(redis_server.url, limit), workers=workers)
    answers = [get(proxy.port) for _ in range(16)]
    statuses = [status for status, _ in answers]
    admitted = statuses.count(200)
    # Sequential requests over 2 workers: each spends at most its share of what it last learned.
    assert within_bar(admitted, limit) and statuses.count(429) == 16 - admitted, statuses
    status, headers = next(answer for answer in reversed(answers) if answer[0] != 200)
    assert status == 429 and headers["retry-after"].isdigit() and int(headers["retry-after"]) >= 1
    assert headers["ratelimit-policy"] == '"per_key";q=10;w=3600'
    assert headers["ratelimit"].startswith('"per_key";r=0;t=') and headers["x-ratelimit-remaining"] == "0"
    assert headers["x-ratelimit-limit"] == "10"
    _, first = answers[0]
    assert first["x-ratelimit-remaining"] == "9" and first["ratelimit"].startswith('"per_key";r=9;t=')


def test_the_accuracy_bar_at_small_scale(tmp_path: Path) -> None:
    """2 instances x 2 workers, 3x the limit offered for one subject: each complete window admits within the bar."""
    limit = 150
    with Stack(run_dir=tmp_path) as stack:
        stack.start(redis=True, backend=True)
        result = run_live(stack, limit=limit, window=1.0, windows=6, instances=2, workers=2, load=3.0)
    assert not result.errors, result.errors[:5]
    assert len(result.counts) >= 4, result
    assert all(UNDER * limit <= n <= OVER * limit + SLACK for n in result.counts), result.counts
    assert set(result.statuses) == {200, 429}, result.statuses


def test_redis_killed_under_load_with_failure_mode_open_answers_no_5xx(
    proxy_factory: ProxyFactory, backend_stub: Service, own_redis: RedisProcess
) -> None:
    proxy = proxy_factory(limited(own_redis.url, 1_000_000, window="1s"), workers=2)
    load = PacedLoad([proxy.port], rate=300, duration=3.0, connections=6, target="/api/resource").start()
    try:
        time.sleep(1.0)  # the load runs on its schedule; Redis dies in its middle
        killed = time.time()
        own_redis.kill()
        outcomes = load.join()
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    after = [o for o in outcomes if o.wall > killed + 0.2]
    assert len(after) > 300, "the load went on after the kill"
    assert {o.status for o in outcomes} == {200}, sorted({o.status for o in outcomes})
    wait_until(lambda: "sync failed" in proxy.read_log(), 5.0, "the failure logged", proxy)
    assert proxy.read_log().count("sync failed") <= 2, "logged once per worker, not per failure"


def test_redis_killed_with_failure_mode_closed_answers_503_within_the_timeout_then_recovers_on_restart(
    proxy_factory: ProxyFactory, backend_stub: Service, own_redis: RedisProcess
) -> None:
    timeout = 0.1
    proxy = proxy_factory(
        limited(own_redis.url, 1_000_000, window="1s", failure_mode="closed", timeout="100ms"), workers=2
    )
    load = PacedLoad([proxy.port], rate=200, duration=6.0, connections=6, target="/api/resource").start()
    try:
        time.sleep(1.0)
        killed = time.time()
        own_redis.kill()
        time.sleep(1.5)
        own_redis.start()
        restarted = time.time()
        outcomes = load.join()
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    assert {o.status for o in outcomes} <= {200, 503}
    unavailable = [o for o in outcomes if o.status == 503]
    assert unavailable, "503 while Redis is down"
    assert all(killed < o.wall for o in unavailable), [o.wall - killed for o in unavailable if o.wall <= killed]
    # Parked at the worst just before the failure shows: the round trip in flight and the next, each bounded.
    # (plus what this machine's load alone adds: the slowest answer of the second before the kill)
    noise = max([o.latency for o in outcomes if killed - 1.0 < o.wall < killed] + [0.05])
    worst = max(o.latency for o in unavailable)
    assert worst <= 2 * timeout + 0.01 + noise + 0.1, f"a 503 took {worst:.3f}s (before the kill: {noise:.3f}s)"
    down = [o for o in outcomes if killed + 2 * timeout + 0.3 < o.wall < restarted]
    assert down and all(o.status == 503 for o in down), [(o.wall - killed, o.status) for o in down if o.status != 503]
    # Recovery: back to 200 within the reconnect backoff (1 s at most) of the restart.
    back = [o for o in outcomes if o.wall > restarted + 1.5]
    late = [(o.wall - restarted, o.status) for o in back if o.status != 200]
    assert len(back) > 50 and not late, late[:20]


def test_global_limiting_resumes_after_a_redis_restart_without_a_proxy_restart(
    proxy_factory: ProxyFactory, backend_stub: Service, own_redis: RedisProcess
) -> None:
    fresh_window()
    workers, limit = 2, 20
    config = limited(own_redis.url, limit)
    proxy = proxy_factory(config, workers=workers)
    statuses = [get(proxy.port)[0] for _ in range(limit + 8)]
    # (a worker may still hold a share after the other one refused: a 200 may follow a 429, within the bound)
    admitted = statuses.count(200)
    assert within_bar(admitted, limit) and statuses.count(429) == len(statuses) - admitted, statuses
    own_redis.kill()
    # Open: the global limit of a subject the workers must learn about is off while Redis is down.
    wait_until(lambda: get(proxy.port, "/echo")[0] == 200, 5.0, "/echo served while Redis is down", proxy)
    own_redis.start()
    # Without a proxy restart, the sync reconnects and /echo is counted in the restarted Redis up to the limit.
    seen: list[int] = []

    def refused() -> bool:
        seen.append(get(proxy.port, "/echo")[0])
        return seen[-1] == 429

    wait_until(refused, 10.0, "a 429 on /echo after the restart", proxy)
    store = redis.Redis.from_url(own_redis.url)
    try:
        window = int(time.time() // WINDOW)
        key = f"{config['redis']['key_prefix']}{{/echo|per_key|127.0.0.1}}:{window}"
        wait_until(lambda: int(store.get(key) or 0) >= limit, 5.0, "the /echo count synced after the restart", proxy)
        # Counted since the restart: at least the limit (a 429 came from the global view), at most one
        # increment per request made since (refused tail reservations stay counted in Redis).
        assert limit <= int(store.get(key) or 0) <= len(seen)
    finally:
        store.close()


def test_a_three_node_redis_cluster_enforces_one_limit(
    proxy_factory: ProxyFactory, backend_stub: Service, redis_cluster: RedisClusterProcesses
) -> None:
    fresh_window()
    workers, limit = 2, 10
    config = limited(redis_cluster.url, limit)
    config["redis"]["cluster"] = True
    proxy = proxy_factory(config, workers=workers)
    admitted: dict[str, int] = {}
    for route, target in (("/api/", "/api/resource"), ("/echo", "/echo")):  # two keys, (most likely) two nodes
        statuses = [get(proxy.port, target)[0] for _ in range(limit + 8)]
        admitted[route] = statuses.count(200)
        assert within_bar(admitted[route], limit) and statuses.count(429) == len(statuses) - admitted[route], (
            statuses,
            proxy.read_log()[-3000:],
        )
    store = redis.RedisCluster.from_url(redis_cluster.url)
    try:
        window = int(time.time() // WINDOW)
        prefix = config["redis"]["key_prefix"]
        for route in ("/api/", "/echo"):
            key = f"{prefix}{{{route}|per_key|127.0.0.1}}:{window}"
            wait_until(lambda key=key, n=admitted[route]: int(store.get(key) or 0) >= n, 5.0, f"{key} synced", proxy)
            # Every admitted request is counted on its node; beyond them, Redis also holds the tail
            # reservations it refused (ledger.reserve: an increment Redis applied, then found over the
            # limit), at most one per request made.
            assert admitted[route] <= int(store.get(key) or 0) <= limit + 8
    finally:
        store.close()


def test_redis_stopped_for_3s_under_load_delays_no_request_beyond_the_timeout(
    proxy_factory: ProxyFactory, backend_stub: Service, own_redis: RedisProcess
) -> None:
    timeout = 0.1
    proxy = proxy_factory(limited(own_redis.url, 1_000_000, window="1s", timeout="100ms"), workers=2)
    load = PacedLoad([proxy.port], rate=200, duration=5.5, connections=6, target="/api/resource").start()
    try:
        time.sleep(1.0)
        own_redis.pause()  # SIGSTOP: connections are accepted, nothing is answered
        paused = time.time()
        time.sleep(3.0)
        own_redis.resume()
        resumed = time.time()
        outcomes = load.join()
    finally:
        load.stop()
        own_redis.resume()
    assert not load.errors, load.errors[:5]
    assert {o.status for o in outcomes} == {200}, sorted({o.status for o in outcomes})
    during = [o for o in outcomes if paused < o.wall < resumed]
    assert len(during) > 300, "the load went on while Redis was stopped"
    # A request parked for a sync waits for the round trip in flight and at most one more, each bounded.
    # (plus what this machine's load alone adds: the slowest answer of the second before the pause)
    noise = max([o.latency for o in outcomes if paused - 1.0 < o.wall < paused] + [0.05])
    worst = max(o.latency for o in during)
    assert worst <= 2 * timeout + 0.01 + noise + 0.1, f"a request took {worst:.3f}s while Redis was stopped"
    wait_until(lambda: "answers again" in proxy.read_log(), 5.0, "the sync recovered after SIGCONT", proxy)


def test_a_sentinel_url_finds_the_master_and_the_limit_holds_there(
    proxy_factory: ProxyFactory, backend_stub: Service, own_redis: RedisProcess, redis_sentinel: SentinelProcess
) -> None:
    fresh_window()
    workers, limit = 2, 10
    config = limited(redis_sentinel.url, limit)
    proxy = proxy_factory(config, workers=workers)
    statuses = [get(proxy.port)[0] for _ in range(limit + 8)]
    admitted = statuses.count(200)
    assert within_bar(admitted, limit) and statuses.count(429) == len(statuses) - admitted, statuses
    store = redis.Redis.from_url(own_redis.url)  # the master itself
    try:
        key = f"{config['redis']['key_prefix']}{{/api/|per_key|127.0.0.1}}:{int(time.time() // WINDOW)}"
        wait_until(lambda: int(store.get(key) or 0) >= limit, 5.0, "the count synced to the master", proxy)
    finally:
        store.close()


def test_counts_hold_across_a_reload(
    proxy_factory: ProxyFactory, backend_stub: Service, redis_server: RedisServer
) -> None:
    """SIGHUP: the new generation's workers learn the counts the old ones synced (and flushed as they drained)."""
    fresh_window()
    workers, limit = 2, 20
    proxy = proxy_factory(limited(redis_server.url, limit), workers=workers)
    assert [get(proxy.port)[0] for _ in range(12)] == [200] * 12
    old = set(proxy.children())
    proxy.send_signal(signal.SIGHUP)
    wait_for_log(proxy, r"generation 2 serving; draining 2 old workers")
    wait_until(lambda: not set(proxy.children()) & old, 15.0, "the old generation gone", proxy)
    after = [get(proxy.port)[0] for _ in range(16)]
    admitted = 12 + after.count(200)
    assert within_bar(admitted, limit) and after.count(429) == 16 - after.count(200), after
