"""Per-worker state: open connections, the coarse clock, request ids, the tick, exchange hooks and drain.

Theory of operation: one `tick` timer per worker replaces per-request timers. Each tick refreshes
`now` (the clock every deadline in the worker is measured against), asks every downstream connection
to enforce its deadlines, polls the sockets of connections whose reading the proxy holds paused (so a
client that closes or resets them is noticed without reading), then calls the tick subscribers in
order (upstream pools' idle sweep, the access log flush, the heartbeat, the auth and rate-limit
sweeps, the metrics fold; the Redis sync of rate limits is a task of its own). The tick
interval is a quarter of the smallest configured timeout; stamps and deadlines come
from the coarse clock, so a deadline fires never early and at most two intervals late (one for the
stamp's age, one for the tick's period). `finished` hooks are called once per exchange when it ends
(exchange.py). `drain` flips `draining` and asks every connection to `shutdown` (finish what is in
flight, take nothing new); `drained` resolves when none is left.
"""

from __future__ import annotations

import asyncio
import os
import select
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from mypy_extensions import mypyc_attr

from proxy.config import Config
from proxy.forwarding import RequestIds

if TYPE_CHECKING:
    from proxy.exchange import Exchange

# A socket whose peer sent FIN (POLLRDHUP) or reset it / hung up (POLLHUP, POLLERR).
_HANGUP: Final = select.POLLRDHUP | select.POLLHUP | select.POLLERR
_RESET: Final = select.POLLHUP | select.POLLERR


class Connection(Protocol):
    """What the worker asks of every downstream connection."""

    def check(self, now: float) -> None:
        """Enforce this connection's deadlines and those of its exchanges."""

    def shutdown(self) -> None:
        """Graceful stop: finish what is in flight, take no new request (HTTP/2: GOAWAY), then close."""

    def abort(self) -> None:
        """Close at once (drain deadline passed)."""

    def watched_fd(self) -> int:
        """The socket to poll for a peer close while the proxy holds its reading paused, else -1."""

    def peer_closed(self, reset: bool) -> None:
        """The peer half-closed (`reset` False) or reset the connection, seen while reading was paused."""


@mypyc_attr(allow_interpreted_subclasses=True)
class Pipeline:
    """The gateway as the exchanges see it (a class, for the reason given above `exchange.Upstream`); this
    base is the placeholder until the worker has built its gateway."""

    def handle(self, exchange: Exchange) -> None:
        """Run an exchange whose turn has come: route, steps, upstream; answer it on failure."""
        raise RuntimeError("no gateway")

    def resume(self, exchange: Exchange) -> None:
        """Continue a suspended exchange that was woken: re-run the step that suspended it."""
        raise RuntimeError("no gateway")

    def forward(self, exchange: Exchange) -> None:
        """Send upstream an exchange whose request body has been buffered."""
        raise RuntimeError("no gateway")


def _auth_timeouts(config: Config) -> list[float]:
    """How long requests may wait for the auth services (their deadlines are enforced by the tick too)."""
    auth = config.auth
    out: list[float] = []
    if auth.jwt is not None and auth.jwt.jwks_url:
        out += [auth.jwt.jwks_wait, auth.jwt.jwks_timeout]
    if auth.introspect is not None:
        out.append(auth.introspect.timeout)
    return out


class WorkerState:
    """What every protocol of one worker shares."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Config, worker_id: int = 0) -> None:
        self.loop = loop
        self.config = config
        self.worker_id = worker_id
        self.now = loop.time()
        # Unix time = perf_counter() + wall_offset (refreshed every tick): an exchange's `t_start` gives
        # the wall-clock time of its head without a clock read (token expiry checks).
        self.wall_offset = time.time() - time.perf_counter()
        self.connections: set[Connection] = set()
        self.gateway = Pipeline()
        self.draining = False
        # Called with `now` on every tick, in order, after the connections' checks.
        self.tick_subscribers: list[Callable[[float], None]] = []
        # Called with every exchange once, when it ends (exchange.py).
        self.finished: list[Callable[[Exchange], None]] = []
        self.body_reserved = 0  # request body buffer memory held by BUFFERING exchanges (gateway.py)
        self.request_ids = RequestIds(b"%s-" % os.urandom(6).hex().encode())
        self._tick_handle: asyncio.TimerHandle | None = None
        self._drained: asyncio.Future[None] | None = None
        s = config.server
        smallest = min(
            [s.header_timeout, s.keepalive_timeout, s.body_timeout, s.send_timeout, s.drain_idle_grace or 1.0]
            + [u.connect_timeout for u in config.upstreams.values()]
            + [u.response_timeout for u in config.upstreams.values()]
            + [u.pending_timeout or 1.0 for u in config.upstreams.values()]
            + _auth_timeouts(config)
            + ([config.redis.timeout] if any(limit.global_limit for limit in config.limits.values()) else [])
        )
        self.tick_interval = min(1.0, max(0.02, smallest / 4))

    def start(self) -> None:
        self._tick_handle = self.loop.call_later(self.tick_interval, self._tick)

    def stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None

    def _tick(self) -> None:
        self.now = now = self.loop.time()
        self.wall_offset = time.time() - time.perf_counter()
        for conn in list(self.connections):
            conn.check(now)
        self._poll_paused()
        for subscriber in self.tick_subscribers:
            subscriber(now)
        if self._drained is not None and not self.connections and not self._drained.done():
            self._drained.set_result(None)
        self._tick_handle = self.loop.call_later(self.tick_interval, self._tick)

    def _poll_paused(self) -> None:
        """One poll(2) over the sockets the proxy is not reading: a client gone meanwhile is noticed."""
        watched: dict[int, Connection] = {}
        for conn in self.connections:
            fd = conn.watched_fd()
            if fd >= 0:
                watched[fd] = conn
        if not watched:
            return
        poller = select.poll()
        for fd in watched:
            poller.register(fd, select.POLLRDHUP)
        try:
            events = poller.poll(0)
        except OSError:
            return
        for fd, event in events:
            if event & _HANGUP:
                watched[fd].peer_closed(bool(event & _RESET))

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests; let in-flight ones finish; wait until all closed. True if drained in time."""
        self.draining = True
        self._drained = self.loop.create_future()
        for conn in list(self.connections):
            conn.shutdown()
        if not self.connections:
            self._drained.set_result(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            return True
        except TimeoutError:
            for conn in list(self.connections):
                conn.abort()
            return False
