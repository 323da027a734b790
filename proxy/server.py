"""Per-worker state: open connections, the coarse clock, request ids, timeouts and drain.

Theory of operation: one `tick` timer per worker replaces per-request timers. Each tick refreshes
`now` (the clock every deadline in the worker is measured against), asks every downstream
connection to enforce its deadlines, lets the upstream pools expire idle connections, and calls
the heartbeat hook. The tick interval is a quarter of the smallest configured timeout; deadlines
fire never early and at most two intervals late (see `HttpProtocol.check`). `drain` flips
`draining`: responses then carry `Connection: close` and idle connections are closed after
`drain_idle_grace`; `drained` resolves when none is left.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from proxy.config import Config

if TYPE_CHECKING:
    from proxy.accesslog import AccessLog
    from proxy.exchange import Exchange
    from proxy.upstream.pool import Cluster


class Connection(Protocol):
    def check(self, now: float) -> None:
        """Enforce this connection's deadlines."""

    def abort(self) -> None:
        """Close at once (drain deadline passed)."""


class Pipeline(Protocol):
    def handle(self, exchange: Exchange) -> None:
        """Route and forward an exchange; answer it through its downstream on failure."""


class WorkerState:
    """What every protocol of one worker shares."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config, worker_id: int = 0) -> None:
        self.loop = loop
        self.config = config
        self.worker_id = worker_id
        self.now = loop.time()
        self.connections: set[Connection] = set()
        self.clusters: dict[str, Cluster] = {}
        self.gateway: Pipeline | None = None
        self.draining = False
        self._id_prefix = b"%s-" % os.urandom(6).hex().encode()
        self._id_counter = 0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        self.on_tick: Callable[[], None] | None = None
        self.access_log: AccessLog | None = None
        s = config.server
        smallest = min(
            [s.header_timeout, s.keepalive_timeout, s.body_timeout, s.send_timeout, s.drain_idle_grace or 1.0]
            + [u.connect_timeout for u in config.upstreams.values()]
            + [u.response_timeout for u in config.upstreams.values()]
            + [u.pending_timeout or 1.0 for u in config.upstreams.values()]
        )
        self.tick_interval = min(1.0, max(0.02, smallest / 4))

    def next_request_id(self) -> bytes:
        self._id_counter += 1
        return b"%s%x" % (self._id_prefix, self._id_counter)

    def start(self) -> None:
        self._tick_handle = self.loop.call_later(self.tick_interval, self._tick)

    def stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None

    def _tick(self) -> None:
        self.now = now = self.loop.time()
        for conn in list(self.connections):
            conn.check(now)
        for cluster in self.clusters.values():
            cluster.sweep(now)
        if self.on_tick is not None:
            self.on_tick()
        if self.access_log is not None:
            self.access_log.flush()
        if self._drained is not None and not self.connections and not self._drained.done():
            self._drained.set_result(None)
        self._tick_handle = self.loop.call_later(self.tick_interval, self._tick)

    async def drain(self, timeout: float) -> bool:
        """Stop keeping connections alive; wait until all closed. True if drained in time."""
        self.draining = True
        self._drained = self.loop.create_future()
        if not self.connections:
            self._drained.set_result(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            return True
        except TimeoutError:
            for conn in list(self.connections):
                conn.abort()
            return False
        finally:
            for cluster in self.clusters.values():
                cluster.close_idle()
