"""The rate-limit step through a worker in this process (tests/integration/inprocess.py), against the real
backend_stub and a real Redis-protocol server: local buckets, global limits, the 429 and the headers on every
response of a limited route."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import redis

from devstack import RedisServer, Service
from proxy.errors import ProxyError
from proxy.exchange import Exchange
from proxy.gateway import StepFactory
from tests.integration.inprocess import Worker, request, run

WINDOW = 3600.0  # long windows: a test never straddles an edge (see fresh_window)


def config(redis_url: str, **limits: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": {"access_log": False},
        "upstreams": {"backend": {"response_timeout": "5s"}},
        "redis": {"url": redis_url, "key_prefix": f"t{uuid.uuid4().hex[:12]}:", "timeout": "200ms"},
        "limits": limits,
        "routes": [
            {"prefix": "/echo", "upstream": "backend", "limits": list(limits)},
            {"prefix": "/", "upstream": "backend"},
        ],
    }


def fresh_window() -> None:
    """Wait (bounded) until at least 30 s are left in the current window, so that counts cannot reset mid-test."""
    left = WINDOW - time.time() % WINDOW
    if left < 30.0:
        time.sleep(left + 0.05)


def test_a_local_bucket_admits_its_burst_then_answers_429_with_retry_after_and_headers(backend_stub: Service) -> None:
    data = config("", burst={"local_rate": 1, "local_burst": 3})
    del data["redis"]

    async def main() -> None:
        async with Worker(data, backend_stub.address) as worker:
            client = await worker.client()
            statuses = []
            for _ in range(4):
                client.send(request("/echo"))
                statuses.append(await client.response())
            assert [r.status for r in statuses] == [200, 200, 200, 429]
            first, last = statuses[0], statuses[3]
            assert first.header("RateLimit-Policy") == '"burst";q=3;w=3'
            assert first.header("RateLimit") == '"burst";r=2;t=1'
            assert (first.header("X-RateLimit-Limit"), first.header("X-RateLimit-Remaining")) == ("3", "2")
            assert last.json()["error"] == "rate_limited"
            assert (last.json()["limit"], last.json()["scope"]) == ("burst", "local")
            assert last.header("Retry-After") == "1"
            assert last.header("RateLimit") == '"burst";r=0;t=3' and last.header("X-RateLimit-Remaining") == "0"
            client.send(request("/other"))
            other = await client.response()
            assert other.header("RateLimit") is None and other.header("RateLimit-Policy") is None, "only limited routes"

    run(main)


def test_a_global_limit_counts_in_redis_and_answers_429_at_the_limit(
    backend_stub: Service, redis_server: RedisServer
) -> None:
    fresh_window()
    data = config(redis_server.url, per_key={"global_limit": 5, "window": "1h"})
    prefix = data["redis"]["key_prefix"]

    async def main() -> None:
        async with Worker(data, backend_stub.address) as worker:
            client = await worker.client()
            responses = []
            for _ in range(7):
                client.send(request("/echo"))
                responses.append(await client.response())
            assert [r.status for r in responses] == [200] * 5 + [429] * 2
            assert [r.header("X-RateLimit-Remaining") for r in responses] == ["4", "3", "2", "1", "0", "0", "0"]
            assert responses[0].header("RateLimit-Policy") == '"per_key";q=5;w=3600'
            rejected = responses[5]
            assert rejected.json()["limit"] == "per_key" and rejected.json()["scope"] == "global"
            retry = int(rejected.header("Retry-After") or "0")
            assert (
                0 < retry <= WINDOW
                and rejected.header(
                    "RateLimit",
                )
                == f'"per_key";r=0;t={retry}'
            )
            assert worker.limits is not None and worker.limits.sync is not None
            sync = worker.limits.sync
            await sync.round_trip()

        store = redis.Redis.from_url(redis_server.url)
        try:
            window = int(time.time() // WINDOW)
            key = f"{prefix}{{/echo|per_key|127.0.0.1}}:{window}"
            assert store.get(key) == b"5", ("admitted requests only, every one counted once", store.keys(prefix + "*"))
            assert 0 < store.pttl(key) <= 2 * WINDOW * 1000 + 1000
        finally:
            store.close()

    run(main)


def test_other_workers_counts_are_seen_and_a_second_limit_refuses_without_spending_the_first(
    backend_stub: Service, redis_server: RedisServer
) -> None:
    fresh_window()
    data = config(
        redis_server.url,
        wide={"local_rate": 1000, "local_burst": 1000, "global_limit": 100, "window": "1h"},
        narrow={"global_limit": 3, "window": "1h"},
    )
    prefix = data["redis"]["key_prefix"]
    window = int(time.time() // WINDOW)
    store = redis.Redis.from_url(redis_server.url)
    store.set(f"{prefix}{{/echo|wide|127.0.0.1}}:{window}", 90)  # other workers spent 90 of 100

    async def main() -> None:
        async with Worker(data, backend_stub.address) as worker:
            client = await worker.client()
            statuses = []
            for _ in range(5):
                client.send(request("/echo"))
                response = await client.response()
                statuses.append((response.status, response.header("RateLimit")))
            assert [s for s, _ in statuses] == [200, 200, 200, 429, 429]
            reset = int(WINDOW - time.time() % WINDOW) + 1
            items = (statuses[0][1] or "").split(", ")
            t = int(items[0].rpartition("=")[2])
            assert items == [f'"wide";r=9;t={t}', '"wide.local";r=999;t=1', f'"narrow";r=2;t={t}']
            assert abs(t - reset) <= 2
            assert worker.limits is not None and worker.limits.sync is not None
            await worker.limits.sync.round_trip()

    try:
        run(main)
        assert store.get(f"{prefix}{{/echo|wide|127.0.0.1}}:{window}") == b"93", "refused requests spend nothing"
    finally:
        store.close()


class SubjectFromHeader:
    """Test-only step: the subject from `x-subject` (as an auth step would set it)."""

    def check(self, exchange: Exchange) -> ProxyError | None:
        for name, value in exchange.headers:
            if name == b"x-subject":
                exchange.subject = value
        return None


class Teapot(ProxyError):
    status = 418
    code = "teapot"


class AnswerHere:
    """Test-only step: answers every request that passed the limits (no upstream traffic)."""

    def check(self, exchange: Exchange) -> ProxyError | None:
        return Teapot()


def test_100k_subjects_keep_a_worker_bounded_at_max_subjects(backend_stub: Service) -> None:
    subjects, bound = 100_000, 5_000
    data = config("", burst={"local_rate": 1, "local_burst": 2, "max_subjects": bound})
    del data["redis"]

    def around(steps: StepFactory) -> StepFactory:
        return lambda route: [SubjectFromHeader(), *steps(route), AnswerHere()]

    async def main() -> None:
        async with Worker(data, backend_stub.address, around=around) as worker:
            assert worker.limits is not None
            (table,) = worker.limits.tables
            clients = [await worker.client() for _ in range(4)]
            batch = 250
            sent = 0
            while sent < subjects:
                for client in clients:
                    client.send(b"".join(request("/echo", ("x-subject", f"s{sent + i}")) for i in range(batch)))
                    sent += batch
                for client in clients:
                    for _ in range(batch):
                        assert (await client.response()).status == 418
                assert len(table) <= bound
            assert len(table) <= bound

    run(main, timeout=120.0)


def test_a_sliding_window_counts_the_previous_window_read_from_redis(
    backend_stub: Service, redis_server: RedisServer
) -> None:
    fresh_window()
    limit = 100
    data = config(redis_server.url, slide={"global_limit": limit, "window": "1h", "algorithm": "sliding_window"})
    prefix = data["redis"]["key_prefix"]
    window = int(time.time() // WINDOW)
    store = redis.Redis.from_url(redis_server.url)
    store.set(f"{prefix}{{/echo|slide|127.0.0.1}}:{window - 1}", limit)  # the previous hour was used up

    async def main() -> int:
        async with Worker(data, backend_stub.address) as worker:
            client = await worker.client()
            admitted = 0
            for _ in range(limit):
                client.send(request("/echo"))
                response = await client.response()
                if response.status == 429:
                    assert response.json()["scope"] == "global"
                    break
                admitted += 1
            return admitted

    try:
        start = time.time()
        admitted = run(main)
        # What fits: limit - previous x (1 - elapsed fraction of this window); the fraction grows during the test.
        low = limit - limit * (1 - (start % WINDOW) / WINDOW)
        high = limit - limit * (1 - (time.time() % WINDOW) / WINDOW)
        assert math.floor(low) <= admitted <= math.floor(high), (low, admitted, high)
    finally:
        store.close()


def test_a_counter_key_holding_no_integer_is_reset_and_the_subject_counted_again(
    backend_stub: Service, redis_server: RedisServer
) -> None:
    fresh_window()
    data = config(redis_server.url, per_key={"global_limit": 5, "window": "1h"})
    key = f"{data['redis']['key_prefix']}{{/echo|per_key|127.0.0.1}}:{int(time.time() // WINDOW)}"
    store = redis.Redis.from_url(redis_server.url)
    store.set(key, "not a number")

    async def main() -> None:
        async with Worker(data, backend_stub.address) as worker:
            client = await worker.client()
            statuses = []
            for _ in range(7):
                client.send(request("/echo"))
                statuses.append((await client.response()).status)
            assert statuses == [200] * 5 + [429] * 2
            assert worker.limits is not None and worker.limits.sync is not None
            assert worker.limits.sync.key_errors == 1 and worker.limits.sync.errors == 0
            await worker.limits.sync.round_trip()

    try:
        run(main)
        assert store.get(key) == b"5"
    finally:
        store.close()


def test_a_round_trip_is_one_script_call_and_survives_redis_losing_the_script(
    backend_stub: Service, redis_server: RedisServer
) -> None:
    """Standalone Redis: a round trip is one EVALSHA, whatever it carries (its INCRBY and PEXPIRE run inside
    it); a SCRIPT FLUSH (a restart, a failover) costs one reload, not a failed round trip."""
    fresh_window()
    data = config(redis_server.url, per_key={"global_limit": 100, "window": "1h"})
    store = redis.Redis.from_url(redis_server.url)

    def calls(command: str) -> int:
        stats: dict[str, Any] = store.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    async def main() -> None:
        async with Worker(data, backend_stub.address) as worker:
            sync = worker.limits.sync if worker.limits is not None else None
            assert sync is not None
            client = await worker.client()
            before = (calls("evalsha"), calls("incrby"), calls("pexpire"), sync.round_trips)
            for _ in range(3):
                client.send(request("/echo"))
                assert (await client.response()).status == 200
            await sync.round_trip()
            after = (calls("evalsha"), calls("incrby"), calls("pexpire"), sync.round_trips)
            trips = after[3] - before[3]
            assert trips >= 2, "learning the count, then sending the increments"
            assert after[0] - before[0] == trips, "one EVALSHA per round trip"
            assert after[1] - before[1] == trips and after[2] - before[2] == 1, (before, after)
            store.script_flush()
            client.send(request("/echo"))
            assert (await client.response()).status == 200
            await sync.round_trip()
            assert sync.errors == 0 and sync.key_errors == 0
            key = f"{data['redis']['key_prefix']}{{/echo|per_key|127.0.0.1}}:{int(time.time() // WINDOW)}"
            assert store.get(key) == b"4"

    try:
        run(main)
    finally:
        store.close()
