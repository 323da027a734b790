"""The rate-limit services of one worker, built from the config: what `gateway.auth_steps` adds to routes.

Theory of operation: per route and limit one `RouteLimit` (its own bucket table and/or ledger: keys
never cross routes), all of a route's limits in one `LimitStep`. Every ledger of the worker is synced
by one `RedisSync` (present when some limit is global), whose health the steps read and which wakes
the exchanges parked on the worker's limit `WaitList` after each round trip. The ledger's estimate
of the workers spending on a subject starts at this host's worker count. `tick` (a worker tick
subscriber) sweeps idle buckets and past-window entries every `SWEEP_EVERY` seconds. The steps and
their limits are listed (`limit_steps`, `route_limits`) for the metrics fold, which reads their counts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from proxy.config import FAIL_CLOSED, SLIDING_WINDOW, Config, RouteConfig
from proxy.exchange import WaitList
from proxy.ratelimit.bucket import BucketTable
from proxy.ratelimit.ledger import Ledger
from proxy.ratelimit.step import LimitStep, RouteLimit, SyncHealth

if TYPE_CHECKING:
    from proxy.ratelimit.sync import RedisSync
    from proxy.server import WorkerState

SWEEP_EVERY = 5.0


class LimitServices:
    """The worker's rate-limit steps, tables and Redis sync."""

    def __init__(self, config: Config, state: WorkerState) -> None:
        self.config = config
        self.state = state
        redis = config.redis
        self.health = SyncHealth(closed=redis.failure_mode == FAIL_CLOSED)
        self.waiters = WaitList()
        self.tables: list[BucketTable] = []
        self.ledgers: list[tuple[RouteConfig, str, Ledger]] = []
        self.limit_steps: list[LimitStep] = []
        self.route_limits: list[tuple[str, RouteLimit]] = []  # (route name, one of its limits)
        # A suspended exchange is woken by the sync's answer or failure, each within `timeout` of the
        # round trip it waits for (and one before it); this deadline only backs that up.
        self.wait_timeout = 3 * redis.timeout + redis.sync_interval + 0.25
        self.sync: RedisSync | None = None
        self._next_sweep = 0.0
        if any(limit.global_limit for limit in config.limits.values()):
            from proxy.ratelimit.sync import RedisSync

            self.sync = RedisSync(redis, state.loop, self.health, self.waiters)

    def steps(self, route: RouteConfig) -> Sequence[LimitStep]:
        """The route's limit step (none without `limits`)."""
        if not route.limits:
            return ()
        limits: list[RouteLimit] = []
        for name in route.limits:
            config = self.config.limits[name]
            bucket: BucketTable | None = None
            ledger: Ledger | None = None
            if config.local_rate:
                bucket = BucketTable(config.local_rate, config.local_burst, config.max_subjects)
                self.tables.append(bucket)
            if config.global_limit:
                assert self.sync is not None, "a global limit makes a sync"
                redis = self.config.redis
                ledger = Ledger(
                    limit=config.global_limit,
                    length=config.window,
                    sliding=config.algorithm == SLIDING_WINDOW,
                    min_workers=self.config.server.workers,
                    share_ttl=2 * redis.sync_interval + redis.timeout,
                    max_entries=config.max_subjects,
                    on_urgent=self.sync.urge,
                )
                self.sync.add(ledger, route.name, name)
                self.ledgers.append((route, name, ledger))
            limit = RouteLimit(name, bucket, ledger)
            limits.append(limit)
            self.route_limits.append((route.name, limit))
        step = LimitStep(limits, self.health, self.waiters, self.wait_timeout)
        self.limit_steps.append(step)
        return (step,)

    async def boot(self) -> None:
        """Connect to Redis and start the sync (if any limit is global); a failure is logged, never fatal."""
        if self.sync is not None:
            await self.sync.boot()

    def tick(self, now: float) -> None:
        """Worker tick: now and then, drop idle buckets and entries of past windows."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY
        mono = time.perf_counter()
        for table in self.tables:
            table.sweep(mono)
        wall = time.time()
        for _, _, ledger in self.ledgers:
            ledger.sweep(wall)

    async def close(self) -> None:
        """Stop the sync (sending what is pending first, within its timeout)."""
        if self.sync is not None:
            await self.sync.close()
